"""Stage 4 (LM): distil a causal-LM teacher into a student, one incremental round at a time.

Loss per step (Hinton et al. 2015; GKD, Agarwal et al. 2024; Kim & Rush 2016):

    L = alpha * CE(student, next token) + (1 - alpha) * token_kd(student, teacher top-k; mode, beta, T)
        + seq_kd_weight * CE(student, teacher's greedy continuation of a prompt)

The teacher's top-k and generations come from ``LMSoftLabelCache``: the teacher runs only on sequences the
cache has not seen, so a later round pays only for its new text, and replayed earlier text (a seeded
``replay_fraction`` of every batch, against forgetting) costs nothing. The loop is the one trainer
(``kdops.trainer``) in step mode: warm-up + cosine learning rate, gradient accumulation, clipping, bf16 autocast on
CUDA, and checkpoints a killed round resumes from.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from kdops.lm.cache import LMSoftLabelCache
from kdops.lm.student import LMStudent
from kdops.lm.teacher import LMTeacher, pad_batch
from kdops.losses import lm_ce_loss, sequence_kd_loss, token_kd_loss
from kdops.trainer import Trainer, TrainerConfig, processes


@dataclass(frozen=True)
class LMDistillConfig:
    steps: int = field(default=200, metadata={"help": "Optimiser steps in this round."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per micro-batch."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    lr: float = field(default=3e-4, metadata={"help": "Peak AdamW learning rate (linear warm-up, cosine decay)."})
    warmup_frac: float = field(default=0.05, metadata={"help": "Share of steps spent warming up the learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    alpha: float = field(default=0.5, metadata={"help": "Weight of next-token CE; 1 - alpha goes to token KD."})
    kd_mode: str = field(default="forward", metadata={"help": "Token KD divergence: forward, reverse or jsd."})
    beta: float = field(default=0.5, metadata={"help": "Generalised-JSD interpolation (only for kd_mode='jsd')."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the KD term (loss scaled by T^2)."})
    topk: int = field(default=32, metadata={"help": "Teacher top-k ids/log-probs cached per position."})
    kd_residual: bool = field(
        default=False, metadata={"help": "Token KD over the top-k ids plus one slot for the rest of the vocabulary "
                                         "(kdops.losses.token_kd_loss residual=True), not the renormalised top-k."}
    )
    seq_kd_weight: float = field(default=0.0, metadata={"help": "Weight of sequence-level KD on teacher generations."})
    seq_kd_prompt_tokens: int = field(default=6, metadata={"help": "Prompt length (tokens) for teacher generations."})
    seq_kd_new_tokens: int = field(default=24, metadata={"help": "Tokens the teacher generates per prompt."})
    replay_fraction: float = field(default=0.25, metadata={"help": "Share of every batch drawn from replayed earlier text (the round draws f / (1 - f) rows from the replay reservoir per new row; kdops.replay)."})
    freeze_embeddings: bool = field(
        default=False, metadata={"help": "Keep the (tied) embedding fixed: cheaper steps, and the teacher's rows stay."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    seed: int = field(default=13, metadata={"help": "Seed for batch sampling and dropout."})

    def __post_init__(self) -> None:
        if self.kd_mode not in ("forward", "reverse", "jsd"):
            raise ValueError("kd_mode must be 'forward', 'reverse' or 'jsd'.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError("alpha must be in the range [0.0, 1.0].")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError("beta must be in the range [0.0, 1.0].")
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ValueError("replay_fraction must be in the range [0.0, 1.0).")
        if min(self.steps, self.batch_size, self.grad_accum, self.topk) < 1 or self.lr <= 0 or self.temperature <= 0:
            raise ValueError("steps, batch_size, grad_accum, topk, lr and temperature must be positive.")


def _topk_batch(student: LMStudent, rows: list[tuple], T: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ragged cached top-k into (B, T, k): padded positions get id 0 and log-prob 0 (masked out anyway)."""
    ids = torch.zeros((len(rows), T, k), dtype=torch.long)
    lps = torch.zeros((len(rows), T, k), dtype=torch.float32)
    for i, (tid, tlp) in enumerate(rows):
        n = tid.shape[0]
        ids[i, :n] = torch.tensor(tid, dtype=torch.long)
        lps[i, :n] = torch.tensor(tlp)  # copies: cache rows are read-only buffers
    # A trimmed student sees dropped ids as <other>: the renormalised top-k KD gathers a repeated <other> once
    # per slot; the residual KD (cfg.kd_residual) merges the repeats into one slot with their summed mass.
    return student.map_ids(ids.to(device)), lps.to(device)


@dataclass
class SequenceBatch:
    idx: list[int]  # into the pool: new sequences first, then replayed ones
    picks: list[int]  # into the teacher generations, for sequence KD

    def __len__(self) -> int:
        return len(self.idx)


class SequenceBatches:
    """An endless stream of micro-batches, drawn by one seeded ``random.Random``: ``batch_size - n_old`` new
    sequences and ``n_old = round(replay_fraction * batch_size)`` replayed ones (each without replacement within
    the batch), then ``max(1, batch_size // 4)`` teacher generations for sequence KD."""

    batches_per_epoch = None

    def __init__(self, n_new: int, n_old: int, n_gens: int, cfg: LMDistillConfig):
        self.n_new, self.n_old, self.n_gens, self.bs = n_new, n_old, n_gens, cfg.batch_size
        self.old_per_batch = int(round(cfg.replay_fraction * cfg.batch_size)) if n_old else 0
        self.rng = random.Random(cfg.seed)

    def epoch(self, epoch: int, progress: float, batch_share: float):
        rng = self.rng
        while True:
            idx = rng.sample(range(self.n_new), min(self.bs - self.old_per_batch, self.n_new))
            idx += [self.n_new + j for j in rng.sample(range(self.n_old), min(self.old_per_batch, self.n_old))]
            picks = [rng.randrange(self.n_gens) for _ in range(max(1, self.bs // 4))] if self.n_gens else []
            yield SequenceBatch(idx, picks)

    def state(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"version": version, "internal": list(internal), "gauss": gauss}

    def load_state(self, state: dict) -> None:
        self.rng.setstate((state["version"], tuple(state["internal"]), state["gauss"]))


class LMLoss:
    """``loss_fn`` of the trainer for a causal-LM student: the formula in the module docstring, on a
    ``SequenceBatch``; logs the CE, token-KD and sequence-KD terms."""

    def __init__(self, student: LMStudent, pool: list[list[int]], topk, gens: list[tuple[list[int], list[int]]],
                 cfg: LMDistillConfig, pad_id: int, device):
        self.student, self.pool, self.topk, self.gens = student, pool, topk, gens
        self.cfg, self.pad_id, self.device = cfg, pad_id, device

    def __call__(self, model, batch: SequenceBatch, progress: float) -> tuple[torch.Tensor, dict]:
        cfg, device = self.cfg, self.device
        ids, mask = pad_batch([self.pool[i] for i in batch.idx], self.pad_id)
        ids, mask = ids.to(device), mask.to(device)
        logits = model(ids, mask).float()  # (B, T, V_s)
        ce = lm_ce_loss(logits, self.student.map_ids(ids), mask)
        loss = cfg.alpha * ce
        kd = torch.zeros((), device=device)
        if self.topk is not None:
            rows = [self.topk[i] for i in batch.idx]
            t_ids, t_lps = _topk_batch(self.student, rows, ids.shape[1] - 1, cfg.topk, device)
            kd = token_kd_loss(logits[:, :-1], t_ids, t_lps, mode=cfg.kd_mode, beta=cfg.beta,
                               temperature=cfg.temperature, mask=mask[:, 1:], residual=cfg.kd_residual)
            loss = loss + (1 - cfg.alpha) * kd
        seq = torch.zeros((), device=device)
        if batch.picks:
            seq = self._sequence_kd(model, [self.gens[i] for i in batch.picks])
            loss = loss + cfg.seq_kd_weight * seq
        return loss, {"ce": float(ce.detach()), "kd": float(kd.detach()), "seq_kd": float(seq.detach())}

    def _sequence_kd(self, model, pick: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        g_ids, g_mask = pad_batch([p + g for p, g in pick], self.pad_id)
        learn = torch.zeros_like(g_mask)  # learn the generated tokens only, not the prompt
        for r, (p, g) in enumerate(pick):
            learn[r, len(p):len(p) + len(g)] = 1
        g_ids, g_mask, learn = g_ids.to(self.device), g_mask.to(self.device), learn.to(self.device)
        g_logits = model(g_ids, g_mask)
        return sequence_kd_loss(g_logits.float()[:, :-1], self.student.map_ids(g_ids)[:, 1:], learn[:, 1:])


def trainer_config(cfg: LMDistillConfig, device: str = "cpu", eval_every: int = 0,
                   checkpoint_every: int = 0) -> TrainerConfig:
    """The trainer settings of an LM round: ``cfg.steps`` optimiser steps, linear warm-up then cosine decay."""
    return TrainerConfig(epochs=None, max_steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
                         warmup_share=cfg.warmup_frac, schedule="cosine", grad_accum=cfg.grad_accum,
                         max_grad_norm=cfg.max_grad_norm, eval_every=eval_every, checkpoint_every=checkpoint_every,
                         device="cuda" if str(device).startswith("cuda") else "cpu", seed=cfg.seed)


def _teacher_outputs(teacher, cache: LMSoftLabelCache, pool, cfg: LMDistillConfig, progress: bool):
    """(top-k per sequence or None, [(prompt, generation)]): cache hits, the teacher run only on what is new."""
    topk = cache.get_or_compute_topk(teacher, pool, cfg.topk, progress=progress) if cfg.alpha < 1.0 else None
    gens: list[tuple[list[int], list[int]]] = []
    if cfg.seq_kd_weight > 0:
        prompts = [s[: cfg.seq_kd_prompt_tokens] for s in pool]
        outs = cache.get_or_generate(teacher, prompts, cfg.seq_kd_new_tokens, progress=progress)
        gens = [(p, g) for p, g in zip(prompts, outs) if g]
    return topk, gens


def distill_round(student: LMStudent, teacher: LMTeacher, cache: LMSoftLabelCache, sequences: Sequence[Sequence[int]],
                  cfg: LMDistillConfig = LMDistillConfig(), replay: Sequence[Sequence[int]] = (), pad_id: int = 0,
                  device: str = "cpu", progress: bool = True, heldout: Sequence[Sequence[int]] = (),
                  heldout_every: int = 0, checkpoint_dir: Path | None = None, checkpoint_every: int = 100) -> dict:
    """Train ``student`` in place on ``sequences`` (+ replay); returns the round's history and cache stats.
    With ``heldout`` sequences and ``heldout_every`` > 0, the student's perplexity on them is measured every
    that many steps and at the end (``heldout_curve``): whether more steps would still help, or already hurt.
    With ``checkpoint_dir``, a checkpoint is written every ``checkpoint_every`` steps and a killed round resumes."""
    from kdops.lm.evaluate import perplexity

    new, old = [list(s) for s in sequences if len(s) > 1], [list(s) for s in replay if len(s) > 1]
    if not new:
        raise ValueError("distill_round needs at least one sequence of two or more tokens.")
    pool = new + old
    t0 = time.perf_counter()
    procs = processes(device)
    with procs.main_first():  # under a launcher the teacher runs in the main process; the others read the cache
        topk, gens = _teacher_outputs(teacher, cache, pool, cfg, progress and procs.is_main)
    teacher_seconds = time.perf_counter() - t0
    if cfg.freeze_embeddings:
        student.model.get_input_embeddings().weight.requires_grad_(False)
    measure = bool(heldout) and heldout_every > 0
    trainer = Trainer(trainer_config(cfg, device, heldout_every if measure else 0, checkpoint_every))
    validate = (lambda model: {"ppl": round(perplexity(student, heldout, pad_id)["ppl"], 3)}) if measure else None
    res = trainer.fit(student, SequenceBatches(len(new), len(old), len(gens), cfg),
                      LMLoss(student, pool, topk, gens, cfg, pad_id, trainer.device), validate=validate,
                      checkpoint_dir=checkpoint_dir, progress=progress, desc="distil LM")
    keys = ("loss", "ce", "kd", "seq_kd")
    history = [{"step": r["step"], **{k: round(r[k], 5) for k in keys}} for r in res.steps]
    return {"config": asdict(cfg), "history": history, "teacher_seconds": round(teacher_seconds, 2),
            "train_seconds": round(time.perf_counter() - t0 - teacher_seconds, 2), "cache": cache.stats.to_dict(),
            "generation_cache": cache.gen_stats.to_dict(), "sequences": len(new), "replay_pool": len(old),
            "heldout_curve": res.evals}


def replay_sample(earlier: Sequence[Sequence[int]], n: int, seed: int = 13) -> list[list[int]]:
    """A seeded uniform sample of ``n`` of ``earlier`` sequences (a calibration or vocabulary sample of a round)."""
    earlier = [list(s) for s in earlier]
    return random.Random(seed).sample(earlier, min(n, len(earlier)))
