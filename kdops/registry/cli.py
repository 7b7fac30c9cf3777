"""``kdops registry ...``: a typer sub-app. MLflow is imported only inside commands, so ``kdops --help`` stays fast.

``rollback`` here moves the registry alone; the ``kdops`` command mounts ``flows.promotion_cli``'s version of this
app, whose ``rollback`` also moves what Triton serves (kdops/ does not talk to Triton).
"""

from __future__ import annotations

import json
import subprocess

import typer

app = typer.Typer(help="MLflow registry: versions, champion, promotion ledger, rollback, UI.", no_args_is_help=True)
registry_app = app  # the name the other sub-apps use (review_app)

def _project_model() -> str:
    """The project's served model name ([serve] model in kdops.toml), else kdops-student."""
    import os

    from kdops.project import ProjectError, find

    try:
        p = find(os.environ.get("KDOPS_PROJECT") or None)
    except ProjectError:
        p = None
    return p.serve.model if p is not None else "kdops-student"


NameOption = typer.Option(None, "--name", "-n", help="Registered model name (default: kdops.toml's [serve] model, else kdops-student).")
UriOption = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                         help="MLflow tracking URI; default the embedded store $KDOPS_HOME/mlflow/mlflow.db.")
JsonOption = typer.Option(False, "--json", help="Print JSON instead of a table.")
ActorOption = typer.Option(None, "--actor", "-a", help="Who decides (recorded in the ledger); default $USER.")


def _registry(uri: str | None):
    from kdops.registry import Registry

    return Registry(tracking_uri=uri)


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(1) from e


@app.command("versions")
def versions(name: str = NameOption, tracking_uri: str = UriOption, as_json: bool = JsonOption) -> None:
    """List the registered versions with their aliases, state and lineage."""
    name = name or _project_model()
    rows = _registry(tracking_uri).versions(name)
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        typer.echo(f"no versions of {name}")
    for r in rows:
        lin = r["lineage"]
        typer.echo(f"v{r['version']:<4} {','.join(r['aliases']) or '-':<20} {r['state'] or '-':<12} "
                   f"{r['serving_runtime']:<10} sha {r['weights_sha256'][:12]}  teacher {lin.get('teacher_id', '-')}  "
                   f"parent {lin.get('parent_version') or '-'}  run {r['run_id'][:8]}")


@app.command("champion")
def champion(name: str = NameOption, tracking_uri: str = UriOption, as_json: bool = JsonOption) -> None:
    """Show the current champion (and challenger) version with its lineage."""
    name = name or _project_model()
    reg = _registry(tracking_uri)
    champ, chall = reg.champion(name), reg.challenger(name)
    if as_json:
        typer.echo(json.dumps({"champion": champ, "challenger": chall,
                               "lineage": reg.lineage(name, champ) if champ else None}, indent=2, default=str))
        return
    if champ is None:
        typer.echo(f"{name}: no champion yet")
    else:
        typer.echo(f"{name}: champion v{champ}" + (f", challenger v{chall}" if chall else ""))
        for k, v in reg.lineage(name, champ).items():
            typer.echo(f"  {k}: {v}")


@app.command("ledger")
def ledger(name: str = NameOption, tracking_uri: str = UriOption, as_json: bool = JsonOption,
           last: int = typer.Option(0, "--last", help="Show only the last N entries (0: all).")) -> None:
    """Print the promotion ledger (promote / rollback / reject / review), oldest first."""
    name = name or _project_model()
    entries = _registry(tracking_uri).ledger(name)
    entries = entries[-last:] if last else entries
    if as_json:
        typer.echo(json.dumps(entries, indent=2, default=str))
        return
    if not entries:
        typer.echo(f"{name}: empty ledger")
    for e in entries:
        prev = e.get("previous_champion")
        typer.echo(f"{e['time']}  {e['action']:<8} v{e['version']}  (was {('v' + str(prev)) if prev else '-'})  "
                   f"by {e['actor']}: {e['reason']}")


@app.command("rollback")
def rollback(reason: str = typer.Option(..., "--reason", "-r", help="Why (recorded in the ledger)."),
             name: str = NameOption, tracking_uri: str = UriOption, actor: str = ActorOption,
             to_version: int = typer.Option(None, "--to", help="Version to restore; default the one the "
                                            "current champion replaced.")) -> None:
    """Move the champion alias back (registry only: the served model is unchanged)."""
    name = name or _project_model()
    from kdops.registry import RegistryError

    try:
        e = _registry(tracking_uri).rollback(name, reason, actor=actor, to_version=to_version)
    except RegistryError as err:
        _fail(err)
    typer.echo(f"{name}: champion v{e['previous_champion']} -> v{e['version']}")


@app.command("ui")
def ui(port: int = typer.Option(5000, "--port", "-p", help="Port for the MLflow UI."),
       host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind; 0.0.0.0 exposes it."),
       tracking_uri: str = UriOption,
       dry_run: bool = typer.Option(False, "--dry-run", help="Print the command instead of starting it.")) -> None:
    """Start the MLflow UI on the embedded store (Ctrl-C stops it)."""
    from kdops.registry import RegistryError

    try:
        cmd = _registry(tracking_uri).store.ui_command(port=port, host=host)
    except RegistryError as err:
        _fail(err)
    typer.echo(" ".join(cmd))
    if not dry_run:
        raise typer.Exit(subprocess.call(cmd))
