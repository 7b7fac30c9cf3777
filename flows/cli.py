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


_mount("flows.promotion_cli", "registry", "MLflow registry: versions, champion, promotion ledger, rollback (with Triton), UI.")
_mount("flows.promotion_cli", "review", "Human review queue: low-confidence cases, disagreements, models sent to review.")
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


lm_app = typer.Typer(help="Causal-LM distillation: the same flows, registry and Triton server for a language model.",
                      no_args_is_help=True)
app.add_typer(lm_app, name="lm")


@lm_app.command("teacher")
def lm_teacher() -> None:
    """Materialise the shipped SmolLM2-135M-Instruct (GGUF) once as a safetensors directory; print its path."""
    from kdops.lm.teacher import smollm2_dir

    typer.echo(str(smollm2_dir()))


@lm_app.command("distill")
def lm_distill(
    recipe_name: str = typer.Option("lm-quick", "--recipe", help="Named recipe (kdops/recipes.py): lm-quick (minutes, the default) or lm-full (the recipe of record, about an hour on 2 cores). The options below override single fields."),
    domains: str = typer.Option("movie", "--domains", help="Comma-separated corpus domains (movie, tweets, amazon, nyt) to train and evaluate on."),
    train_sentences: int = typer.Option(None, "--train-sentences", min=1, help="Training sentences (a seeded sample of the domains' train split); default: the recipe's."),
    eval_sentences: int = typer.Option(100, "--eval-sentences", min=1, help="Held-out sentences per domain (test split) for perplexity."),
    steps: int = typer.Option(None, "--steps", min=1, help="Optimiser steps in this round; default: the recipe's."),
    layers: int = typer.Option(None, "--layers", min=1, help="First round: teacher layers the student keeps; default: the recipe's."),
    trim_vocab: int = typer.Option(None, "--trim-vocab", min=-1, help="First round: keep ids seen in training plus the first N (-1: the full vocabulary); default: the recipe's. A trimmed embedding is trained."),
    intermediate: int = typer.Option(None, "--intermediate", min=1, help="First round: MLP neurons each kept layer keeps, the most active on the round's text; default: all."),
    max_ppl_ratio: float = typer.Option(None, "--max-ppl-ratio", help="Gate: student / teacher perplexity limit; default: the recipe's."),
    model: str = typer.Option("kdops-lm-student", "--model", help="Registered and served model name."),
    teacher_dir: Path = typer.Option(None, "--teacher-dir", help="A local causal-LM directory (safetensors); default the shipped SmolLM2-135M-Instruct."),
    serve: bool = typer.Option(True, "--serve/--no-serve", help="Hot-swap a promoted student into Triton as a generation model."),
    triton_url: str = typer.Option("", "--triton-url", envvar="KDOPS_TRITON_URL", help="Attach to this Triton (HTTP host:port) instead of starting tritonserver."),
    triton_grpc_url: str = typer.Option("", "--triton-grpc-url", envvar="KDOPS_TRITON_GRPC_URL", help="gRPC host:port of the attached Triton (model control)."),
    triton_admin_key: str = typer.Option("", "--triton-admin-key", envvar="KDOPS_TRITON_ADMIN_KEY", help="Model-control key of the attached Triton."),
    speed: bool = typer.Option(False, "--speed/--no-speed", help="Also measure generation tokens/s and peak memory of teacher and student."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads for scoring and training."),
    seed: int = typer.Option(13, "--seed", help="Sampling and training seed."),
    json_out: Path = typer.Option(Path("out/lm_round.json"), "--json", help="Write the round's summary here."),
) -> None:
    """One LM round: teacher top-k (cached) -> distil (carve or continue the champion, with replay) -> perplexity
    gate -> MLflow version -> hot swap on Triton. Run it again to continue from the new champion."""
    from dataclasses import replace

    import torch

    from flows.lm_run import run_lm_round_cli
    from kdops.recipes import LMRecipe, recipe

    torch.set_num_threads(threads)
    try:
        r = recipe(recipe_name)
        if not isinstance(r, LMRecipe):
            raise ValueError(f"recipe {recipe_name!r} is not a causal-LM recipe.")
        shape = {"layers": layers} if layers else {}
        shape.update({"intermediate": intermediate} if intermediate else {})
        distill = {"steps": steps} if steps else {}
        if trim_vocab is not None:
            shape["trim_vocab"] = None if trim_vocab == -1 else trim_vocab
            distill["freeze_embeddings"] = trim_vocab == -1  # a trimmed embedding's rows must learn their new ids
        r = replace(r, distill=replace(r.distill, seed=seed, **distill),
                    shape=replace(r.shape, **shape),
                    gate=replace(r.gate, **({"max_ppl_ratio": max_ppl_ratio} if max_ppl_ratio else {})),
                    **({"train_sentences": train_sentences} if train_sentences else {}))
        names = tuple(d.strip() for d in domains.split(",") if d.strip())
        run_lm_round_cli(r, names, eval_sentences, model, teacher_dir, serve, triton_url, triton_grpc_url,
                         triton_admin_key, speed, seed, json_out, echo=typer.echo)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e


def main() -> None:
    import signal
    import sys

    # SIGTERM (a scheduler, ``kill``) unwinds like Ctrl-C, so every ``with`` block stops the servers it
    # started; a SIGKILL is covered by the servers' parent-death signal (kdops.proc).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    app()


if __name__ == "__main__":
    main()
