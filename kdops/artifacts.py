"""Model artifacts on disk: safetensors weights plus JSON, never pickle; one value, one reader, one writer.

Every artifact directory (a classifier student, a causal-LM student) holds its weights (``*.safetensors``),
its tokenizer files and ``kdops.json``:

    {"schema": 2, "kind": "classifier" | "causal-lm", "label_names": [...], "max_length": N,
     "sha256": {file: digest}, "lineage": {teacher_id, snapshot_ids, cache_key, parent_version,
     code_version, config, details}, "extra": {...}}

``Artifact.read`` is the only reader; it migrates the two older layouts (a classifier's ``weights_sha256`` and
lineage vocabulary, an LM's ``parent_artifact`` / ``distill``) on read. ``write_artifact`` is the only writer.
What differs between kinds (how weights become a model) lives in ``kdops.kinds``.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdops.errors import UserError
from kdops.kind import Kind  # noqa: F401  (re-exported: artifacts carry their kind)
from kdops.paths import atomic_dir, atomic_write, file_sha256  # noqa: F401  (file_sha256 re-exported)

if TYPE_CHECKING:  # torch is imported where weights are read or written: reading kdops.json needs none
    import torch

    from kdops.student import StudentModel

WEIGHTS, CONFIG, META = "model.safetensors", "student_config.json", "kdops.json"
SCHEMA = 2


class ArtifactError(UserError):
    """A model artifact that is missing, incomplete or corrupt."""


@lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of the kdops checkout (``+dirty`` when tracked files changed), or ``unknown``: the one
    code version both an artifact's and the registry's lineage record."""
    repo = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "diff", "--quiet", "HEAD"], capture_output=True,
                               timeout=10).returncode != 0
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass(frozen=True)
class Lineage:
    """Where an artifact came from: one schema for every kind."""

    teacher_id: str = field(default="", metadata={"help": "Content id of the teacher whose outputs it learned."})
    snapshot_ids: dict[str, Any] = field(default_factory=dict, metadata={"help": "Snapshots by role (train, eval, replay)."})
    cache_key: str = field(default="", metadata={"help": "Key of the teacher outputs it trained on (soft-label cache)."})
    parent_version: int | None = field(default=None, metadata={"help": "Registry version it continued (None: a first round)."})
    code_version: str = field(default="", metadata={"help": "kdops commit that trained it."})
    config: dict[str, Any] = field(default_factory=dict, metadata={"help": "The round's recipe (distillation config, shape)."})
    details: dict[str, Any] = field(default_factory=dict, metadata={"help": "Kind-specific facts (kept layers, replay rows, tail fit)."})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Lineage":
        """Today's schema, or either older vocabulary migrated (unknown keys land in ``details``)."""
        d = dict(d or {})
        details = dict(d.pop("details", None) or {})
        renames = {"soft_label_cache_key": "cache_key", "distill_config": "config", "distill": "config"}
        for old, new in renames.items():
            if old in d:
                d.setdefault(new, d.pop(old))
        known = {f for f in cls.__dataclass_fields__}
        for k in [k for k in d if k not in known]:
            details[k] = d.pop(k)
        parent = d.get("parent_version")
        d["parent_version"] = int(parent) if parent not in (None, "", "None") else None
        d["snapshot_ids"] = dict(d.get("snapshot_ids") or {})
        d["config"] = dict(d.get("config") or {})
        return cls(**{k: v for k, v in d.items() if k in known}, details=details)


@dataclass(frozen=True)
class Artifact:
    """A model directory on disk and what its ``kdops.json`` says about it. Read once, passed down."""

    path: Path
    kind: Kind
    sha256: dict[str, str]
    lineage: Lineage = field(default_factory=Lineage)
    label_names: tuple[str, ...] = ()
    max_length: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def weights_sha256(self) -> str:
        return self.sha256.get(WEIGHTS, "")

    def to_meta(self) -> dict:
        return {"schema": SCHEMA, "kind": self.kind.value, "label_names": list(self.label_names),
                "max_length": self.max_length, "sha256": self.sha256, "lineage": self.lineage.to_dict(),
                "extra": self.extra}

    @classmethod
    def read(cls, directory: str | Path) -> "Artifact":
        """Read ``kdops.json`` (any schema); ArtifactError names what is wrong."""
        directory = Path(directory)
        try:
            d = json.loads((directory / META).read_text())
        except FileNotFoundError as e:
            raise ArtifactError(f"{directory}: not a kdops artifact ({META} missing).") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{directory}/{META} is not valid JSON ({e}).") from e
        if not isinstance(d, dict):
            raise ArtifactError(f"{directory}/{META} is not a JSON object.")
        try:
            kind = Kind(d.get("kind", Kind.CLASSIFIER.value))
        except ValueError as e:
            raise ArtifactError(f"{directory}/{META}: unknown kind {d.get('kind')!r}.") from e
        sha = dict(d.get("sha256") or {})
        if d.get("weights_sha256"):  # schema 1 classifier
            sha.setdefault(WEIGHTS, d["weights_sha256"])
        if kind is Kind.CLASSIFIER and "label_names" not in d:
            raise ArtifactError(f"{directory}/{META}: no label_names; not a kdops classifier student.")
        lineage = Lineage.from_dict(d.get("lineage"))
        extra = dict(d.get("extra") or {k: d[k] for k in ("full_vocab_size", "trimmed_vocab", "num_parameters") if k in d})
        max_length = int(d.get("max_length") or lineage.details.get("max_length") or 0)
        return cls(directory, kind, sha, lineage, tuple(d.get("label_names") or ()), max_length, extra)

    def verify(self, names=None) -> None:
        """Raise ArtifactError unless every recorded file (or each of ``names``) exists with its recorded digest."""
        for name, digest in self.sha256.items():
            if names is not None and name not in names:
                continue
            path = self.path / name
            if not path.is_file():
                raise ArtifactError(f"{path} missing.")
            if digest and file_sha256(path) != digest:
                raise ArtifactError(f"{path}: checksum mismatch; the file is corrupt or was replaced.")


def read_artifact(directory: str | Path) -> Artifact:
    return Artifact.read(directory)


def write_artifact(directory: str | Path, kind: Kind, lineage: Lineage, label_names=(), max_length: int = 0,
                   extra: dict | None = None) -> Artifact:
    """The one writer of ``kdops.json``, called inside ``atomic_dir`` once the weights are written: hashes every
    ``*.safetensors`` file there, fills in the code version, and returns the value."""
    directory = Path(directory)
    sha = {p.name: file_sha256(p) for p in sorted(directory.glob("*.safetensors"))}
    if WEIGHTS not in sha:
        raise ArtifactError(f"{directory}: {WEIGHTS} must be written before the metadata.")
    if not lineage.code_version:
        lineage = replace(lineage, code_version=code_version())
    art = Artifact(directory, Kind(kind), sha, lineage, tuple(label_names), int(max_length), dict(extra or {}))
    (directory / META).write_text(json.dumps(art.to_meta(), indent=2, default=str))
    return art


def add_files(art: Artifact, files: dict[str, bytes], extra: dict) -> Artifact:
    """Derived files (an ONNX graph of the same weights) added to a finished artifact: each written atomically,
    then ``kdops.json`` rewritten with their digests and ``extra`` merged in, so ``verify`` covers them and a
    reader never sees a digest without its file."""
    sha = dict(art.sha256)
    for name, data in files.items():
        atomic_write(art.path / name, data)
        sha[name] = file_sha256(art.path / name)
    new = replace(art, sha256=sha, extra={**art.extra, **extra})
    atomic_write(art.path / META, json.dumps(new.to_meta(), indent=2, default=str))
    return new


# -- the classifier student's weights ------------------------------------------------------------------


def save_student(directory: str | Path, model: StudentModel, tokenizer, label_names, max_length: int,
                 lineage: Lineage) -> Artifact:
    """Write a classifier student atomically: into a temporary sibling, then renamed into place."""
    from safetensors.torch import save_file

    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(model.config.to_json())
        tokenizer.save_pretrained(str(tmp))
        art = write_artifact(tmp, Kind.CLASSIFIER, lineage, label_names, max_length,
                             {"num_parameters": sum(p.numel() for p in model.parameters())})
    return replace(art, path=directory)


def load_student(directory: str | Path | Artifact, device: str | torch.device = "cpu", verify: bool = True):
    """Load ``(model, tokenizer, artifact)`` of a classifier student; ArtifactError with the reason otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from kdops.student import StudentConfig, StudentModel

    art = directory if isinstance(directory, Artifact) else None
    directory = art.path if art else Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such model directory.")
    art = art or Artifact.read(directory)
    if art.kind is not Kind.CLASSIFIER:
        raise ArtifactError(f"{directory}: a {art.kind.value} artifact, not a classifier student.")
    weights = directory / WEIGHTS
    if not weights.exists():
        raise ArtifactError(f"{directory}: {WEIGHTS} missing.")
    if verify:
        art.verify()
    try:
        cfg = StudentConfig.from_dict(json.loads((directory / CONFIG).read_text()))
    except (FileNotFoundError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise ArtifactError(f"{directory}/{CONFIG}: unusable student config ({e}).") from e
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{weights}: not a readable safetensors file ({e}).") from e
    model = StudentModel(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{weights}: weights do not match {CONFIG} ({str(e).splitlines()[0]}).") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:  # tokenizers raise many types for broken files
        raise ArtifactError(f"{directory}: tokenizer files unusable ({e}).") from e
    return model.to(device).eval(), tokenizer, art

