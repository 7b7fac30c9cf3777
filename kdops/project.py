"""The project file: a user's task declared once, in ``kdops.toml``.

Every command and ``kdops up`` read it from the working directory (or ``--project FILE``); command-line flags
override single fields. Paths in it are relative to the file's directory. A minimal file:

    [task]
    kind = "classifier"                   # or "causal-lm"
    labels = ["neg", "pos"]

    [data]
    train = "data/train.csv"
    text_column = "review"
    label_column = "sentiment"

    [teacher]
    path = "teachers/mine"                # a local transformers directory (or url + model: a Triton teacher)

Sections: task, data, teacher, student, gate, monitor, schedule, serve. ``kdops init`` writes one from flags.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kdops.kind import Kind
from kdops.errors import UserError

FILENAME = "kdops.toml"


class ProjectError(UserError):
    """A project file that is missing, does not parse, or names something that does not exist."""


@dataclass(frozen=True)
class TaskSection:
    kind: str = field(default=Kind.CLASSIFIER.value, metadata={"help": "classifier or causal-lm."})
    labels: tuple[str, ...] = field(default=(), metadata={"help": "The teacher's label set, in output order (classifier)."})
    label_map: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Data label -> teacher label, for data that names the teacher's labels differently (fresh = \"pos\")."})

    def __post_init__(self) -> None:
        if self.kind not in {k.value for k in Kind}:
            raise ProjectError(f"[task] kind = {self.kind!r}: use one of {[k.value for k in Kind]}.")
        if len(set(self.labels)) != len(self.labels):
            raise ProjectError(f"[task] labels must be unique, got {list(self.labels)}.")
        unknown = sorted(set(self.label_map.values()) - set(self.labels)) if self.labels else []
        if unknown:
            raise ProjectError(f"[task] label_map maps onto {unknown}, which are not in labels {list(self.labels)}.")


@dataclass(frozen=True)
class DataSection:
    train: str = field(default="", metadata={"help": "Training data: a file, a snapshot id or corpus:NAME[:SPLIT]."})
    val: str = field(default="", metadata={"help": "Validation data (early stopping); empty: none."})
    test: str = field(default="", metadata={"help": "Held-out evaluation data; empty: none."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    label_column: str = field(default="label", metadata={"help": "Column holding the label ('' for unlabelled data)."})
    id_column: str = field(default="", metadata={"help": "Column with unique row ids ('' derives ids from content)."})
    domain_column: str = field(default="domain", metadata={"help": "Optional slice column."})
    max_chars: int = field(default=2000, metadata={"help": "Longer texts are quarantined."})
    watch: str = field(default="", metadata={"help": "A directory where new data files land; each is ingested once and queued."})


@dataclass(frozen=True)
class TeacherSection:
    kind: str = field(default="", metadata={"help": "openai: a model behind an OpenAI-compatible API (url = its base URL); '' : path, or url + model on Triton."})
    path: str = field(default="", metadata={"help": "A local transformers classifier directory (kdops teacher train writes one)."})
    base: str = field(default="", metadata={"help": "Base encoder `kdops teacher train` fine-tunes ('' : the shipped MiniLM)."})
    url: str = field(default="", metadata={"help": "A served teacher: Triton's HTTP host:port, or the API's base URL (kind = openai)."})
    model: str = field(default="", metadata={"help": "A served teacher: its model name."})
    epochs: float = field(default=3.0, metadata={"help": "`kdops teacher train`: most passes over the data (early stopping may end sooner)."})
    api: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "kind = openai: prompt, endpoint, method, api_key_env, concurrency, timeout_s, max_retries, max_requests, max_tokens, tokenizer (kdops.api_teacher.ApiTeacherConfig)."})
    label_words: dict[str, str] = field(default_factory=dict, metadata={
        "help": "kind = openai: the word the model answers for a label, where it is not the label itself (pos = \"positive\")."})

    def __post_init__(self) -> None:
        if self.kind not in ("", "openai"):
            raise ProjectError(f"[teacher] kind = {self.kind!r}: use \"openai\" or leave it out.")
        if self.path and self.url:
            raise ProjectError("[teacher] set either path (a local model) or url + model (a served teacher), not both.")
        if bool(self.url) != bool(self.model):
            raise ProjectError("[teacher] a served teacher needs both url and model.")
        if self.kind == "openai" and not self.url:
            raise ProjectError("[teacher] kind = \"openai\" needs url (the API's base URL) and model.")
        if (self.api or self.label_words) and self.kind != "openai":
            raise ProjectError("[teacher.api] and [teacher.label_words] apply to kind = \"openai\" only.")

    @property
    def remote(self) -> bool:
        return bool(self.url)


@dataclass(frozen=True)
class StudentSection:
    recipe: str = field(default="", metadata={"help": "Named recipe (kdops/recipes.py); '' : the kind's default."})
    layers: int = field(default=0, metadata={"help": "Student layers (0: the recipe's)."})
    embedding_size: int = field(default=-1, metadata={"help": "Rank of factorised embeddings (0: full, -1: the recipe's)."})
    epochs: int = field(default=0, metadata={"help": "Distillation epochs (0: the recipe's)."})


@dataclass(frozen=True)
class GateSection:
    min_retention: float = field(default=0.97, metadata={"help": "Lowest student/teacher accuracy ratio promoted."})
    max_slice_drop: float = field(default=0.01, metadata={"help": "Largest accuracy drop on any domain vs the champion."})

    def __post_init__(self) -> None:
        if not 0.0 < self.min_retention <= 1.5 or self.max_slice_drop < 0:
            raise ProjectError(f"[gate] min_retention must be in (0, 1.5] and max_slice_drop >= 0, got "
                               f"{self.min_retention} and {self.max_slice_drop}.")


@dataclass(frozen=True)
class MonitorSection:
    interval_s: float = field(default=300.0, metadata={"help": "Seconds between monitor ticks."})
    window_s: float = field(default=3600.0, metadata={"help": "A tick looks back at most this many seconds."})
    min_rows: int = field(default=200, metadata={"help": "A tick checks a window once it holds this many predictions."})


@dataclass(frozen=True)
class ScheduleSection:
    retrain_cron: str = field(default="", metadata={"help": "Cron for retraining rounds on newly arrived data ('' : none)."})
    retrain_interval_s: float = field(default=0.0, metadata={"help": "Or an interval in seconds (0: none)."})

    def __post_init__(self) -> None:
        if self.retrain_cron and self.retrain_interval_s:
            raise ProjectError("[schedule] set retrain_cron or retrain_interval_s, not both.")
        if self.retrain_cron and len(self.retrain_cron.split()) != 5:
            raise ProjectError(f"[schedule] retrain_cron = {self.retrain_cron!r} is not a 5-field cron expression.")


@dataclass(frozen=True)
class ServeSection:
    model: str = field(default="kdops-student", metadata={"help": "Registered and served model name."})
    runtime: str = field(default="auto", metadata={"help": "auto: a classifier on CPU serves its ONNX graph (INT8 where its accuracy gate passed); torch: the torch student."})
    redact_texts: bool = field(default=False, metadata={"help": "The prediction log keeps each text's SHA-256, not the text (drift checks on text then have nothing to read)."})

    def __post_init__(self) -> None:
        if self.runtime not in ("auto", "torch"):
            raise ProjectError(f"[serve] runtime must be auto or torch, not {self.runtime!r}.")


SECTIONS = {"task": TaskSection, "data": DataSection, "teacher": TeacherSection, "student": StudentSection,
            "gate": GateSection, "monitor": MonitorSection, "schedule": ScheduleSection, "serve": ServeSection}


@dataclass(frozen=True)
class Project:
    """A parsed ``kdops.toml``; ``root`` is the directory relative paths in it are resolved against."""

    root: Path = field(default_factory=Path.cwd)
    task: TaskSection = field(default_factory=TaskSection)
    data: DataSection = field(default_factory=DataSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    student: StudentSection = field(default_factory=StudentSection)
    gate: GateSection = field(default_factory=GateSection)
    monitor: MonitorSection = field(default_factory=MonitorSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    serve: ServeSection = field(default_factory=ServeSection)
    source: Path | None = None

    @property
    def kind(self) -> Kind:
        return Kind(self.task.kind)

    def resolve(self, value: str) -> str:
        """A path in the file, made absolute against its directory; data specs that are not paths pass through."""
        if not value or value.startswith("corpus:") or Path(value).is_absolute():
            return value
        candidate = self.root / value
        looks_like_path = "/" in value or "." in Path(value).name or candidate.exists()
        return str(candidate) if looks_like_path else value

    @property
    def teacher_path(self) -> Path | None:
        if not self.teacher.path:
            return None
        path = Path(self.teacher.path).expanduser()
        return path if path.is_absolute() else self.root / path

    def api_teacher(self, cache: str | Path = ""):
        """The ``kdops.api_teacher.ApiTeacherConfig`` of a ``kind = "openai"`` teacher, else None."""
        t = self.teacher
        if t.kind != "openai":
            return None
        from kdops.api_teacher import ApiTeacherConfig

        options = dict(t.api)
        if options.get("tokenizer"):
            options["tokenizer"] = self.resolve(str(options["tokenizer"]))
        labels = self.task.labels if self.kind == Kind.CLASSIFIER else ()
        try:
            return ApiTeacherConfig.from_options(t.url, t.model, options, labels, t.label_words, str(cache))
        except (TypeError, UserError) as e:
            raise ProjectError(f"{self.source or 'project'}: [teacher] {e}") from e

    @classmethod
    def from_dict(cls, d: dict[str, Any], root: Path, source: Path | None = None) -> "Project":
        unknown = sorted(set(d) - set(SECTIONS))
        if unknown:
            raise ProjectError(f"{source or 'project'}: unknown section(s) {unknown}; known: {sorted(SECTIONS)}.")
        sections = {}
        for name, section in SECTIONS.items():
            values = d.get(name, {})
            if not isinstance(values, dict):
                raise ProjectError(f"{source or 'project'}: [{name}] must be a table.")
            known = {f.name for f in fields(section)}
            bad = sorted(set(values) - known)
            if bad:
                raise ProjectError(f"{source or 'project'}: unknown key(s) {bad} in [{name}]; known: {sorted(known)}.")
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
            try:
                sections[name] = section(**values)
            except TypeError as e:
                raise ProjectError(f"{source or 'project'}: [{name}] {e}.") from e
        return cls(root=root, source=source, **sections)

    @classmethod
    def load(cls, path: str | Path) -> "Project":
        path = Path(path)
        if not path.is_file():
            raise ProjectError(f"{path}: no such project file; write one with `kdops init`.")
        try:
            d = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ProjectError(f"{path}: not valid TOML ({e}).") from e
        return cls.from_dict(d, path.resolve().parent, path)

    def to_dict(self) -> dict[str, dict]:
        return {name: asdict(getattr(self, name)) for name in SECTIONS}

    def to_toml(self) -> str:
        """Every section with every key, each with its help as a comment: the file documents itself."""
        lines = ["# kdops project file: every command in this directory reads it (flags override single keys).",
                 "# Paths are relative to this file. `kdops --help` and the README's \"Your own task\" explain each step.", ""]
        for name, section in SECTIONS.items():
            value = getattr(self, name)
            lines.append(f"[{name}]")
            for f in fields(section):
                v = getattr(value, f.name)
                if isinstance(v, dict):
                    continue
                lines.append(f"{f.name} = {_toml_value(v)}  # {f.metadata.get('help', '')}")
            for f in fields(section):
                v = getattr(value, f.name)
                if isinstance(v, dict):
                    lines.append(f"\n[{name}.{f.name}]  # {f.metadata.get('help', '')}")
                    lines.extend(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in sorted(v.items()))
            lines.append("")
        return "\n".join(lines)

    def write(self, path: str | Path) -> Path:
        from kdops.paths import atomic_write

        text = self.to_toml()
        tomllib.loads(text)  # what we write must read back
        return atomic_write(path, text)

    def with_(self, section: str, **changes) -> "Project":
        """A copy with single keys of one section replaced (flags overriding the file)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return replace(self, **{section: replace(getattr(self, section), **changes)}) if changes else self


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def _toml_value(v: Any) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def find(explicit: str | Path | None = None) -> Project | None:
    """The project in force: ``explicit`` (an error if missing), else ``./kdops.toml`` if there is one."""
    if explicit:
        return Project.load(explicit)
    here = Path.cwd() / FILENAME
    return Project.load(here) if here.is_file() else None
