"""Stage 3: distillation. One trainer for full and incremental rounds, CPU or several GPUs.

The trainer sees ``DistillData``: texts, teacher logits (from the soft-label cache, or None to run the
teacher online), hard labels (-100 where unlabelled) and domains. Scaling is configuration: under
``accelerate launch`` / ``torchrun`` the same code shards batches across processes (via ``accelerate``),
uses bf16 autocast and ``torch.compile`` on GPUs, and only the main process writes files.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from kdops import losses
from kdops.schedules import Curriculum, Schedule, hard_example_weights, teacher_entropy
from kdops.student import StudentModel

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
    replay_share: float = field(default=0.5, metadata={"help": "Incremental rounds: replay rows per new row."})
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


class _Batches:
    """Length-bucketed batches of row indices: shuffle, sort within chunks of 50 batches, shuffle batches."""

    def __init__(self, lengths: np.ndarray, batch_size: int, rng: np.random.Generator):
        self.lengths, self.bs, self.rng = lengths, batch_size, rng

    def epoch(self, order: np.ndarray) -> list[np.ndarray]:
        chunk = self.bs * 50
        batches = []
        for s in range(0, len(order), chunk):
            part = order[s:s + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches += [part[i:i + self.bs] for i in range(0, len(part), self.bs)]
        self.rng.shuffle(batches)
        return batches


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

    ``teacher`` (an ``HFTeacher``) is needed when ``train.teacher_logits`` is None (online mode) or when the
    loss uses feature, attention or relation transfer. ``checkpoint_dir`` enables resume: a killed run
    restarts from its last finished epoch. ``on_epoch(record)`` is called after each epoch (MLflow logging).
    """
    from accelerate import Accelerator

    if len(train) == 0:
        raise ValueError("no training rows.")
    if train.teacher_logits is None and teacher is None:
        raise ValueError("train.teacher_logits is None: pass a teacher to run it online.")
    lc = cfg.loss
    if lc.needs_teacher_states:
        if teacher is None:
            raise ValueError("feature/attention/relation transfer needs a local teacher.")
        if teacher.tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError("feature/attention transfer needs the teacher's tokenizer; set those weights to 0.")

    use_gpu = torch.cuda.is_available()
    mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if use_gpu else "no")
    acc = Accelerator(mixed_precision=mp, gradient_accumulation_steps=cfg.grad_accum, cpu=not use_gpu)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    projector = None
    layer_map = lc.layer_map
    if lc.needs_teacher_states:
        t_layers = teacher.model.config.num_hidden_layers
        layer_map = layer_map or _default_layer_map(student.config.num_layers, t_layers)
        projector = losses.FeatureProjector(student.config.hidden_size, teacher.model.config.hidden_size, len(layer_map))
        teacher.model.to(acc.device)
        if lc.attention_weight > 0 and getattr(teacher.model.config, "_attn_implementation", "eager") != "eager":
            # SDPA kernels do not return attention probabilities; eager attention does (same weights).
            teacher.model.set_attn_implementation("eager")

    head = [p for n, p in student.named_parameters() if n.startswith(("pooler", "classifier"))]
    body = [p for n, p in student.named_parameters() if not n.startswith(("pooler", "classifier"))]
    groups = [{"params": body, "lr": cfg.lr}, {"params": head, "lr": cfg.lr * cfg.head_lr_mult}]
    if projector is not None:
        groups.append({"params": list(projector.parameters()), "lr": cfg.lr})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    lengths = np.array([len(t) for t in train.texts])
    steps_per_epoch = math.ceil(len(train) / (cfg.batch_size * acc.num_processes))
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    warm = max(1, int(cfg.warmup_share * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    model, opt = acc.prepare(student, opt)
    if projector is not None:
        projector = acc.prepare(projector)
    if cfg.compile == "yes" or (cfg.compile == "auto" and use_gpu):
        model = torch.compile(model)

    temp = Schedule(lc.temperature_start, lc.temperature_end, "linear")
    kd_w = Schedule(lc.kd_weight_start, lc.kd_weight_end, "linear")
    curriculum = Curriculum(0.2, 0.8) if cfg.curriculum else None
    difficulty = teacher_entropy(train.teacher_logits) if curriculum is not None and train.teacher_logits is not None else None
    batches = _Batches(lengths, cfg.batch_size, rng)

    history: list[dict] = []
    start_epoch, step, best, best_epoch, bad_epochs = 0, 0, -1.0, -1, 0
    if checkpoint_dir is not None and (checkpoint_dir / "state.json").exists():
        state = json.loads((checkpoint_dir / "state.json").read_text())
        acc.unwrap_model(model).load_state_dict(load_file(str(checkpoint_dir / "student.safetensors")))
        _load_opt(opt, checkpoint_dir / "optimizer.safetensors", state["opt_meta"])
        start_epoch, step, history = state["epoch"] + 1, state["step"], state["history"]
        best, best_epoch, bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]
        for _ in range(step):
            sched.step()
        rng = np.random.default_rng([cfg.seed, start_epoch])
        batches.rng = rng
        log.info("resumed from %s at epoch %d", checkpoint_dir, start_epoch)

    t0, seen = time.perf_counter(), 0
    bar = tqdm(total=total, initial=step, desc="distill", unit="step", disable=not (progress and acc.is_main_process))
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        if step >= total:
            break
        head_only = epoch < cfg.head_only_epochs
        for p in body:
            p.requires_grad_(not head_only)
        progress_frac = step / max(1, total)
        if curriculum is not None and difficulty is not None:
            order = curriculum.select(difficulty, progress_frac, len(train), rng)
        else:
            order = rng.permutation(len(train))
        # Shard the epoch's batches across processes (a no-op on one process).
        epoch_batches = batches.epoch(np.asarray(order))[acc.process_index::acc.num_processes]
        losses_sum, n_batches = 0.0, 0
        for idx in epoch_batches:
            if step >= total:
                break
            frac = step / max(1, total)
            T, w_kd = temp(frac), kd_w(frac)
            texts = [train.texts[i] for i in idx]
            enc = tokenizer(texts, padding=True, truncation=True, max_length=cfg.max_length, return_tensors="pt").to(acc.device)
            labels = torch.as_tensor(train.labels[idx], device=acc.device)
            with acc.accumulate(model), acc.autocast():
                out = model(enc["input_ids"], enc["attention_mask"], output_hidden_states=lc.feature_weight > 0,
                            output_attentions=lc.attention_weight > 0)
                t_out = None
                if train.teacher_logits is not None:
                    t_logits = torch.as_tensor(train.teacher_logits[idx], device=acc.device)
                if train.teacher_logits is None or lc.needs_teacher_states:
                    with torch.no_grad():
                        t_enc = teacher.encode(texts) if train.teacher_logits is None else enc
                        t_enc = {k: v.to(acc.device) for k, v in t_enc.items()}
                        t_out = teacher.model(**t_enc, output_hidden_states=lc.needs_teacher_states,
                                              output_attentions=lc.attention_weight > 0)
                    if train.teacher_logits is None:
                        t_logits = t_out.logits.float()
                weights = None
                if cfg.hard_example_power > 0:
                    per = F.cross_entropy(out.logits.float(), t_logits.argmax(-1), reduction="none")
                    weights = hard_example_weights(per, power=cfg.hard_example_power)
                loss = losses.response_kd_loss(out.logits.float(), t_logits, labels, temperature=T, alpha=1.0 - w_kd, weights=weights)
                if lc.feature_weight > 0:
                    loss = loss + lc.feature_weight * losses.feature_kd_loss(
                        list(out.hidden_states), list(t_out.hidden_states), list(layer_map), projector, enc["attention_mask"])
                if lc.attention_weight > 0:
                    amap = [(s - 1, t - 1) for s, t in layer_map]
                    loss = loss + lc.attention_weight * losses.attention_transfer_loss(
                        list(out.attentions), list(t_out.attentions), amap, enc["attention_mask"])
                if lc.relation_weight > 0:
                    m = enc["attention_mask"][..., None].float()
                    t_emb = (t_out.hidden_states[-1] * m).sum(1) / m.sum(1)
                    loss = loss + lc.relation_weight * losses.relation_kd_loss(out.pooled.float(), t_emb.float())
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            if acc.sync_gradients:
                sched.step()
                step += 1
                bar.update(1)
            seen += len(idx)
            losses_sum += float(loss.detach())
            n_batches += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", T=f"{T:.2f}")
        record = {"epoch": epoch, "step": step, "train_loss": losses_sum / max(1, n_batches), "temperature": T, "kd_weight": w_kd}
        if val is not None and len(val) and acc.is_main_process:
            record.update(_accuracy(acc.unwrap_model(model), tokenizer, val, cfg.max_length, acc.device))
        history.append(record)
        log.info("epoch %d: %s", epoch, record)
        if on_epoch is not None and acc.is_main_process:
            on_epoch(record)
        score = record.get("val_accuracy", record.get("val_agreement"))
        if score is not None:
            if score > best:
                best, best_epoch, bad_epochs = score, epoch, 0
                best_state = {k: v.detach().clone() for k, v in acc.unwrap_model(model).state_dict().items()}
            else:
                bad_epochs += 1
        if checkpoint_dir is not None and acc.is_main_process:
            _save_checkpoint(checkpoint_dir, acc.unwrap_model(model), opt, epoch, step, history, best, best_epoch, bad_epochs)
        if cfg.early_stopping_patience and bad_epochs >= cfg.early_stopping_patience:
            log.info("early stopping after epoch %d (best %d)", epoch, best_epoch)
            break
    bar.close()
    if best_epoch >= 0 and "best_state" in locals() and best_epoch != history[-1]["epoch"]:
        acc.unwrap_model(model).load_state_dict(best_state)  # keep the best validated weights
    elapsed = time.perf_counter() - t0
    acc.unwrap_model(model).eval()
    return DistillResult(history, best_epoch, elapsed, seen / elapsed if elapsed else 0.0, step)


# ---------------------------------------------------------------------------------------------
# Checkpoints: safetensors for tensors, JSON for the rest (no pickle, so no torch.save).


def _save_checkpoint(directory: Path, model, opt, epoch, step, history, best, best_epoch, bad_epochs) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(directory / "student.safetensors"))
    tensors, meta = {}, {}
    for i, (p, st) in enumerate(opt.state.items()):
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{i}.{k}"] = v.detach().contiguous().cpu().reshape(-1) if v.dim() == 0 else v.detach().contiguous().cpu()
                meta[f"{i}.{k}"] = list(v.shape)
    if tensors:
        save_file(tensors, str(directory / "optimizer.safetensors"))
    state = {"epoch": epoch, "step": step, "history": history, "best": best, "best_epoch": best_epoch,
             "bad_epochs": bad_epochs, "opt_meta": meta}
    tmp = directory / "state.json.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(directory / "state.json")  # state.json appears only when the weights are complete


def _load_opt(opt, path: Path, meta: dict) -> None:
    if not path.exists():
        return
    tensors = load_file(str(path))
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        st = {}
        for k, v in tensors.items():
            pi, name = k.split(".", 1)
            if int(pi) == i:
                st[name] = v.reshape(meta[k]).to(p.device)
        if st:
            opt.state[p] = st
