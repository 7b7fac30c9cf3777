"""Library commands: data, teacher, distill, evaluate, gate. The top-level ``kdops`` app (flows/cli.py)
mounts these beside serving, registry, review and the demo."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import typer

from kdops.data import DataError, DataSchema, Snapshot

app = typer.Typer(help="kdops library commands.", no_args_is_help=True, pretty_exceptions_show_locals=False)
data_app = typer.Typer(help="Ingest and validate data into content-addressed snapshots.", no_args_is_help=True)
teacher_app = typer.Typer(help="Teachers and their cached soft labels.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(teacher_app, name="teacher")

DATA_HELP = ("A file (.csv/.jsonl/.parquet), a snapshot id, or a built-in corpus as corpus:NAME[:SPLIT[:DOMAIN,...]], "
             "e.g. corpus:sentiment:train:movie")


def _setup() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def resolve_data(spec: str, schema: DataSchema | None = None, limit_per_domain: int | None = None) -> Snapshot:
    """Turn a data spec (file, snapshot id, corpus:...) into a snapshot, ingesting files on the way."""
    from kdops import corpora
    from kdops.data import ingest
    from kdops.paths import home

    if spec.startswith("corpus:"):
        parts = spec.split(":")
        name = parts[1]
        split = parts[2] if len(parts) > 2 and parts[2] else None
        domains = tuple(parts[3].split(",")) if len(parts) > 3 and parts[3] else None
        return corpora.load(name, split=split, domains=domains, limit_per_domain=limit_per_domain)
    if Path(spec).exists():
        snap, report = ingest(spec, schema or DataSchema(), home())
        typer.echo(report.summary())
        return snap
    return Snapshot.load(home() / "snapshots", spec)


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@data_app.command("ingest")
def data_ingest(
    path: Path = typer.Argument(..., help="CSV, JSONL or Parquet file."),
    text_column: str = typer.Option("text", help="Column holding the text."),
    label_column: str = typer.Option("label", help="Column holding the label ('' for unlabelled data)."),
    id_column: str = typer.Option("", help="Column holding unique row ids ('' derives ids from content)."),
    domain_column: str = typer.Option("domain", help="Optional slice column."),
    labels: str = typer.Option("", help="Comma-separated allowed labels; others are quarantined."),
    max_chars: int = typer.Option(2000, help="Texts longer than this are quarantined."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the ingest report here as JSON."),
) -> None:
    """Validate a file; good rows become a snapshot, bad rows go to a quarantine file with the reason."""
    _setup()
    from kdops.data import ingest
    from kdops.paths import home

    schema = DataSchema(text_column=text_column, label_column=label_column or None, id_column=id_column or None,
                        domain_column=domain_column or None, labels=tuple(labels.split(",")) if labels else None,
                        max_chars=max_chars)
    try:
        _, report = ingest(path, schema, home())
    except DataError as e:
        _fail(e)
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
    _setup()
    from kdops.paths import home

    try:
        snap = resolve_data(spec if spec.startswith("corpus:") else f"corpus:{spec}", limit_per_domain=limit_per_domain)
    except DataError as e:
        _fail(e)
    snap.save(home() / "snapshots")
    counts = snap.rows.groupby("domain").size().to_dict()
    typer.echo(f"snapshot {snap.id}: {len(snap)} rows {counts}")


@teacher_app.command("bootstrap")
def teacher_bootstrap(
    epochs: float = typer.Option(1.0, help="Passes over the training rows."),
    limit_per_domain: int = typer.Option(2000, help="Seeded sentences per domain (0 = all ~15.5k)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Fine-tune the shipped MiniLM into the sentiment teacher (all four domains). Cached after the first run."""
    _setup()
    from kdops.teacher import TeacherTrainConfig, bootstrap_sentiment_teacher

    path = bootstrap_sentiment_teacher(TeacherTrainConfig(epochs=epochs, limit_per_domain=limit_per_domain or None), device=device)
    typer.echo(f"teacher: {path}")


def default_teacher_dir() -> Path:
    from kdops.paths import subdir

    return subdir("teachers") / "minilm-sentiment"


@teacher_app.command("label")
def teacher_label(
    data: str = typer.Argument(..., help=DATA_HELP),
    teacher_dir: Path | None = typer.Option(None, help="Teacher model directory (default: the bootstrapped one)."),
) -> None:
    """Compute (or reuse) the teacher's soft labels for a data set and report cache hits and misses."""
    _setup()
    from kdops.paths import home
    from kdops.soft_labels import SoftLabelCache
    from kdops.teacher import HFTeacher

    snap = resolve_data(data)
    teacher = HFTeacher(teacher_dir or default_teacher_dir())
    cache = SoftLabelCache(home() / "soft_labels.sqlite")
    cache.get_or_compute(teacher, snap.texts, progress=True)
    typer.echo(f"teacher {teacher.id}: {json.dumps(cache.stats.to_dict())}")


@app.command("distill")
def distill_cmd(
    train: str = typer.Option(..., help=f"Training data. {DATA_HELP}"),
    val: str | None = typer.Option(None, help="Validation data for early stopping (same forms)."),
    out: Path = typer.Option(..., help="Directory to write the student artifact to."),
    teacher_dir: Path | None = typer.Option(None, help="Teacher model directory (default: the bootstrapped one)."),
    champion: Path | None = typer.Option(None, help="Start from this student (incremental round)."),
    recipe_name: str = typer.Option(None, "--recipe", help="Named recipe (kdops/recipes.py); default: classifier, or classifier-incremental with --champion. The options below override single fields."),
    layers: int | None = typer.Option(None, help="Student layers (new students); default: the recipe's."),
    embedding_size: int | None = typer.Option(None, help="Rank of factorised embeddings (0 = full); default: the recipe's."),
    epochs: int | None = typer.Option(None, help="Epochs; default: the recipe's."),
    batch_size: int | None = typer.Option(None, help="Batch size; default: the recipe's."),
    lr: float | None = typer.Option(None, help="Learning rate; default: the recipe's."),
    limit_per_domain: int | None = typer.Option(None, help="Subsample built-in corpora per domain."),
    config_json: Path | None = typer.Option(None, "--config", help="A DistillConfig as JSON (replaces the recipe's)."),
) -> None:
    """Distil the teacher into a student (full, or incremental from --champion with replay)."""
    _setup()
    from dataclasses import replace

    from kdops.distill import DistillConfig
    from kdops.paths import home
    from kdops.recipes import ClassifierRecipe, recipe
    from kdops.replay import ReplayBuffer
    from kdops.rounds import run_round
    from kdops.soft_labels import SoftLabelCache
    from kdops.teacher import HFTeacher

    try:
        tr = resolve_data(train, limit_per_domain=limit_per_domain)
        va = resolve_data(val, limit_per_domain=limit_per_domain) if val else None
        r = recipe(recipe_name or ("classifier-incremental" if champion else "classifier"))
        if not isinstance(r, ClassifierRecipe):
            raise ValueError(f"recipe {r.name!r} is not a classifier recipe.")
    except (DataError, ValueError) as e:
        _fail(e)
    given = {"epochs": epochs, "batch_size": batch_size, "lr": lr}
    cfg = DistillConfig.from_dict(json.loads(config_json.read_text())) if config_json else \
        replace(r.distill, **{k: v for k, v in given.items() if v is not None})
    shape = replace(r.shape, **({"layers": layers} if layers else {}),
                    **({"embedding_size": embedding_size or None} if embedding_size is not None else {}))
    teacher = HFTeacher(teacher_dir or default_teacher_dir())
    replay_dir = home() / "replay"
    replay = ReplayBuffer.load(replay_dir) if (replay_dir / "replay.json").exists() else ReplayBuffer()
    res = run_round(teacher, SoftLabelCache(home() / "soft_labels.sqlite"), tr.rows, out, cfg,
                    val_rows=va.rows if va else None, shape=shape,
                    champion_dir=champion, replay=replay, snapshot_ids={"train": tr.id, "val": va.id if va else None})
    replay.save(replay_dir)
    typer.echo(f"student: {res.artifact}  history: {json.dumps(res.result.history[-1])}  cache: {json.dumps(res.cache)}")


@app.command("evaluate")
def evaluate_cmd(
    student: Path = typer.Argument(..., help="Student artifact directory."),
    data: str = typer.Option("corpus:sentiment:test", help=f"Labelled evaluation data. {DATA_HELP}"),
    teacher_dir: Path | None = typer.Option(None, help="Teacher model directory (default: the bootstrapped one)."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the EvalReport here."),
    speed: bool = typer.Option(True, help="Measure latency and throughput."),
) -> None:
    """Evaluate a student against the teacher: accuracy per domain, retention, agreement, ECE, robustness, speed."""
    _setup()
    from kdops.artifacts import ArtifactError
    from kdops.evaluate import evaluate
    from kdops.paths import home
    from kdops.predict import Predictor
    from kdops.soft_labels import SoftLabelCache
    from kdops.teacher import HFTeacher

    try:
        predictor = Predictor.from_dir(student)
        snap = resolve_data(data)
    except (ArtifactError, DataError) as e:
        _fail(e)
    teacher = HFTeacher(teacher_dir or default_teacher_dir())
    rows = snap.rows[snap.rows["label"].isin(teacher.label_names)].reset_index(drop=True)
    logits = SoftLabelCache(home() / "soft_labels.sqlite").get_or_compute(teacher, rows["text"].tolist(), progress=True)
    report = evaluate(predictor, rows, logits, teacher.label_names, speed=speed, teacher_params=teacher.num_parameters())
    typer.echo(report.summary())
    if json_out:
        json_out.write_text(json.dumps(report.to_dict(), indent=2))


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
