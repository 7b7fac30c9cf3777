"""``kdops init``: write ``kdops.toml`` for the user's task from flags, asking in a terminal for what is missing."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import typer

from kdops.errors import UserError
from kdops.project import FILENAME, DataSection, GateSection, MonitorSection, Project, ScheduleSection, ServeSection, \
    StudentSection, TaskSection, TeacherSection


def _ask(interactive: bool, prompt: str, default: str) -> str:
    return typer.prompt(prompt, default=default) if interactive else default


def _peek(spec: str, text_column: str, label_column: str):
    """The data's rows (raw columns) for a file, or a built-in corpus in kdops columns."""
    from kdops.data import read_table

    if spec.startswith("corpus:"):
        from kdops.cli_common import resolve_data

        return resolve_data(spec).rows, "text", "label"
    df, _ = read_table(spec)
    return df, text_column, label_column


def _split(df, out_dir: Path, holdout: float, text_column: str) -> tuple[str, str]:
    """A seeded train/test split by a hash of the text (stable when rows are added), written beside kdops.toml."""
    import hashlib

    out_dir.mkdir(parents=True, exist_ok=True)
    bucket = df[text_column].astype(str).map(lambda t: int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF)
    test = bucket < holdout
    df[~test].to_csv(out_dir / "train.csv", index=False)
    df[test].to_csv(out_dir / "test.csv", index=False)
    return str(out_dir / "train.csv"), str(out_dir / "test.csv")


def init_cmd(
    data: str = typer.Option(None, "--data", help="Your labelled data (CSV, JSONL, Parquet or corpus:NAME); split into train and test with --holdout."),
    train: str = typer.Option(None, "--train", help="Training data, when you have your own split (with --test)."),
    test: str = typer.Option(None, "--test", help="Held-out evaluation data."),
    val: str = typer.Option("", "--val", help="Validation data for early stopping (default: a seeded 10 % of train)."),
    holdout: float = typer.Option(0.2, "--holdout", min=0.0, max=0.9, help="With --data: the share held out as test data."),
    kind: str = typer.Option("classifier", "--kind", help="classifier or causal-lm."),
    text_column: str = typer.Option(None, "--text-column", help="Column holding the text (default 'text')."),
    label_column: str = typer.Option(None, "--label-column", help="Column holding the label (default 'label'; '' : unlabelled)."),
    labels: str = typer.Option(None, "--labels", help="Comma-separated label set in output order (default: read from the data)."),
    teacher_dir: str = typer.Option("", "--teacher-dir", help="An existing local teacher (default: one `kdops teacher train` writes to ./teacher)."),
    teacher_url: str = typer.Option("", "--teacher-url", help="A served teacher: Triton's HTTP host:port, or with --teacher-kind openai the API's base URL (http://host:port/v1)."),
    teacher_model: str = typer.Option("", "--teacher-model", help="The served teacher's model name."),
    teacher_kind: str = typer.Option("", "--teacher-kind", help="openai: the teacher is behind an OpenAI-compatible API (vLLM, SGLang, llama.cpp, hosted); its key is read from $OPENAI_API_KEY ([teacher.api] api_key_env)."),
    base: str = typer.Option("", "--base", help="Base encoder `kdops teacher train` fine-tunes (default: the shipped MiniLM)."),
    recipe: str = typer.Option("", "--recipe", help="Distillation recipe (kdops/recipes.py; default: the kind's)."),
    model: str = typer.Option(None, "--model", help="Registered and served model name (default: kdops-<directory>)."),
    min_retention: float = typer.Option(0.97, "--min-retention", help="Gate: lowest student/teacher accuracy ratio promoted."),
    watch: str = typer.Option("", "--watch", help="A directory where new data files land; `kdops up` ingests and queues each."),
    retrain_cron: str = typer.Option("", "--retrain-cron", help="Cron for retraining rounds on new data, e.g. '0 3 * * *'."),
    retrain_interval: float = typer.Option(0.0, "--retrain-interval", help="Or an interval in seconds."),
    monitor_interval: float = typer.Option(300.0, "--monitor-interval", help="Seconds between drift checks of served traffic."),
    out: Path = typer.Option(Path(FILENAME), "--out", help="Where to write the project file."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing project file."),
) -> None:
    """Write kdops.toml for your task: what the data looks like, its labels, the teacher, the gate, the monitor and
    schedules. Every command in this directory then reads it (flags still override)."""
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to overwrite it.")
    root = out.resolve().parent
    data = data if data is not None or train else _ask(interactive, "Your labelled data (file or corpus:NAME)", "")
    first = data or train
    if not first:
        raise UserError("no data: pass --data FILE (split for you) or --train FILE --test FILE.")
    text_column = text_column or "text"
    label_column = "label" if label_column is None else label_column
    df, tcol, lcol = _peek(first, text_column, label_column)
    columns = [str(c) for c in df.columns]
    typer.echo(f"{first}: {len(df)} rows, columns {columns}")
    if tcol not in df.columns:
        tcol = text_column = _ask(interactive, "Text column", columns[0])
        if tcol not in df.columns:
            raise UserError(f"{first} has no column {tcol!r}; pass --text-column (columns: {columns}).")
    if lcol and lcol not in df.columns:
        lcol = label_column = _ask(interactive, "Label column ('' for unlabelled data)", "")
        if lcol and lcol not in df.columns:
            raise UserError(f"{first} has no column {lcol!r}; pass --label-column (columns: {columns}).")
    found = df[lcol].dropna().astype(str).value_counts() if lcol else None
    if labels:
        label_set = tuple(x.strip() for x in labels.split(",") if x.strip())
    else:
        label_set = tuple(sorted(found.index)) if found is not None else ()
    if found is not None:
        typer.echo(f"labels ({len(found)}): " + ", ".join(f"{k} {v}" for k, v in sorted(found.items())))
    if kind == "classifier" and lcol and len(label_set) < 2:
        raise UserError(f"{first}: column {lcol!r} holds {len(label_set)} label(s); a classifier needs at least 2.")
    if data and not data.startswith("corpus:"):
        train, test = _split(df, root / "data", holdout, tcol)
        typer.echo(f"split {holdout:.0%} held out: {root / 'data'}/train.csv, test.csv")
    elif data:
        train, test = f"{data}:train" if data.count(":") == 1 else data, test or (f"{data}:test" if data.count(":") == 1 else "")
    name = model or "kdops-" + (re.sub(r"[^a-z0-9-]+", "-", root.name.lower()).strip("-") or "student")
    teacher = TeacherSection(kind=teacher_kind, path=teacher_dir or ("" if teacher_url else "teacher"), url=teacher_url,
                             model=teacher_model, base=base)
    project = Project(
        root=root, task=TaskSection(kind=kind, labels=label_set),
        data=DataSection(train=_rel(train, root), val=_rel(val, root), test=_rel(test or "", root), text_column=text_column,
                         label_column=label_column, watch=watch),
        teacher=teacher, student=StudentSection(recipe=recipe), gate=GateSection(min_retention=min_retention),
        monitor=MonitorSection(interval_s=monitor_interval),
        schedule=ScheduleSection(retrain_cron=retrain_cron, retrain_interval_s=retrain_interval),
        serve=ServeSection(model=name))
    project.write(out)
    typer.echo(f"wrote {out}: {kind}, {len(label_set)} labels, teacher "
               f"{teacher.url + '/' + teacher.model if teacher.url else teacher.path}, served as {name}")
    if not teacher_dir and not teacher_url:
        typer.echo("next: kdops teacher train")


def _rel(path: str, root: Path) -> str:
    """Paths inside the project directory are written relative to it, so the directory can move."""
    if not path or path.startswith("corpus:") or not Path(path).exists():
        return path
    p = Path(path).resolve()
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)
