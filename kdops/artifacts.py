"""Student artifacts on disk: safetensors weights plus JSON, never pickle.

A student directory holds:
- ``model.safetensors``: the weights;
- ``student_config.json``: the ``StudentConfig`` (not config.json, which transformers would try to read);
- ``kdops.json``: label names, max length, lineage (teacher id, snapshot ids, loss config, parent) and the
  SHA-256 of the weights, checked on every load so that a corrupt or swapped file fails loudly;
- the tokenizer files (``tokenizer.json`` ...), as ``save_pretrained`` writes them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kdops.paths import atomic_dir
from kdops.student import StudentConfig, StudentModel

WEIGHTS, CONFIG, META = "model.safetensors", "student_config.json", "kdops.json"


class ArtifactError(RuntimeError):
    """A model artifact that is missing, incomplete or corrupt."""


@dataclass
class StudentMeta:
    label_names: list[str]
    max_length: int = 128
    lineage: dict = field(default_factory=dict)
    weights_sha256: str = ""
    kind: str = "classifier"

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "label_names": self.label_names,
            "max_length": self.max_length,
            "lineage": self.lineage,
            "weights_sha256": self.weights_sha256,
        }


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_student(directory: str | Path, model: StudentModel, tokenizer, meta: StudentMeta) -> Path:
    """Write a student atomically: into a temporary sibling, then renamed into place."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(model.config.to_json())
        meta.weights_sha256 = file_sha256(tmp / WEIGHTS)
        (tmp / META).write_text(json.dumps(meta.to_dict(), indent=2, default=str))
        tokenizer.save_pretrained(str(tmp))
    return directory


def read_meta(directory: str | Path) -> StudentMeta:
    """The kdops.json of a classifier student or (kind ``causal-lm``) of an LM student."""
    directory = Path(directory)
    try:
        d = json.loads((directory / META).read_text())
    except FileNotFoundError as e:
        raise ArtifactError(f"{directory}: not a kdops student ({META} missing).") from e
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{directory}/{META} is not valid JSON ({e}).") from e
    if not isinstance(d, dict):
        raise ArtifactError(f"{directory}/{META} is not a JSON object.")
    if d.get("kind") == "causal-lm":  # kdops.lm.student.save_lm_student: no labels, hashes per file
        return StudentMeta(label_names=[], max_length=0, lineage=d.get("lineage", {}), kind="causal-lm",
                           weights_sha256=d.get("sha256", {}).get(WEIGHTS, ""))
    if "label_names" not in d:
        raise ArtifactError(f"{directory}/{META}: no label_names; not a kdops classifier student.")
    return StudentMeta(
        label_names=list(d["label_names"]), max_length=int(d.get("max_length", 128)),
        lineage=d.get("lineage", {}), weights_sha256=d.get("weights_sha256", ""), kind=d.get("kind", "classifier"),
    )


def load_student(directory: str | Path, device: str | torch.device = "cpu", verify: bool = True):
    """Load ``(model, tokenizer, meta)``; raise ArtifactError with the reason if anything is wrong."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such model directory.")
    meta = read_meta(directory)
    if meta.kind != "classifier":
        raise ArtifactError(f"{directory}: a {meta.kind} student; load it with kdops.lm.student.load_lm_student.")
    weights = directory / WEIGHTS
    if not weights.exists():
        raise ArtifactError(f"{directory}: {WEIGHTS} missing.")
    if verify and meta.weights_sha256 and file_sha256(weights) != meta.weights_sha256:
        raise ArtifactError(f"{weights}: checksum mismatch; the file is corrupt or was replaced.")
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
    return model.to(device).eval(), tokenizer, meta
