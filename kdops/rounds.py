"""One distillation round, full or incremental, from rows to a saved student artifact with lineage.

This is what the CLI, the Prefect flows and the benchmark call: soft labels come from the cache (the
teacher runs only on unseen texts), an incremental round starts from the champion and mixes in a replay
sample, and the result is a safetensors artifact whose ``kdops.json`` names everything it came from.

Under ``torchrun`` / ``accelerate launch`` every process runs the round: the main process fills the soft-label cache
while the others wait and then read it, all train together (kdops.trainer), and only the main process writes the
artifact; the others return its result.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kdops.artifacts import Lineage, load_student, save_student
from kdops.distill import DistillConfig, DistillData, DistillResult, distill
from kdops.errors import UserError
from kdops.replay import ReplayBuffer
from kdops.soft_labels import SoftLabelCache
from kdops.student import StudentConfig, StudentModel, alternate_layers, first_layers, from_teacher
from kdops.trainer import processes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudentShape:
    """How to build a new student: carved from the teacher (default; from a base encoder for a served teacher) or
    from a config."""

    init: str = field(default="teacher", metadata={"help": "'teacher' (copy teacher layers) or 'config' (random init)."})
    layers: int = field(default=2, metadata={"help": "Transformer layers."})
    layer_choice: str = field(default="alternate", metadata={"help": "'alternate' (DistilBERT) or 'first' (pruning) teacher layers."})
    embedding_size: int | None = field(default=64, metadata={"help": "Rank of factorised word embeddings (None = full)."})
    intermediate_size: int | None = field(default=768, metadata={"help": "FFN width (None = the teacher's)."})
    hidden_size: int = field(default=256, metadata={"help": "Width, for init='config' only."})
    heads: int = field(default=4, metadata={"help": "Attention heads, for init='config' only."})
    base: str | None = field(default=None, metadata={
        "help": "BERT-family encoder directory the student is carved from, with its tokenizer. None: the teacher's own "
                "model, or the shipped MiniLM when the teacher has no local weights (one served by Triton)."})

    def __post_init__(self) -> None:
        if self.init not in ("teacher", "config"):
            raise ValueError("init must be 'teacher' or 'config'.")
        if self.layer_choice not in ("alternate", "first"):
            raise ValueError("layer_choice must be 'alternate' or 'first'.")


def local_model(teacher) -> bool:
    """Whether the teacher's weights are here (an ``HFTeacher``), not behind a server."""
    return getattr(teacher, "model", None) is not None and getattr(teacher, "tokenizer", None) is not None


def student_source(teacher, shape: StudentShape, need_model: bool = True):
    """(encoder to carve or None, its tokenizer, the base directory or None when it is the teacher itself).

    ``shape.base`` when set; else the teacher's own model and tokenizer; else (a served teacher) the shipped MiniLM.
    The student then uses that encoder's tokenizer: teacher and student need not share one (the teacher takes text).
    """
    if shape.base is None and local_model(teacher):
        return teacher.model, teacher.tokenizer, None
    from transformers import AutoModel, AutoTokenizer

    from kdops.teacher import base_model_path

    base = Path(shape.base) if shape.base else base_model_path()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        model = AutoModel.from_pretrained(str(base)).eval() if need_model else None
    except (OSError, ValueError) as e:
        raise UserError(f"student base {base}: not a transformers encoder directory with a tokenizer ({e}).") from e
    return model, tokenizer, str(base)


def new_student(teacher, shape: StudentShape, num_labels: int) -> tuple[StudentModel, Any, str | None]:
    """(student, its tokenizer, the base directory it was carved from or None for the teacher)."""
    source, tokenizer, base = student_source(teacher, shape, need_model=shape.init == "teacher")
    if shape.init == "teacher":
        n_t = source.config.num_hidden_layers
        layers = alternate_layers(n_t, shape.layers) if shape.layer_choice == "alternate" else first_layers(shape.layers)
        return from_teacher(source, num_labels, layers, shape.embedding_size, shape.intermediate_size), tokenizer, base
    cfg = StudentConfig(vocab_size=len(tokenizer), num_labels=num_labels, hidden_size=shape.hidden_size,
                        num_layers=shape.layers, num_heads=shape.heads, intermediate_size=shape.intermediate_size or 4 * shape.hidden_size,
                        embedding_size=shape.embedding_size, pad_token_id=tokenizer.pad_token_id or 0)
    return StudentModel(cfg), tokenizer, base


def build_student(teacher, shape: StudentShape, num_labels: int) -> StudentModel:
    return new_student(teacher, shape, num_labels)[0]


def without_teacher_states(teacher, cfg: DistillConfig) -> DistillConfig:
    """``cfg`` with feature / attention / relation transfer off when the teacher's hidden states are out of reach (a
    served teacher returns logits only); logged, and the lineage records the config the round really used."""
    lc = cfg.loss
    if not lc.needs_teacher_states or local_model(teacher):
        return cfg
    log.warning("teacher %s is served remotely (logits only): feature/attention/relation transfer is off for this round",
                teacher.id)
    return replace(cfg, loss=replace(lc, feature_weight=0.0, attention_weight=0.0, relation_weight=0.0))


@dataclass
class RoundResult:
    artifact: Path
    result: DistillResult
    cache: dict
    soft_label_key: str
    train_rows: int
    replay_rows: int
    lineage: Lineage

    def to_dict(self) -> dict:
        d = asdict(self)
        d["artifact"] = str(self.artifact)
        return d


def run_round(
    teacher,
    cache: SoftLabelCache,
    train_rows: pd.DataFrame,
    out_dir: Path,
    cfg: DistillConfig = DistillConfig(),
    val_rows: pd.DataFrame | None = None,
    shape: StudentShape = StudentShape(),
    champion_dir: Path | None = None,
    replay: ReplayBuffer | None = None,
    snapshot_ids: dict | None = None,
    parent_version: str | None = None,
    online: bool = False,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    on_epoch=None,
) -> RoundResult:
    """Distil a student on ``train_rows`` (+ a replay sample when incremental) and save it to ``out_dir``.

    With ``champion_dir`` the round is incremental: it starts from the champion's weights. ``replay`` is
    sampled (``cfg.replay_share`` rows per new row) before training and then updated with the new rows.
    ``online=True`` runs the teacher every step instead of reading the cache (the benchmark's baseline).
    ``teacher`` may be local (``HFTeacher``) or served (logits only): a first round then carves the student from a
    base encoder (``StudentShape.base``) and runs without the transfer terms that need hidden states.
    """
    label_names = list(teacher.label_names)
    cfg = without_teacher_states(teacher, cfg)
    new_rows = train_rows[["id", "text", "label", "domain"]].reset_index(drop=True)
    rows = new_rows
    n_replay = 0
    if champion_dir is not None and replay is not None and len(replay) and cfg.replay_share > 0:
        extra = replay.draw(len(new_rows), cfg.replay_share)
        n_replay = len(extra)
        rows = pd.concat([new_rows, extra], ignore_index=True)
    texts = rows["text"].tolist()
    procs = processes()
    with procs.main_first():  # the teacher runs once, in the main process; the others read what it cached
        logits = None if online else cache.get_or_compute(teacher, texts, progress=progress and procs.is_main)
        val_logits = cache.get_or_compute(teacher, val_rows["text"].tolist()) if val_rows is not None and len(val_rows) else None
    train = DistillData.from_rows(rows, label_names, logits)
    val = DistillData.from_rows(val_rows, label_names, val_logits) if val_logits is not None else None

    base = None
    if champion_dir is not None:
        student, tokenizer, meta = load_student(champion_dir)
        if list(meta.label_names) != label_names:
            raise ValueError(f"champion labels {meta.label_names} differ from the teacher's {label_names}.")
        student.train()
    else:
        student, tokenizer, base = new_student(teacher, shape, len(label_names))
    result = distill(student, tokenizer, train, cfg, val=val, teacher=teacher, checkpoint_dir=checkpoint_dir,
                     progress=progress, on_epoch=on_epoch)
    if replay is not None:
        replay.add(new_rows)
    key = cache.key(teacher.id, texts)
    lineage = Lineage(
        teacher_id=teacher.id, snapshot_ids=snapshot_ids or {}, cache_key=key,
        parent_version=int(parent_version) if parent_version not in (None, "") else None,
        config={"distill": cfg.to_dict(), "shape": asdict(shape)},
        details={"parent_artifact": str(champion_dir) if champion_dir else None, "incremental": champion_dir is not None,
                 "replay_rows": n_replay, "student_base": base},
    )
    if procs.count > 1:
        log.info("process %d of %d: teacher outputs %s; %d optimiser steps", procs.index, procs.count,
                 cache.stats.to_dict(), result.steps)
    if procs.is_main:
        save_student(out_dir, student, tokenizer, label_names, cfg.max_length, lineage)
        log.info("student saved to %s (%d rows, %d replayed)", out_dir, len(new_rows), n_replay)
    # the others return once the artifact is written, with the main process's result (its history has validation)
    return procs.broadcast(RoundResult(out_dir, result, cache.stats.to_dict(), key, len(new_rows), n_replay, lineage))


def teacher_logits_for(teacher, cache: SoftLabelCache, rows: pd.DataFrame) -> np.ndarray:
    return cache.get_or_compute(teacher, rows["text"].tolist())
