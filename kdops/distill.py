"""Stage 3: distillation of a classifier student: its loss and batches on the one trainer (kdops.trainer).

``distill`` sees ``DistillData``: texts, teacher logits (from the soft-label cache, or None to run the teacher
online), hard labels (-100 where unlabelled) and domains. What is specific to a classifier lives here: the loss
(response KD + CE, feature / attention / relation transfer, annealed temperature and KD weight, hard-example
weights), length-bucketed batches of rows (with an optional difficulty curriculum), a head-only warm-up and
validation accuracy for early stopping. Scaling is configuration: under ``accelerate launch`` / ``torchrun`` the
trainer shards batches across processes, uses bf16 autocast and ``torch.compile`` on GPUs, and only the main
process writes files.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdops import losses
from kdops.schedules import Curriculum, Schedule, hard_example_weights, teacher_entropy
from kdops.student import StudentModel
from kdops.trainer import Trainer, TrainerConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LossConfig:
    temperature_start: float = field(default=4.0, metadata={"help": "Softmax temperature at the start (annealed)."})
    temperature_end: float = field(default=1.0, metadata={"help": "Temperature at the end of training."})
    kd_weight_start: float = field(default=0.7, metadata={"help": "Weight of the KD term at the start; CE gets 1 - it."})
    kd_weight_end: float = field(default=0.9, metadata={"help": "Weight of the KD term at the end."})
    feature_weight: float = field(default=0.0, metadata={"help": "Hidden-state MSE weight (needs a local teacher with the same tokenizer)."})
    attention_weight: float = field(default=0.0, metadata={"help": "Attention-transfer weight (same tokenizer as the teacher)."})
    relation_weight: float = field(default=0.0, metadata={"help": "Relation KD weight on sentence embeddings (local teacher)."})
    layer_map: tuple[tuple[int, int], ...] | None = field(
        default=None, metadata={"help": "(student layer, teacher layer) pairs for feature/attention KD; None maps the top layers evenly."}
    )

    def __post_init__(self) -> None:
        for name in ("temperature_start", "temperature_end"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive.")
        for name in ("kd_weight_start", "kd_weight_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in the range [0.0, 1.0].")
        if min(self.feature_weight, self.attention_weight, self.relation_weight) < 0:
            raise ValueError("loss weights must be non-negative.")

    @property
    def needs_teacher_states(self) -> bool:
        return self.feature_weight > 0 or self.attention_weight > 0 or self.relation_weight > 0


@dataclass(frozen=True)
class DistillConfig:
    epochs: int = field(default=3, metadata={"help": "Passes over the training rows."})
    batch_size: int = field(default=32, metadata={"help": "Rows per step (per process)."})
    lr: float = field(default=1e-4, metadata={"help": "Peak AdamW learning rate (warm-up then linear decay)."})
    head_lr_mult: float = field(default=1.0, metadata={"help": "Learning-rate multiplier for pooler and classifier."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    warmup_share: float = field(default=0.06, metadata={"help": "Share of steps spent warming up."})
    grad_accum: int = field(default=1, metadata={"help": "Gradient-accumulation steps."})
    max_length: int = field(default=128, metadata={"help": "Token limit for the student."})
    seed: int = field(default=13, metadata={"help": "Seed for init, shuffling and sampling: runs are reproducible."})
    head_only_epochs: int = field(default=0, metadata={"help": "Two-stage mode: train only the head for this many epochs first."})
    curriculum: bool = field(default=False, metadata={"help": "Raise the share of hard rows (by teacher entropy) from 20% to 80%."})
    hard_example_power: float = field(default=0.0, metadata={"help": "Re-weight rows by their loss^power (0 = off)."})
    early_stopping_patience: int = field(default=2, metadata={"help": "Epochs without validation gain before stopping (0 = off)."})
    replay_share: float = field(default=0.5, metadata={"help": "Incremental rounds: rows drawn from the replay reservoir per new row, shuffled in with the new rows (kdops.replay)."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimiser steps (smoke runs)."})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "Loss terms and their schedules."})
    mixed_precision: str = field(default="auto", metadata={"help": "'auto' (bf16 on GPU), 'no' or 'bf16'."})
    compile: str = field(default="auto", metadata={"help": "'auto' (torch.compile on GPU), 'yes' or 'no'."})

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("epochs, batch_size and grad_accum must be >= 1.")
        if self.lr <= 0:
            raise ValueError("lr must be positive.")
        if not 0 <= self.replay_share <= 10:
            raise ValueError("replay_share must be in [0, 10].")
        if self.mixed_precision not in ("auto", "no", "bf16"):
            raise ValueError("mixed_precision must be 'auto', 'no' or 'bf16'.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DistillConfig":
        d = dict(d)
        if isinstance(d.get("loss"), dict):
            lc = dict(d["loss"])
            if lc.get("layer_map") is not None:
                lc["layer_map"] = tuple(tuple(p) for p in lc["layer_map"])
            d["loss"] = LossConfig(**lc)
        return cls(**d)


@dataclass
class DistillData:
    texts: list[str]
    teacher_logits: np.ndarray | None  # (N, C); None runs the teacher online every step
    labels: np.ndarray  # (N,) int64, -100 = unlabelled
    domains: list[str | None] | None = None

    def __post_init__(self) -> None:
        n = len(self.texts)
        if self.teacher_logits is not None and len(self.teacher_logits) != n or len(self.labels) != n:
            raise ValueError("texts, teacher_logits and labels must have the same length.")

    def __len__(self) -> int:
        return len(self.texts)

    @staticmethod
    def from_rows(rows, label_names: list[str], teacher_logits: np.ndarray | None) -> "DistillData":
        index = {n: i for i, n in enumerate(label_names)}
        unknown = sorted({str(lab) for lab in rows["label"] if lab is not None and lab == lab and lab not in index})
        if unknown:  # never train on labels the teacher does not have (they would silently count as unlabelled)
            from kdops.errors import LabelMismatch

            raise LabelMismatch(f"training rows have labels {unknown} the teacher does not know (its labels: "
                                f"{list(label_names)}); map them in kdops.toml [task.label_map] or train a matching teacher.")
        labels = np.array([index.get(lab, -100) if lab is not None else -100 for lab in rows["label"]], np.int64)
        return DistillData(rows["text"].tolist(), teacher_logits, labels, rows["domain"].tolist())

    def concat(self, other: "DistillData") -> "DistillData":
        tl = None if self.teacher_logits is None or other.teacher_logits is None else np.concatenate([self.teacher_logits, other.teacher_logits])
        return DistillData(self.texts + other.texts, tl, np.concatenate([self.labels, other.labels]),
                           (self.domains or [None] * len(self)) + (other.domains or [None] * len(other)))


@dataclass
class DistillResult:
    history: list[dict]
    best_epoch: int
    seconds: float
    samples_per_s: float
    steps: int

    def to_dict(self) -> dict:
        return asdict(self)


def _default_layer_map(n_student: int, n_teacher: int) -> tuple[tuple[int, int], ...]:
    # hidden_states include the embeddings at 0, so layer i's output is index i + 1.
    step = n_teacher / n_student
    return tuple((i + 1, round(step * (i + 1))) for i in range(n_student))


class RowBatches:
    """Batches of row indices, one seeded numpy generator drawing all of them (a checkpoint keeps its state).

    Without a curriculum: a permutation each epoch, sorted by length within chunks of 50 batches (little padding),
    then the batches shuffled. With one: every batch draws ``hard_share(p)`` of its rows from the hard pool (teacher
    entropy above the median) and the rest from the easy pool, ``p`` being that batch's own share of training, so the
    realized hard share rises over training as the schedule says (each pool is drawn without replacement until it
    runs out, then reshuffled); batches stay in schedule order and are not length-bucketed."""

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, difficulty: np.ndarray | None = None,
                 curriculum: Curriculum | None = None):
        self.lengths, self.bs, self.rng = lengths, batch_size, np.random.default_rng(seed)
        self.difficulty, self.curriculum = difficulty, curriculum
        self.batches_per_epoch = math.ceil(len(lengths) / batch_size)

    def epoch(self, epoch: int, progress: float, batch_share: float = 0.0) -> list[np.ndarray]:
        n = len(self.lengths)
        if self.curriculum is not None and self.difficulty is not None:
            return self._curriculum(progress, batch_share)
        order = self.rng.permutation(n)
        chunk, batches = self.bs * 50, []
        for s in range(0, len(order), chunk):
            part = order[s:s + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches += [part[i:i + self.bs] for i in range(0, len(part), self.bs)]
        self.rng.shuffle(batches)
        return batches

    def _curriculum(self, progress: float, batch_share: float) -> list[np.ndarray]:
        is_hard = self.difficulty > np.median(self.difficulty)
        pools = {True: _Pool(np.flatnonzero(is_hard), self.rng), False: _Pool(np.flatnonzero(~is_hard), self.rng)}
        n, batches = len(self.lengths), []
        for b in range(self.batches_per_epoch):
            size = min(self.bs, n - b * self.bs)
            k = round(self.curriculum.hard_share(progress + b * batch_share) * size)
            k = size if not pools[False] else 0 if not pools[True] else k  # one pool empty: all rows equal
            batches.append(np.concatenate([pools[True].take(k), pools[False].take(size - k)]).astype(np.int64))
        return batches

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def load_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


class _Pool:
    """Row indices drawn without replacement, reshuffled when used up."""

    def __init__(self, rows: np.ndarray, rng: np.random.Generator):
        self.rows, self.rng, self.left = rows, rng, rows[:0]

    def __bool__(self) -> bool:
        return bool(self.rows.size)

    def take(self, k: int) -> np.ndarray:
        out = []
        while k > 0:
            if not self.left.size:
                self.left = self.rng.permutation(self.rows)
            out.append(self.left[:k])
            k -= len(out[-1])
            self.left = self.left[len(out[-1]):]
        return np.concatenate(out) if out else self.rows[:0]


class ClassifierLoss:
    """``loss_fn`` of the trainer for a classifier student, on a batch of row indices:

        L = response_kd(student, teacher; T(p), alpha = 1 - w_kd(p)) [per-row hard-example weights]
            + feature_weight * feature_kd + attention_weight * attention_transfer + relation_weight * relation_kd

    with the temperature T and KD weight w_kd annealed linearly over training progress p (kdops.losses)."""

    def __init__(self, cfg: "DistillConfig", train: "DistillData", tokenizer, teacher, device, projector=None,
                 layer_map=None):
        self.cfg, self.lc, self.train, self.tokenizer, self.teacher = cfg, cfg.loss, train, tokenizer, teacher
        self.device, self.projector, self.layer_map = device, projector, layer_map
        self.temp = Schedule(self.lc.temperature_start, self.lc.temperature_end, "linear")
        self.kd_w = Schedule(self.lc.kd_weight_start, self.lc.kd_weight_end, "linear")

    def __call__(self, model, idx: np.ndarray, progress: float) -> tuple[torch.Tensor, dict]:
        lc, T, w_kd = self.lc, self.temp(progress), self.kd_w(progress)
        texts = [self.train.texts[i] for i in idx]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.cfg.max_length,
                             return_tensors="pt").to(self.device)
        labels = torch.as_tensor(self.train.labels[idx], device=self.device)
        out = model(enc["input_ids"], enc["attention_mask"], output_hidden_states=lc.feature_weight > 0,
                    output_attentions=lc.attention_weight > 0)
        t_logits, t_out = self._teacher(idx, texts, enc)
        weights = None
        if self.cfg.hard_example_power > 0:
            per = F.cross_entropy(out.logits.float(), t_logits.argmax(-1), reduction="none")
            weights = hard_example_weights(per, power=self.cfg.hard_example_power)
        loss = losses.response_kd_loss(out.logits.float(), t_logits, labels, temperature=T, alpha=1.0 - w_kd,
                                       weights=weights)
        return self._transfer(loss, out, t_out, enc["attention_mask"]), {"temperature": T, "kd_weight": w_kd}

    def _teacher(self, idx, texts, enc):
        """(teacher logits, teacher outputs or None): cached logits, and the teacher run when online or when a
        transfer term needs its hidden states or attentions."""
        cached, t_logits, t_out = self.train.teacher_logits, None, None
        if cached is not None:
            t_logits = torch.as_tensor(cached[idx], device=self.device)
        if cached is None and getattr(self.teacher, "model", None) is None:  # a served teacher: logits only
            return torch.as_tensor(np.asarray(self.teacher.logits(texts), np.float32), device=self.device), None
        if cached is None or self.lc.needs_teacher_states:
            with torch.no_grad():
                t_enc = self.teacher.encode(texts) if cached is None else enc
                t_enc = {k: v.to(self.device) for k, v in t_enc.items()}
                t_out = self.teacher.model(**t_enc, output_hidden_states=self.lc.needs_teacher_states,
                                           output_attentions=self.lc.attention_weight > 0)
            if cached is None:
                t_logits = t_out.logits.float()
        return t_logits, t_out

    def _transfer(self, loss, out, t_out, mask):
        lc, layer_map = self.lc, self.layer_map
        if lc.feature_weight > 0:
            loss = loss + lc.feature_weight * losses.feature_kd_loss(
                list(out.hidden_states), list(t_out.hidden_states), list(layer_map), self.projector, mask)
        if lc.attention_weight > 0:
            amap = [(s - 1, t - 1) for s, t in layer_map]
            loss = loss + lc.attention_weight * losses.attention_transfer_loss(
                list(out.attentions), list(t_out.attentions), amap, mask)
        if lc.relation_weight > 0:
            m = mask[..., None].float()
            t_emb = (t_out.hidden_states[-1] * m).sum(1) / m.sum(1)
            loss = loss + lc.relation_weight * losses.relation_kd_loss(out.pooled.float(), t_emb.float())
        return loss


def _accuracy(model: StudentModel, tokenizer, data: DistillData, max_length: int, device, batch_size: int = 128) -> dict:
    model.eval()
    preds = []
    with torch.inference_mode():
        for s in range(0, len(data), batch_size):
            enc = tokenizer(data.texts[s:s + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
            preds.append(model(enc["input_ids"], enc["attention_mask"]).logits.argmax(-1).cpu())
    model.train()
    p = torch.cat(preds).numpy()
    out = {}
    lab = data.labels >= 0
    if lab.any():
        out["val_accuracy"] = float((p[lab] == data.labels[lab]).mean())
    if data.teacher_logits is not None:
        out["val_agreement"] = float((p == data.teacher_logits.argmax(-1)).mean())
    return out


def _check(train: DistillData, tokenizer, teacher, lc: LossConfig) -> None:
    if len(train) == 0:
        raise ValueError("no training rows.")
    if train.teacher_logits is None and teacher is None:
        raise ValueError("train.teacher_logits is None: pass a teacher to run it online.")
    if lc.needs_teacher_states:
        if getattr(teacher, "model", None) is None:
            raise ValueError("feature/attention/relation transfer needs a local teacher (a served one gives logits only).")
        if teacher.tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError("feature/attention transfer needs the teacher's tokenizer; set those weights to 0.")


def trainer_config(cfg: DistillConfig) -> TrainerConfig:
    """The trainer settings of a classifier round: epochs (capped by max_steps), linear warm-up and decay."""
    return TrainerConfig(epochs=cfg.epochs, max_steps=cfg.max_steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
                         warmup_share=cfg.warmup_share, schedule="linear", grad_accum=cfg.grad_accum, max_grad_norm=1.0,
                         early_stopping_patience=cfg.early_stopping_patience, mixed_precision=cfg.mixed_precision,
                         compile=cfg.compile, seed=cfg.seed)


def _projector(trainer: Trainer, student: StudentModel, teacher, lc: LossConfig):
    """(projector, layer map) for feature/attention/relation transfer; the teacher moves to the training device."""
    layer_map = lc.layer_map or _default_layer_map(student.config.num_layers, teacher.model.config.num_hidden_layers)
    projector = losses.FeatureProjector(student.config.hidden_size, teacher.model.config.hidden_size, len(layer_map))
    teacher.model.to(trainer.device)
    if lc.attention_weight > 0 and getattr(teacher.model.config, "_attn_implementation", "eager") != "eager":
        # SDPA kernels do not return attention probabilities; eager attention does (same weights).
        teacher.model.set_attn_implementation("eager")
    return trainer.prepare(projector), layer_map


def distill(
    student: StudentModel,
    tokenizer,
    train: DistillData,
    cfg: DistillConfig = DistillConfig(),
    val: DistillData | None = None,
    teacher=None,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    on_epoch=None,
) -> DistillResult:
    """Train ``student`` in place on ``train``; returns the per-epoch history.

    ``teacher`` is needed when ``train.teacher_logits`` is None (online mode: any ``Teacher``, served ones included)
    or when the loss uses feature, attention or relation transfer (a local ``HFTeacher`` only). ``checkpoint_dir``
    enables resume: a killed run restarts from its last finished epoch and ends with the weights the uninterrupted
    run would have had.
    ``on_epoch(record)`` is called after each epoch (MLflow logging).
    """
    lc = cfg.loss
    _check(train, tokenizer, teacher, lc)
    trainer = Trainer(trainer_config(cfg))  # seeds torch: the projector's init is part of the seeded run
    projector, layer_map = _projector(trainer, student, teacher, lc) if lc.needs_teacher_states else (None, None)
    head = [p for n, p in student.named_parameters() if n.startswith(("pooler", "classifier"))]
    body = [p for n, p in student.named_parameters() if not n.startswith(("pooler", "classifier"))]
    groups = [{"params": body, "lr": cfg.lr}, {"params": head, "lr": cfg.lr * cfg.head_lr_mult}]

    def head_only(epoch: int) -> None:  # two-stage mode: the body learns from epoch head_only_epochs on
        for p in body:
            p.requires_grad_(epoch >= cfg.head_only_epochs)

    curriculum = Curriculum(0.2, 0.8) if cfg.curriculum else None
    difficulty = None
    if curriculum is not None and train.teacher_logits is not None:
        difficulty = teacher_entropy(train.teacher_logits)
    batches = RowBatches(np.array([len(t) for t in train.texts]), cfg.batch_size, cfg.seed, difficulty, curriculum)
    loss_fn = ClassifierLoss(cfg, train, tokenizer, teacher, trainer.device, projector, layer_map)
    validate = None
    if val is not None and len(val):
        validate = lambda model: _accuracy(model, tokenizer, val, cfg.max_length, trainer.device)  # noqa: E731
    extras = [projector] if projector is not None else []
    res = trainer.fit(student, batches, loss_fn, param_groups=groups, extra_modules=extras,
                      validate=validate, score=lambda r: r.get("val_accuracy", r.get("val_agreement")),
                      on_record=on_epoch, on_epoch_start=head_only if cfg.head_only_epochs else None, checkpoint_dir=checkpoint_dir, progress=progress,
                      desc="distill")
    return DistillResult(res.history, res.best_epoch, res.seconds, res.samples_per_s, res.step)
