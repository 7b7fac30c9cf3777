"""What every command shares: the project in force, data specs, the teacher, one-line errors.

The top-level ``kdops`` app (flows/cli.py) puts a ``Session`` in the click context: the project file
(``--project`` or ``./kdops.toml``, read on first use) and how to open a teacher served by Triton (only the full
app can: the library does not import serving). Flags override the project file; the project file overrides the
built-in defaults.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import typer

from kdops.data import DataSchema, Snapshot
from kdops.errors import LabelMismatch, UserError
from kdops.project import Project, find

DATA_HELP = ("A file (.csv/.jsonl/.parquet), a snapshot id, or a built-in corpus as corpus:NAME[:SPLIT[:DOMAIN,...]], "
             "e.g. corpus:sentiment:train:movie")


def setup() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "httpcore", "urllib3", "openai"):  # one line per HTTP call otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fail(e: Exception | str) -> None:
    """A user error: one red line on stderr, exit code 2."""
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@dataclass
class Session:
    """The project in force and the ways to open teachers, shared by every command of one invocation."""

    project_file: Path | None = None
    remote_teacher: Callable[[str, str], object] | None = field(default=None, repr=False)
    debug: bool = False  # show the traceback of user errors

    @cached_property
    def project(self) -> Project:
        return find(self.project_file) or Project()

    @property
    def has_project(self) -> bool:
        return self.project.source is not None

    def schema(self, **overrides) -> DataSchema:
        d = self.project.data
        values = {"text_column": d.text_column, "label_column": d.label_column or None, "id_column": d.id_column or None,
                  "domain_column": d.domain_column or None, "max_chars": d.max_chars}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return DataSchema(**values)

    def data(self, spec: str, limit_per_domain: int | None = None, what: str = "data") -> Snapshot:
        """A data spec (file, snapshot id, corpus:...) from a flag or the project file, as a snapshot."""
        if not spec:
            raise UserError(f"no {what} given: pass it as an option or set [data] {what} in kdops.toml.")
        return resolve_data(self.project.resolve(spec), self.schema(), limit_per_domain)

    def teacher_location(self, teacher_dir: Path | None = None, url: str | None = None,
                         model: str | None = None) -> tuple[Path | None, str, str]:
        """(local dir, url, model) of the teacher: flags, else the project's [teacher], else the bootstrapped one."""
        if teacher_dir or url:
            return teacher_dir, url or "", model or ""
        t = self.project.teacher
        if t.kind == "openai":  # not a location: ``teacher_api`` carries it
            return None, "", ""
        if t.remote:
            return None, t.url, t.model
        if t.path:
            return self.project.teacher_path, "", ""
        if self.has_project:
            raise UserError(f"{self.project.source}: no teacher; set [teacher] path (and run `kdops teacher train`) "
                            "or [teacher] url and model for a teacher served by Triton.")
        return default_teacher_dir(), "", ""

    def teacher_api(self, teacher_dir: Path | None = None, url: str | None = None) -> str:
        """The project's API teacher as a flow parameter (JSON, no key), or "" (none, or flags name another)."""
        if teacher_dir or url:
            return ""
        from kdops.paths import Home

        cfg = self.project.api_teacher(cache=Home.from_env().api_answers)
        return cfg.to_json() if cfg is not None else ""

    def teacher(self, teacher_dir: Path | None = None, url: str | None = None, model: str | None = None,
                device: str = "cpu"):
        """Open the teacher; its labels must be the ones the project declares."""
        from kdops import kinds

        api = self.teacher_api(teacher_dir, url)
        if api:
            from kdops.api_teacher import ApiTeacherConfig

            return kinds.get(self.project.kind).load_teacher(kinds.TeacherSpec(api=ApiTeacherConfig.from_json(api)))
        directory, url, model = self.teacher_location(teacher_dir, url, model)
        if not url and not (Path(directory) / "config.json").is_file():
            how = ("run `kdops teacher train`" if self.has_project else "run `kdops teacher bootstrap` or pass --teacher-dir")
            raise UserError(f"no teacher model at {directory}: {how}.")

        def remote(spec):
            if self.remote_teacher is None:
                raise UserError("a Triton teacher needs the full `kdops` command (serving/ opens it).")
            return self.remote_teacher(spec.url, spec.model)

        spec = kinds.TeacherSpec(path=str(directory or ""), url=url, model=model)
        teacher = kinds.get(self.project.kind).load_teacher(spec, device=device, remote=remote)
        declared = list(self.project.task.labels)
        if declared and hasattr(teacher, "label_names") and declared != list(teacher.label_names):
            raise LabelMismatch(f"the teacher {directory or url + '/' + model} has labels {list(teacher.label_names)} but "
                                f"kdops.toml declares {declared}; retrain it with `kdops teacher train` or fix [task] labels.")
        return teacher

    def aligned(self, snap: Snapshot, teacher_labels, source: str):
        """The snapshot's rows with labels mapped onto the teacher's; LabelMismatch if they cannot be."""
        from kdops.labels import align_labels

        if teacher_labels is None:  # a causal LM has no labels: its data is text alone
            return snap.rows
        return align_labels(snap.rows, teacher_labels, self.project.task.label_map, source=source)


def session(ctx: typer.Context | None) -> Session:
    """The invocation's session; a command run from ``kdops.cli`` alone gets one without remote teachers."""
    obj = ctx.find_root().obj if ctx is not None else None
    if isinstance(obj, Session):
        return obj
    s = Session()
    if ctx is not None:
        ctx.find_root().obj = s
    return s


def default_teacher_dir() -> Path:
    from kdops.paths import subdir

    return subdir("teachers") / "minilm-sentiment"


def resolve_data(spec: str, schema: DataSchema | None = None, limit_per_domain: int | None = None) -> Snapshot:
    """Turn a data spec (file, snapshot id, corpus:...) into a snapshot, ingesting files on the way."""
    from kdops import corpora
    from kdops.data import DataError, ingest
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
    if "/" in spec or "." in spec:
        raise DataError(f"{spec}: no such file (nor a snapshot id or corpus:NAME).")
    return Snapshot.load(home() / "snapshots", spec)
