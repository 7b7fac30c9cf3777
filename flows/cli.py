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


def _remote_teacher(url: str, model: str):
    from serving.teacher import TritonTeacher

    return TritonTeacher(url, model)


@app.callback()
def root(ctx: typer.Context,
         project: Path = typer.Option(None, "--project", envvar="KDOPS_PROJECT",
                                      help="The project file (default: ./kdops.toml when there is one; write one with `kdops init`)."),
         debug: bool = typer.Option(False, "--debug", help="Show the full traceback of errors that are yours to fix (normally one line).")) -> None:
    """Every command reads the project file; flags override it."""
    import os

    from kdops.cli_common import Session
    from kdops.project import FILENAME

    if project:
        os.environ["KDOPS_PROJECT"] = str(project.resolve())  # commands that read it outside a context see it too
    found = project or (Path(FILENAME) if Path(FILENAME).is_file() else None)
    if found is not None and found.is_file():
        # A project keeps its data (snapshots, caches, registry) beside its file, wherever it is run from.
        os.environ.setdefault("KDOPS_HOME", str(found.resolve().parent / ".kdops"))
    ctx.obj = Session(project_file=project, remote_teacher=_remote_teacher, debug=debug)


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
    ctx: typer.Context,
    json_out: Path = typer.Option(Path("out/demo.json"), "--json", help="Write the run summary here."),
    report: Path = typer.Option(Path("out/demo.html"), help="Write the HTML report with plots here."),
    quick: bool = typer.Option(False, help="Smaller windows and epochs (smoke run)."),
) -> None:
    """The main job: the whole continuous-distillation loop on the shipped corpus and weights."""
    from flows.demo import run_demo
    from kdops.cli_common import session

    s = session(ctx)
    run_demo(json_out=json_out, report=report, quick=quick, project=s.project if s.has_project else None)


@app.command("round")
def round_cmd(
    ctx: typer.Context,
    train: str = typer.Option(None, "--train", help="Training data (default: kdops.toml's [data] train)."),
    test: str = typer.Option(None, "--test", help="Held-out data the gate decides on (default: kdops.toml's [data] test)."),
    recipe: str = typer.Option(None, "--recipe", help="Named recipe (default: kdops.toml's, else the kind's first or incremental one)."),
    serve: bool = typer.Option(False, "--serve/--no-serve", help="Also start tritonserver for the round and hot-swap a promoted student in."),
    json_out: Path = typer.Option(None, "--json", help="Write the round's result here."),
) -> None:
    """One round of your project: distil (or continue the champion) -> evaluate on the test data -> gate ->
    MLflow version -> champion. The same flow `kdops up` runs on a schedule or on drift."""
    from flows.round import run_project_round
    from kdops.cli_common import session, setup

    setup()
    run_project_round(session(ctx), train, test, recipe, serve, json_out, echo=typer.echo)


@app.command("up")
def up(
    ctx: typer.Context,
    interval: float = typer.Option(None, "--interval", min=1, help="Seconds between monitor_tick runs (default: kdops.toml's [monitor] interval_s, else 300)."),
    window: float = typer.Option(None, "--window", min=1, help="A monitor tick looks back at most this many seconds of the prediction log (default 3600)."),
    min_rows: int = typer.Option(None, "--min-rows", min=1, help="A tick checks the traffic once this many predictions were served since the last check (default 200)."),
    teacher_dir: Path = typer.Option(None, "--teacher-dir", help="Teacher model directory for the disagreement check and retraining "
                                     "(default: kdops.toml's [teacher], else <home>/teachers/minilm-sentiment when `kdops teacher bootstrap` made it)."),
    triton_url: str = typer.Option(None, "--triton-url", envvar="KDOPS_TRITON_URL", help="Attach to this Triton (HTTP host:port) instead of starting tritonserver."),
    triton_grpc_url: str = typer.Option(None, "--triton-grpc-url", envvar="KDOPS_TRITON_GRPC_URL", help="gRPC host:port of the attached Triton (model control)."),
    triton_admin_key: str = typer.Option(None, "--triton-admin-key", envvar="KDOPS_TRITON_ADMIN_KEY", help="Model-control key of the attached Triton."),
    repository: Path = typer.Option(None, "--repository", help="Triton model repository as seen from here (default: <home>/triton-repo)."),
    model: str = typer.Option(None, "--model", help="Registered and served model name (default: kdops.toml's [serve] model, else kdops-student)."),
    for_seconds: float = typer.Option(None, "--for-seconds", min=1, help="Stop after this many seconds (tests, smoke runs); default: until Ctrl-C or SIGTERM."),
    work_pool: str = typer.Option("", "--work-pool", help="Register the deployments on this Prefect process work pool (created if missing) and run them in "
                                  "`prefect worker` processes: one started here, more with `prefect worker start --pool NAME` elsewhere."),
) -> None:
    """Run the loop as a service: Prefect API + MLflow store + Triton, serving the monitor / distill / promote / review
    (and, with a watched directory, ingest) deployments on the project's schedules. PREFECT_API_URL and
    MLFLOW_TRACKING_URI replace the embedded servers; --work-pool runs the flows on Prefect workers (README: Scaling out)."""
    import logging

    from flows.up import UpConfig, run_up
    from kdops.cli_common import session
    from kdops.errors import UserError
    from kdops.paths import home

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "httpcore", "urllib3", "openai"):  # one line per HTTP call to Prefect otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    s = session(ctx)
    p, root = s.project, home()
    try:
        directory, url, teacher_model = s.teacher_location(teacher_dir)
        teacher_api = s.teacher_api(teacher_dir)
    except UserError:  # a project without a teacher still serves and monitors its champion
        directory, url, teacher_model, teacher_api = None, "", "", ""
    if directory is not None and not (Path(directory) / "config.json").exists():
        directory = None  # not trained yet: no disagreement check, no retraining
    m = p.monitor
    try:
        cfg = UpConfig(home=str(root), teacher_dir=str(directory or ""), teacher_url=url, teacher_model=teacher_model,
                       teacher_api=teacher_api,
                       interval_s=interval or m.interval_s, window_s=window or m.window_s, min_rows=min_rows or m.min_rows,
                       triton_url=triton_url or "", triton_grpc_url=triton_grpc_url or "", triton_key=triton_admin_key or "",
                       repository=str(repository or ""), model=model or p.serve.model, runtime=p.serve.runtime,
                       redact_texts=p.serve.redact_texts, for_seconds=for_seconds,
                       watch_dir=str(p.root / p.data.watch) if p.data.watch else "", schema=s.schema(),
                       labels=tuple(p.task.labels), label_map=dict(p.task.label_map),
                       eval_data=p.resolve(p.data.test) if p.data.test else "", kind=p.task.kind, recipe=p.student.recipe,
                       retrain_cron=p.schedule.retrain_cron, retrain_interval_s=p.schedule.retrain_interval_s,
                       work_pool=work_pool)
    except ValueError as e:
        raise UserError(str(e)) from e
    run_up(cfg, echo=lambda m: typer.echo(m))


@app.command("status")
def status(ctx: typer.Context,
           model: str = typer.Option(None, "--model", help="Registered and served model name (default: kdops.toml's [serve] model)."),
           json_out: str = typer.Option(None, "--json", help="Write the status as JSON to this file ('-': standard output).")) -> None:
    """The served champion, the next scheduled runs (while `kdops up` runs), the queued snapshots and the last round."""
    from flows.status import status_command

    status_command(ctx, model=model, json_out=json_out)


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


def _one_line_errors(group: typer.Typer) -> None:
    """Every command, in every sub-app: a user error (``kdops.errors.UserError``) ends in one line and exit code 2;
    ``kdops --debug`` lets it through with its traceback."""
    import functools
    import sys

    from kdops.errors import UserError

    from kdops.errors import disk_full

    def wrap(fn):
        @functools.wraps(fn)
        def command(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                import click

                if isinstance(e, UserError):
                    message = str(e).splitlines()[0] if str(e) else type(e).__name__
                elif full := disk_full(e):  # the disk, not a bug
                    message = (f"no space to write: {full}; nothing half-written was kept or registered: free "
                               "space and run it again")
                else:
                    raise
                ctx = click.get_current_context(silent=True)
                if getattr(ctx.find_root().obj if ctx else None, "debug", False) or "--debug" in sys.argv[1:]:
                    raise
                typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
                raise typer.Exit(2) from None
        return command

    for info in group.registered_commands:
        if info.callback is not None and not getattr(info.callback, "_one_line", False):
            info.callback = wrap(info.callback)
            info.callback._one_line = True
    for sub in group.registered_groups:
        _one_line_errors(sub.typer_instance)


_one_line_errors(app)


def main() -> None:
    import signal
    import sys

    # SIGTERM (a scheduler, ``kill``) unwinds like Ctrl-C, so every ``with`` block stops the servers it
    # started; a SIGKILL is covered by the servers' parent-death signal (kdops.proc).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    app()


if __name__ == "__main__":
    main()
