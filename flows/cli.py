"""The ``kdops`` command: library commands plus serving, registry, review, monitoring flows and the demo.

Sub-apps are mounted here (flows/ composes the others), so ``kdops/`` itself never imports serving,
monitoring or flows. Heavy imports happen inside commands, so ``kdops --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from kdops.cli import app as library_app

app = typer.Typer(
    help="kdops: continuous knowledge distillation. Teacher soft labels -> incremental distillation -> "
    "evaluation and gate -> MLflow registry -> Triton hot swap -> Evidently drift monitors -> next round.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
for command in library_app.registered_commands:
    app.registered_commands.append(command)
for group in library_app.registered_groups:
    app.registered_groups.append(group)


def _mount(module: str, name: str, help_text: str) -> None:
    import importlib

    mod = importlib.import_module(module)
    sub = getattr(mod, "app", None) or getattr(mod, f"{name}_app")
    app.add_typer(sub, name=name, help=help_text)


_mount("kdops.registry_cli", "registry", "MLflow registry: versions, champion, promotion ledger, rollback, UI.")
_mount("kdops.review_cli", "review", "Human review queue: low-confidence cases, disagreements, models sent to review.")
_mount("serving.cli", "serve", "Triton Inference Server: start, deploy, hot swap, rollback, status.")


@app.command("demo")
def demo(
    json_out: Path = typer.Option(Path("out/demo.json"), "--json", help="Write the run summary here."),
    report: Path = typer.Option(Path("out/demo.html"), help="Write the HTML report with plots here."),
    quick: bool = typer.Option(False, help="Smaller windows and epochs (smoke run)."),
) -> None:
    """The main job: the whole continuous-distillation loop on the shipped corpus and weights."""
    from flows.demo import run_demo

    run_demo(json_out=json_out, report=report, quick=quick)


@app.command("up")
def up(
    interval: float = typer.Option(300.0, "--interval", min=1, help="Seconds between monitor_tick runs (the kdops-monitor deployment's interval schedule)."),
    window: float = typer.Option(3600.0, "--window", min=1, help="A monitor tick looks back at most this many seconds of the prediction log."),
    min_rows: int = typer.Option(200, "--min-rows", min=1, help="A tick checks the traffic once this many predictions were served since the last check."),
    teacher_dir: Path = typer.Option(None, "--teacher-dir", help="Teacher model directory for the disagreement check and retraining "
                                     "(default: <home>/teachers/minilm-sentiment when `kdops teacher bootstrap` made it)."),
    triton_url: str = typer.Option(None, "--triton-url", envvar="KDOPS_TRITON_URL", help="Attach to this Triton (HTTP host:port) instead of starting tritonserver."),
    triton_grpc_url: str = typer.Option(None, "--triton-grpc-url", envvar="KDOPS_TRITON_GRPC_URL", help="gRPC host:port of the attached Triton (model control)."),
    triton_admin_key: str = typer.Option(None, "--triton-admin-key", envvar="KDOPS_TRITON_ADMIN_KEY", help="Model-control key of the attached Triton."),
    repository: Path = typer.Option(None, "--repository", help="Triton model repository as seen from here (default: <home>/triton-repo)."),
    model: str = typer.Option("kdops-student", "--model", help="Registered and served model name."),
    for_seconds: float = typer.Option(None, "--for-seconds", min=1, help="Stop after this many seconds (tests, smoke runs); default: until Ctrl-C or SIGTERM."),
) -> None:
    """Run the loop as a service: Prefect API + MLflow store + Triton, serving the monitor / distill / promote / review
    deployments. PREFECT_API_URL and MLFLOW_TRACKING_URI replace the embedded servers; see prefect.yaml to scale out."""
    import logging

    from flows.up import UpConfig, run_up
    from kdops.paths import home

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3"):  # one line per HTTP call to Prefect otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root = home()
    default_teacher = root / "teachers" / "minilm-sentiment"
    teacher = teacher_dir or (default_teacher if (default_teacher / "config.json").exists() else None)
    try:
        cfg = UpConfig(home=str(root), teacher_dir=str(teacher or ""), interval_s=interval, window_s=window, min_rows=min_rows,
                       triton_url=triton_url or "", triton_grpc_url=triton_grpc_url or "", triton_key=triton_admin_key or "",
                       repository=str(repository or ""), model=model, for_seconds=for_seconds)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    run_up(cfg, echo=lambda m: typer.echo(m))


def main() -> None:
    import signal
    import sys

    # SIGTERM (a scheduler, ``kill``) unwinds like Ctrl-C, so every ``with`` block stops the servers it
    # started; a SIGKILL is covered by the servers' parent-death signal (kdops.proc).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    app()


if __name__ == "__main__":
    main()
