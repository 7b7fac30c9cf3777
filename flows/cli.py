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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
