"""Stage 4 (LM): distil a causal-LM teacher into a student, one incremental round at a time.

Loss per step (Hinton et al. 2015; GKD, Agarwal et al. 2024; Kim & Rush 2016):

    L = alpha * CE(student, next token) + (1 - alpha) * token_kd(student, teacher top-k; mode, beta, T)
        + seq_kd_weight * CE(student, teacher's greedy continuation of a prompt)

The teacher's top-k and generations come from ``LMSoftLabelCache``: the teacher runs only on sequences the
cache has not seen, so a later round pays only for its new text, and replayed earlier text (a seeded
``replay_fraction`` of every batch, against forgetting) costs nothing.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from kdops.lm.cache import LMSoftLabelCache
from kdops.lm.student import LMStudent
from kdops.lm.teacher import LMTeacher, pad_batch
from kdops.losses import lm_ce_loss, sequence_kd_loss, token_kd_loss


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
    replay_fraction: float = field(default=0.25, metadata={"help": "Share of each batch drawn from earlier rounds' text."})
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


def _lr_at(step: int, cfg: LMDistillConfig) -> float:
    warm = max(1, int(cfg.warmup_frac * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))


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


def distill_round(student: LMStudent, teacher: LMTeacher, cache: LMSoftLabelCache, sequences: Sequence[Sequence[int]],
                  cfg: LMDistillConfig = LMDistillConfig(), replay: Sequence[Sequence[int]] = (), pad_id: int = 0,
                  device: str = "cpu", progress: bool = True, heldout: Sequence[Sequence[int]] = (),
                  heldout_every: int = 0) -> dict:
    """Train ``student`` in place on ``sequences`` (+ replay); returns the round's history and cache stats.
    With ``heldout`` sequences and ``heldout_every`` > 0, the student's perplexity on them is measured every
    that many steps and at the end (``heldout_curve``): whether more steps would still help, or already hurt."""
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    new, old = [list(s) for s in sequences if len(s) > 1], [list(s) for s in replay if len(s) > 1]
    if not new:
        raise ValueError("distill_round needs at least one sequence of two or more tokens.")
    pool = new + old
    t0 = time.perf_counter()
    topk = cache.get_or_compute_topk(teacher, pool, cfg.topk, progress=progress) if cfg.alpha < 1.0 else None
    gens: list[tuple[list[int], list[int]]] = []
    if cfg.seq_kd_weight > 0:
        prompts = [s[: cfg.seq_kd_prompt_tokens] for s in pool]
        outs = cache.get_or_generate(teacher, prompts, cfg.seq_kd_new_tokens, progress=progress)
        gens = [(p, g) for p, g in zip(prompts, outs) if g]
    teacher_seconds = time.perf_counter() - t0

    student.to(device).train()
    if cfg.freeze_embeddings:
        student.model.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if str(device).startswith("cuda") else torch.autocast(
        "cpu", enabled=False)
    n_old = int(round(cfg.replay_fraction * cfg.batch_size)) if old else 0
    history, bar = [], tqdm(range(cfg.steps), desc="distil LM", unit="step", disable=not progress)
    curve: list[dict] = []

    def measure(step: int) -> None:
        from kdops.lm.evaluate import perplexity

        student.eval()
        curve.append({"step": step, "ppl": round(perplexity(student, heldout, pad_id)["ppl"], 3)})
        student.train()

    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        totals = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "seq_kd": 0.0}
        for _ in range(cfg.grad_accum):
            idx = rng.sample(range(len(new)), min(cfg.batch_size - n_old, len(new)))
            idx += [len(new) + j for j in rng.sample(range(len(old)), min(n_old, len(old)))]
            ids, mask = pad_batch([pool[i] for i in idx], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            with autocast:
                logits = student(ids, mask)  # (B, T, V_s)
            logits = logits.float()
            ce = lm_ce_loss(logits, student.map_ids(ids), mask)
            loss = cfg.alpha * ce
            kd = torch.zeros((), device=device)
            if topk is not None:
                t_ids, t_lps = _topk_batch(student, [topk[i] for i in idx], ids.shape[1] - 1, cfg.topk, device)
                kd = token_kd_loss(logits[:, :-1], t_ids, t_lps, mode=cfg.kd_mode, beta=cfg.beta,
                                   temperature=cfg.temperature, mask=mask[:, 1:], residual=cfg.kd_residual)
                loss = loss + (1 - cfg.alpha) * kd
            seq = torch.zeros((), device=device)
            if gens:
                pick = [gens[rng.randrange(len(gens))] for _ in range(max(1, cfg.batch_size // 4))]
                g_ids, g_mask = pad_batch([p + g for p, g in pick], pad_id)
                learn = torch.zeros_like(g_mask)  # learn the generated tokens only, not the prompt
                for r, (p, g) in enumerate(pick):
                    learn[r, len(p):len(p) + len(g)] = 1
                g_ids, g_mask, learn = g_ids.to(device), g_mask.to(device), learn.to(device)
                with autocast:
                    g_logits = student(g_ids, g_mask)
                seq = sequence_kd_loss(g_logits.float()[:, :-1], student.map_ids(g_ids)[:, 1:], learn[:, 1:])
                loss = loss + cfg.seq_kd_weight * seq
            (loss / cfg.grad_accum).backward()
            for key, v in (("loss", loss), ("ce", ce), ("kd", kd), ("seq_kd", seq)):
                totals[key] += float(v.detach()) / cfg.grad_accum
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append({"step": step, **{k: round(v, 5) for k, v in totals.items()}})
        bar.set_postfix(ce=f"{totals['ce']:.3f}", kd=f"{totals['kd']:.3f}")
        if heldout and heldout_every > 0 and ((step + 1) % heldout_every == 0 or step + 1 == cfg.steps):
            measure(step + 1)
    student.eval()
    return {"config": asdict(cfg), "history": history, "teacher_seconds": round(teacher_seconds, 2),
            "train_seconds": round(time.perf_counter() - t0 - teacher_seconds, 2), "cache": cache.stats.to_dict(),
            "generation_cache": cache.gen_stats.to_dict(), "sequences": len(new), "replay_pool": len(old),
            "heldout_curve": curve}


def replay_sample(earlier: Sequence[Sequence[int]], n: int, seed: int = 13) -> list[list[int]]:
    """A seeded uniform sample of earlier rounds' sequences to replay (their top-k are cache hits)."""
    earlier = [list(s) for s in earlier]
    return random.Random(seed).sample(earlier, min(n, len(earlier)))
