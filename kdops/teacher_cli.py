"""``kdops teacher``: train a teacher on the user's labels, bootstrap the sentiment one, label data with it."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from kdops.cli_common import DATA_HELP, session, setup
from kdops.errors import UserError

teacher_app = typer.Typer(help="Teachers: train one on your labels, and their cached soft labels.", no_args_is_help=True)


def teacher_report(teacher, rows) -> dict:
    """Accuracy, macro-F1 and per-label F1 of a teacher on labelled rows (its EvalReport)."""
    import numpy as np

    from kdops.evaluate import accuracy, macro_f1

    names = list(teacher.label_names)
    y = rows["label"].map({n: i for i, n in enumerate(names)}).to_numpy()
    pred = teacher.logits(rows["text"].tolist()).argmax(-1)
    per_label = {}
    for i, n in enumerate(names):
        tp, fp, fn = int(((pred == i) & (y == i)).sum()), int(((pred == i) & (y != i)).sum()), int(((pred != i) & (y == i)).sum())
        per_label[n] = {"f1": 2 * tp / max(1, 2 * tp + fp + fn), "n": int((y == i).sum())}
    per_domain = {str(d): {"accuracy": accuracy(pred[idx], y[idx]), "n": int(len(idx))}
                  for d, idx in rows.groupby(rows["domain"].fillna("all")).indices.items()}
    return {"accuracy": accuracy(pred, y), "macro_f1": macro_f1(pred, y, len(names)), "n": int(len(y)),
            "per_label": per_label, "per_domain": per_domain, "labels": names, "majority_share": float(np.bincount(y).max() / len(y))}


@teacher_app.command("train")
def teacher_train(
    ctx: typer.Context,
    train: str = typer.Option(None, help=f"Labelled training data (default: kdops.toml's [data] train). {DATA_HELP}"),
    val: str = typer.Option(None, help="Labelled validation data for early stopping (default: kdops.toml's [data] val, else a seeded 10 % of train)."),
    base: Path = typer.Option(None, help="A local transformers encoder directory to fine-tune (default: kdops.toml's [teacher] base, else the shipped MiniLM)."),
    out: Path = typer.Option(None, help="Where to write the teacher (default: kdops.toml's [teacher] path, else <home>/teachers/<name>)."),
    epochs: float = typer.Option(None, help="Most passes over the data; early stopping on validation may end sooner (default: kdops.toml's, else 3)."),
    max_length: int = typer.Option(None, help="Token limit while fine-tuning (default 64; raise it for long texts)."),
    limit: int = typer.Option(None, help="Train on a seeded sample of this many rows (a quick look)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Fine-tune a base encoder into a classifier on your labels: early stopping on validation, an evaluation
    report and an MLflow run (experiment kdops-teachers). Cached: the same data and settings train once."""
    setup()
    from dataclasses import replace

    from kdops.labels import data_labels
    from kdops.paths import Home
    from kdops.registry.tracking import Tracking
    from kdops.teacher import HFTeacher, TeacherTrainConfig, train_teacher

    s = session(ctx)
    p = s.project
    snap = s.data(train or p.data.train, what="train")
    rows = snap.rows[snap.rows["label"].notna()].reset_index(drop=True)
    if rows.empty:
        raise UserError(f"{train or p.data.train} has no labels to train a teacher on; name the label column "
                        "with --label-column at `kdops init` or [data] label_column in kdops.toml.")
    labels = list(p.task.labels) or data_labels(rows)
    rows = s.aligned(snap, labels, train or p.data.train)
    rows = rows[rows["label"].notna()].reset_index(drop=True)
    if limit:
        rows = rows.sample(n=min(limit, len(rows)), random_state=13).reset_index(drop=True)
    val_spec = val or p.data.val
    val_rows = None
    if val_spec:
        vrows = s.aligned(s.data(val_spec, what="val"), labels, val_spec)
        val_rows = vrows[vrows["label"].notna()].reset_index(drop=True)
    out = out or p.teacher_path or Home.from_env().teachers / (p.serve.model if s.has_project else "teacher")
    cfg = replace(TeacherTrainConfig(), epochs=epochs or p.teacher.epochs, limit_per_domain=None,
                  **({"max_length": max_length} if max_length else {}))
    base = base or (Path(p.resolve(p.teacher.base)) if p.teacher.base else None)
    typer.echo(f"teacher: {len(rows)} rows, labels {labels}, base {base or 'shipped MiniLM'} -> {out}")
    res = train_teacher(out, rows, labels, cfg, val_rows=val_rows, base=base, device=device)
    teacher = HFTeacher(res.path, device=device)
    held_out = val_rows if val_rows is not None and len(val_rows) else None
    report = teacher_report(teacher, held_out) if held_out is not None else {"best_val_accuracy": res.best_val_accuracy}
    report_path = Path(res.path) / "eval_report.json"
    report_path.write_text(json.dumps({**report, "history": res.history}, indent=2))
    with Tracking().run(f"teacher-{teacher.id}", experiment="kdops-teachers",
                        tags={"kdops.teacher_id": teacher.id, "kdops.snapshot.train": snap.id}) as run:
        run.log_params({"train": cfg.__dict__, "labels": labels, "base": str(base or "minilm"), "rows": len(rows)})
        for h in res.history:
            run.log_metrics({k: v for k, v in h.items() if k != "epoch"}, step=int(h.get("epoch", 0)))
        run.log_eval_report(report, name="teacher_eval_report")
    acc = report.get("accuracy", res.best_val_accuracy)
    how = "cached" if res.cached else f"trained in {res.seconds:.0f} s"
    typer.echo(f"teacher {teacher.id} at {res.path}: {how}; validation accuracy {acc:.3f}"
               + (f", macro-F1 {report['macro_f1']:.3f}" if "macro_f1" in report else "") + f"; report {report_path}")


@teacher_app.command("bootstrap")
def teacher_bootstrap(
    epochs: float = typer.Option(1.0, help="Passes over the training rows."),
    limit_per_domain: int = typer.Option(2000, help="Seeded sentences per domain (0 = all ~15.5k)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Fine-tune the shipped MiniLM into the sentiment teacher of the demo (all four domains). Cached after the
    first run. The same as `kdops teacher train` on examples/sentiment."""
    setup()
    from kdops.teacher import TeacherTrainConfig, bootstrap_sentiment_teacher

    path = bootstrap_sentiment_teacher(TeacherTrainConfig(epochs=epochs, limit_per_domain=limit_per_domain or None), device=device)
    typer.echo(f"teacher: {path}")


@teacher_app.command("label")
def teacher_label(
    ctx: typer.Context,
    data: str = typer.Argument(..., help=DATA_HELP),
    teacher_dir: Path | None = typer.Option(None, help="Teacher model directory (default: kdops.toml's [teacher], else the bootstrapped one)."),
    teacher_url: str | None = typer.Option(None, help="A teacher served by Triton: HTTP host:port (with --teacher-model)."),
    teacher_model: str | None = typer.Option(None, help="The Triton teacher's model name."),
) -> None:
    """Compute (or reuse) the teacher's soft labels for a data set and report cache hits and misses."""
    setup()
    from kdops.paths import home
    from kdops.soft_labels import SoftLabelCache

    s = session(ctx)
    snap = s.data(data)
    teacher = s.teacher(teacher_dir, teacher_url, teacher_model)
    s.aligned(snap, teacher.label_names, data)  # labelled data must be about the teacher's labels
    cache = SoftLabelCache(home() / "soft_labels.sqlite")
    cache.get_or_compute(teacher, snap.texts, progress=True)
    typer.echo(f"teacher {teacher.id}: {json.dumps(cache.stats.to_dict())}")
