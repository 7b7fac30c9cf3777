"""``kdops registry ...`` and ``kdops review ...`` as the ``kdops`` command mounts them: the library sub-apps
(``kdops.registry.cli``, ``kdops.review_cli``) with the commands that move a champion replaced by ones that move
what Triton serves with it, as one transaction (``flows.promotion``): ``registry rollback``, ``review approve``
and ``review reject``. Without ``--triton-url`` (or ``$KDOPS_TRITON_URL``) they move the registry alone, and say so.

Only typer and the two library sub-apps are imported here; Prefect, MLflow and serving load inside a command.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from kdops import review_cli
from kdops.registry import cli as registry_cli

TritonUrl = typer.Option("", "--triton-url", envvar="KDOPS_TRITON_URL",
                         help="HTTP host:port of the Triton serving the model; empty: move the registry alone.")
TritonGrpc = typer.Option("", "--triton-grpc-url", envvar="KDOPS_TRITON_GRPC_URL",
                          help="gRPC host:port of that Triton (model control).")
TritonKey = typer.Option("", "--triton-admin-key", envvar="KDOPS_TRITON_ADMIN_KEY",
                         help="Model-control key of that Triton.")
Repository = typer.Option(None, "--repository",
                          help="Its model repository as seen from here (default: <home>/triton-repo).")
PredictionLog = typer.Option(None, "--prediction-log", help="Prediction-log directory for the swapped-in model "
                             "(default: the one the served model writes to).")


def _sub_app(base: typer.Typer, replaced: set[str]) -> typer.Typer:
    app = typer.Typer(help=base.info.help, no_args_is_help=True)
    app.registered_commands += [c for c in base.registered_commands if c.name not in replaced]
    return app


registry_app = _sub_app(registry_cli.app, {"rollback"})
review_app = _sub_app(review_cli.review_app, {"approve", "reject"})


def _context(model: str, tracking_uri: str | None, triton_url: str, grpc_url: str, key: str, repository: Path | None,
             prediction_log: Path | None):
    from flows.tasks import LoopContext
    from kdops.paths import Home

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line of output per command
    home = Home.from_env()
    repo = str((repository or home.triton_repo).resolve())
    plog = str(prediction_log or "")
    if triton_url and not plog:
        plog = _served_log(triton_url, grpc_url, key, repo, model)
    return LoopContext(home=str(home), teacher_dir="", tracking_uri=tracking_uri, triton_url=triton_url,
                       triton_grpc_url=grpc_url, triton_key=key, repository=repo, model=model, prediction_log=plog)


def _served_log(url: str, grpc_url: str, key: str, repo: str, model: str) -> str:
    """The prediction log the served model writes to, so a swap keeps the monitor's input flowing."""
    from serving.client import ServingClient
    from serving.swap import read_state

    slot = read_state(repo, model)["active_slot"]
    try:
        return ServingClient(url, key, grpc_url=grpc_url).parameter(slot, "kdops_prediction_log_dir") if slot else ""
    except Exception:  # noqa: BLE001 - an unreachable server fails the swap itself, with its own message
        return ""


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(1) from e


def _served(swap: dict | None) -> str:
    if swap:
        return f"; Triton serves {swap['label']}"
    return "; registry only (no --triton-url): the served model is unchanged"


@registry_app.command("rollback")
def rollback(reason: str = typer.Option(..., "--reason", "-r", help="Why (recorded in the ledger)."),
             name: str = registry_cli.NameOption, tracking_uri: str = registry_cli.UriOption,
             actor: str = registry_cli.ActorOption,
             to_version: int = typer.Option(None, "--to", help="Version to restore; default the one the current "
                                            "champion replaced."),
             triton_url: str = TritonUrl, triton_grpc_url: str = TritonGrpc, triton_admin_key: str = TritonKey,
             repository: Path = Repository, prediction_log: Path = PredictionLog) -> None:
    """Put the previous champion back: the `champion` alias and what Triton serves, or neither."""
    name = name or registry_cli._project_model()
    from flows.promotion import rollback as roll_back

    ctx = _context(name, tracking_uri, triton_url, triton_grpc_url, triton_admin_key, repository, prediction_log)
    try:
        out = roll_back(ctx, reason, to_version, actor)  # no --actor: $USER
    except Exception as e:  # RegistryError, SwapError, PromotionError: each says what stayed as it was
        _fail(e)
    e = out["ledger"]
    typer.echo(f"{name}: champion v{e['previous_champion']} -> v{e['version']}{_served(out['swap'])}")


def _decide(case_id: int, decision: str, reviewer: str | None, db: Path | None, tracking_uri: str | None,
            triton: tuple) -> None:
    from flows.review import decide

    queue = review_cli._queue(db)
    try:
        model = queue.get(case_id)["payload"].get("model") or "kdops-student"
        ctx = _context(model, tracking_uri, *triton)
        case = decide(ctx, queue, case_id, decision, None, review_cli._who(reviewer))
    except Exception as e:  # ReviewError, RegistryError, SwapError, PromotionError: the case stays open
        _fail(e)
    applied = case.pop("applied")
    typer.echo(f"case {case['id']}: {case['status']} by {case['reviewer']}")
    if applied and "ledger" in applied:  # a promotion
        typer.echo(f"{ctx.model}: v{applied['ledger']['version']} is champion{_served(applied['swap'])}")
    elif applied:
        typer.echo(f"{ctx.model}: v{applied['version']} rejected in the ledger")


@review_app.command("approve")
def approve(case_id: int = typer.Argument(..., help="Case id."), reviewer: str = review_cli.ReviewerOption,
            db: Path = review_cli.DbOption, tracking_uri: str = registry_cli.UriOption,
            triton_url: str = TritonUrl, triton_grpc_url: str = TritonGrpc, triton_admin_key: str = TritonKey,
            repository: Path = Repository, prediction_log: Path = PredictionLog) -> None:
    """Approve a case; a candidate model is promoted (hot swap and `champion` alias, or neither)."""
    _decide(case_id, "approve", reviewer, db, tracking_uri,
            (triton_url, triton_grpc_url, triton_admin_key, repository, prediction_log))


@review_app.command("reject")
def reject(case_id: int = typer.Argument(..., help="Case id."), reviewer: str = review_cli.ReviewerOption,
           db: Path = review_cli.DbOption, tracking_uri: str = registry_cli.UriOption) -> None:
    """Reject a case; a candidate model is written to the ledger as rejected and stops being the challenger."""
    _decide(case_id, "reject", reviewer, db, tracking_uri, ("", "", "", None, None))

