"""Library commands: data, teacher, distill, evaluate, gate. The top-level ``kdops`` app (flows/cli.py)
mounts these beside serving, registry, review and the demo."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from kdops.cli_common import DATA_HELP, fail, resolve_data, session, setup
from kdops.data import DataError, DataSchema
from kdops.errors import UserError
from kdops.init_cli import init_cmd
from kdops.teacher_cli import teacher_app

app = typer.Typer(help="kdops library commands.", no_args_is_help=True, pretty_exceptions_show_locals=False)
data_app = typer.Typer(help="Ingest and validate data into content-addressed snapshots.", no_args_is_help=True)
app.command("init")(init_cmd)
app.add_typer(data_app, name="data")
app.add_typer(teacher_app, name="teacher")


@data_app.command("ingest")
def data_ingest(
    ctx: typer.Context,
    path: Path = typer.Argument(..., help="CSV, JSONL or Parquet file."),
    text_column: str = typer.Option(None, help="Column holding the text (default: kdops.toml's, else 'text')."),
    label_column: str = typer.Option(None, help="Column holding the label ('' for unlabelled data; default: kdops.toml's, else 'label')."),
    id_column: str = typer.Option(None, help="Column holding unique row ids ('' derives ids from content)."),
    domain_column: str = typer.Option(None, help="Optional slice column (default 'domain')."),
    labels: str = typer.Option("", help="Comma-separated allowed labels; others are quarantined (default: kdops.toml's [task] labels)."),
    max_chars: int = typer.Option(None, help="Texts longer than this are quarantined (default 2000)."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the ingest report here as JSON."),
) -> None:
    """Validate a file; good rows become a snapshot, bad rows go to a quarantine file with the reason."""
    setup()
    from kdops.data import ingest
    from kdops.paths import home

    s = session(ctx)
    allowed = tuple(labels.split(",")) if labels else (tuple(s.project.task.labels) + tuple(s.project.task.label_map)) or None
    base = s.schema(text_column=text_column, max_chars=max_chars)
    given = {"label_column": label_column, "id_column": id_column, "domain_column": domain_column}
    schema = DataSchema(text_column=base.text_column, max_chars=base.max_chars, labels=allowed,
                        **{k: (v or None) if v is not None else getattr(base, k) for k, v in given.items()})
    _, report = ingest(path, schema, home())
    typer.echo(report.summary())
    if report.quarantine_path:
        typer.echo(f"quarantined rows: {report.quarantine_path}")
    if json_out:
        json_out.write_text(json.dumps(report.to_dict(), indent=2))


@data_app.command("corpus")
def data_corpus(
    spec: str = typer.Argument("corpus:sentiment", help=DATA_HELP),
    limit_per_domain: int | None = typer.Option(None, help="Seeded subsample per domain."),
) -> None:
    """Snapshot a built-in real corpus (sentiment: movie/tweets/amazon/nyt; questions: TREC types)."""
    setup()
    from kdops.paths import home

    try:
        snap = resolve_data(spec if spec.startswith("corpus:") else f"corpus:{spec}", limit_per_domain=limit_per_domain)
    except DataError as e:
        fail(e)
    snap.save(home() / "snapshots")
    counts = snap.rows.groupby("domain").size().to_dict()
    typer.echo(f"snapshot {snap.id}: {len(snap)} rows {counts}")


@app.command("distill")
def distill_cmd(
    ctx: typer.Context,
    train: str = typer.Option(None, help=f"Training data (default: kdops.toml's [data] train). {DATA_HELP}"),
    val: str | None = typer.Option(None, help="Validation data for early stopping (same forms; default: kdops.toml's [data] val)."),
    out: Path = typer.Option(..., help="Directory to write the student artifact to."),
    teacher_dir: Path | None = typer.Option(None, help="Teacher model directory (default: kdops.toml's [teacher], else the bootstrapped one)."),
    teacher_url: str | None = typer.Option(None, help="A teacher served by Triton: HTTP host:port (with --teacher-model)."),
    teacher_model: str | None = typer.Option(None, help="The Triton teacher's model name."),
    champion: Path | None = typer.Option(None, help="Start from this student (incremental round)."),
    recipe_name: str = typer.Option(None, "--recipe", help="Named recipe (kdops/recipes.py); default: kdops.toml's [student] recipe, else classifier, or classifier-incremental with --champion. The options below override single fields."),
    layers: int | None = typer.Option(None, help="Student layers (new students); default: the recipe's."),
    embedding_size: int | None = typer.Option(None, help="Rank of factorised embeddings (0 = full); default: the recipe's."),
    epochs: int | None = typer.Option(None, help="Epochs; default: the recipe's."),
    batch_size: int | None = typer.Option(None, help="Batch size; default: the recipe's."),
    lr: float | None = typer.Option(None, help="Learning rate; default: the recipe's."),
    limit_per_domain: int | None = typer.Option(None, help="Subsample built-in corpora per domain."),
    config_json: Path | None = typer.Option(None, "--config", help="A DistillConfig as JSON (replaces the recipe's)."),
) -> None:
    """Distil the teacher into a student (full, or incremental from --champion with replay).

    Labelled training data must carry the teacher's labels (or ones kdops.toml maps onto them); unlabelled data
    is labelled by the teacher alone."""
    setup()
    from kdops.paths import home
    from kdops.recipes import ClassifierRecipe, recipe
    from kdops.replay import ReplayBuffer
    from kdops.rounds import run_round
    from kdops.soft_labels import SoftLabelCache
    from kdops.trainer import processes

    s = session(ctx)
    p = s.project
    r = recipe(recipe_name or p.student.recipe or ("classifier-incremental" if champion else "classifier"))
    if not isinstance(r, ClassifierRecipe):
        raise UserError(f"recipe {r.name!r} is not a classifier recipe; causal LMs distil with `kdops lm distill`.")
    tr = s.data(train or p.data.train, limit_per_domain, what="train")
    va_spec = val or p.data.val
    va = s.data(va_spec, limit_per_domain, what="val") if va_spec else None
    teacher = s.teacher(teacher_dir, teacher_url, teacher_model)
    train_rows = s.aligned(tr, teacher.label_names, train or p.data.train)
    val_rows = s.aligned(va, teacher.label_names, va_spec) if va is not None else None
    cfg, shape = _recipe_fields(r, p, config_json, layers, embedding_size, epochs, batch_size, lr)
    replay_dir = home() / "replay"
    replay = ReplayBuffer.load(replay_dir) if (replay_dir / "replay.json").exists() else ReplayBuffer()
    res = run_round(teacher, SoftLabelCache(home() / "soft_labels.sqlite"), train_rows, out, cfg,
                    val_rows=val_rows, shape=shape, champion_dir=champion, replay=replay,
                    snapshot_ids={"train": tr.id, "val": va.id if va is not None else None})
    if processes().is_main:  # under torchrun / accelerate launch the main process alone writes
        replay.save(replay_dir)
    typer.echo(f"student: {res.artifact}  history: {json.dumps(res.result.history[-1])}  cache: {json.dumps(res.cache)}")


def _recipe_fields(r, p, config_json, layers, embedding_size, epochs, batch_size, lr):
    """The round's DistillConfig and StudentShape: the recipe's, then kdops.toml's [student], then the flags."""
    from dataclasses import replace

    from kdops.distill import DistillConfig

    epochs = epochs or p.student.epochs or None
    layers = layers or p.student.layers or None
    if embedding_size is None and p.student.embedding_size >= 0:
        embedding_size = p.student.embedding_size
    given = {"epochs": epochs, "batch_size": batch_size, "lr": lr}
    cfg = DistillConfig.from_dict(json.loads(config_json.read_text())) if config_json else \
        replace(r.distill, **{k: v for k, v in given.items() if v is not None})
    shape = replace(r.shape, **({"layers": layers} if layers else {}),
                    **({"embedding_size": embedding_size or None} if embedding_size is not None else {}))
    return cfg, shape


@app.command("evaluate")
def evaluate_cmd(
    ctx: typer.Context,
    student: Path = typer.Argument(..., help="Student artifact directory."),
    data: str = typer.Option(None, help=f"Labelled evaluation data (default: kdops.toml's [data] test, else corpus:sentiment:test). {DATA_HELP}"),
    teacher_dir: Path | None = typer.Option(None, help="Teacher model directory (default: kdops.toml's [teacher], else the bootstrapped one)."),
    teacher_url: str | None = typer.Option(None, help="A teacher served by Triton: HTTP host:port (with --teacher-model)."),
    teacher_model: str | None = typer.Option(None, help="The Triton teacher's model name."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the EvalReport here."),
    speed: bool = typer.Option(True, help="Measure latency and throughput."),
) -> None:
    """Evaluate a student against the teacher: accuracy per domain, retention, agreement, ECE, robustness, speed."""
    setup()
    from kdops.evaluate import evaluate
    from kdops.paths import home
    from kdops.predict import Predictor
    from kdops.soft_labels import SoftLabelCache

    s = session(ctx)
    predictor = Predictor.from_dir(student)
    spec = data or s.project.data.test or ("" if s.has_project else "corpus:sentiment:test")
    snap = s.data(spec, what="test")
    teacher = s.teacher(teacher_dir, teacher_url, teacher_model)
    rows = s.aligned(snap, teacher.label_names, spec)
    rows = rows[rows["label"].notna()].reset_index(drop=True)
    if rows.empty:
        raise UserError(f"{spec} has no labelled rows to evaluate on; check its label column "
                        f"(--label-column, or [data] label_column in kdops.toml).")
    if list(predictor.label_names) != list(teacher.label_names):
        raise UserError(f"the student {student} predicts {list(predictor.label_names)} but the teacher has "
                        f"{list(teacher.label_names)}: evaluate it with the teacher it was distilled from.")
    logits = SoftLabelCache(home() / "soft_labels.sqlite").get_or_compute(teacher, rows["text"].tolist(), progress=True)
    params = teacher.num_parameters() if hasattr(teacher, "num_parameters") else None
    report = evaluate(predictor, rows, logits, teacher.label_names, speed=speed, teacher_params=params)
    typer.echo(report.summary())
    if json_out:
        json_out.write_text(json.dumps(report.to_dict(), indent=2))


@app.command("quantize")
def quantize_cmd(
    ctx: typer.Context,
    student: Path = typer.Argument(..., help="Student artifact directory (the graphs are added to it)."),
    data: str = typer.Option(None, help=f"Labelled data the INT8 graphs are gated on (default: kdops.toml's [data] test, else corpus:sentiment:test). {DATA_HELP}"),
    json_out: Path | None = typer.Option(None, "--json", help="Write the gate's figures here."),
) -> None:
    """Export a classifier student to ONNX (fp32, and INT8 per CPU family), gate each INT8 graph against the torch
    student (>= 99 % label agreement, <= 0.5 points lost on any slice) and say which graph this CPU serves.

    A round does this itself before registering a candidate; this is for a student made before, or by hand."""
    setup()
    from kdops import kinds
    from kdops.artifacts import Artifact
    from kdops.onnx_predict import choose_graph, int8_family

    s = session(ctx)
    art = Artifact.read(student)
    spec = data or s.project.data.test or ("" if s.has_project else "corpus:sentiment:test")
    rows = s.aligned(s.data(spec, what="test"), list(art.label_names) or None, spec)
    art = kinds.get(art.kind).prepare_serving(art, rows)
    meta = art.extra.get("onnx") or {}
    if not meta.get("fp32"):
        raise UserError(f"{student}: no ONNX graphs ({meta.get('skipped', f'a {art.kind.value} is served by torch')}).")
    here = int8_family()
    typer.echo(f"{'graph':<34}{'gate':>6}{'agreement':>11}{'worst slice':>13}  reason")
    for family, g in meta["int8_gate"].items():
        mark = " (this CPU)" if family == here else ""
        typer.echo(f"{meta['int8'][family] + mark:<34}{'pass' if g['passed'] else 'FAIL':>6}{g['agreement']:>11.4f}"
                   f"{g['max_drop_points']:>10.2f} pt  {g['reason']}")
    choice = choose_graph(art)
    typer.echo(f"served here: {choice.file} ({choice.runtime}: {choice.reason})")
    if json_out:
        json_out.write_text(json.dumps(meta, indent=2))


@app.command("gate")
def gate_cmd(
    candidate: Path = typer.Argument(..., help="Candidate EvalReport JSON."),
    champion: Path | None = typer.Option(None, help="Champion EvalReport JSON (none: first model)."),
    min_retention: float = typer.Option(0.97, help="Minimum student/teacher accuracy ratio."),
    max_slice_drop: float = typer.Option(0.01, help="Largest allowed accuracy drop on any domain vs the champion."),
    max_p99_ms: float | None = typer.Option(None, help="Batch-1 p99 latency budget in ms."),
) -> None:
    """Decide promote / review / reject for a candidate report; exit code 0 only for promote."""
    from kdops.gate import GateThresholds, gate

    th = GateThresholds(min_retention=min_retention, max_slice_drop=max_slice_drop, max_p99_ms=max_p99_ms)
    d = gate(json.loads(candidate.read_text()), json.loads(champion.read_text()) if champion else None, th)
    typer.echo(json.dumps(d.to_dict(), indent=2))
    raise typer.Exit(0 if d.action == "promote" else 1)


if __name__ == "__main__":
    app()
