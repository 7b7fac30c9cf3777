"""How a trimmed LM student spreads ``<other>``'s probability over the ids its vocabulary dropped.

A trimmed student (kdops.lm.student) predicts one ``<other>`` bucket for every dropped id. Scoring a dropped id
as ``p(<other>) / #dropped`` (uniform) is what made most of the LM student's perplexity gap: 2.9 % of held-out
movie tokens are dropped ids, and log(26,692) nats each cost a factor 1.34 (bench/lm_vocab.py). ``fit_tail``
learns a context-free distribution over the dropped ids instead, at no cost per token:

- the teacher's probability mass on each dropped id, summed over the round's positions (its cached top-k, so
  no new teacher calls) plus the dropped ids' counts as targets in that text;
- mixed with a prior for ids never seen (uniform, or Zipf in the id: byte-level BPE numbers frequent merges
  first), with the prior and the mixing weight chosen on a held-out share of the round's own text.

The result is a (full_vocab,) log-probability vector (0 at kept ids), stored with the student.

``fit_tail_head`` goes further, with the student frozen after distillation: a ``TailHead`` reads the student's
last hidden state, moves ``<other>``'s logit and spreads its mass with a rank-r softmax over the dropped ids,
fitted against the teacher's full next-token distributions on a share of the round's sentences. Its
loss is the expected NLL of a token drawn from the teacher, as far as the head can change it. What it buys on
the recipe of record is in bench/README.md (``bench/lm.py``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

WEIGHTS = (0.0, 0.25, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)  # mixing weight of the empirical part


@dataclass
class TailFit:
    logprob: torch.Tensor  # (full_vocab,), log p(id | <other>) at dropped ids, 0 at kept ids
    prior: str
    weight: float
    heldout_tokens: int  # dropped-id targets in the held-out share the choice was made on
    heldout_nats: float  # their mean -log tail under the choice (uniform: log #dropped)
    uniform_nats: float

    def summary(self) -> dict:
        return {"prior": self.prior, "weight": self.weight, "heldout_tokens": self.heldout_tokens,
                "heldout_nats": round(self.heldout_nats, 4), "uniform_nats": round(self.uniform_nats, 4)}


def uniform_tail(full_vocab: int, keep_ids: torch.Tensor) -> torch.Tensor:
    dropped = _dropped_mask(full_vocab, keep_ids)
    out = torch.zeros(full_vocab)
    out[dropped] = -math.log(max(1, int(dropped.sum())))
    return out


def _dropped_mask(full_vocab: int, keep_ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(full_vocab, dtype=torch.bool)
    mask[torch.as_tensor(keep_ids, dtype=torch.long)] = False
    return mask


def _mass(full_vocab: int, sequences: Sequence[Sequence[int]], topk: Sequence[tuple] | None) -> np.ndarray:
    """Per id: its count as a target (positions 1..) plus the teacher's top-k probability summed over positions."""
    mass = np.zeros(full_vocab, np.float64)
    for i, seq in enumerate(sequences):
        np.add.at(mass, np.asarray(seq[1:], np.int64), 1.0)
        if topk is not None:
            ids, lps = topk[i]
            np.add.at(mass, ids.reshape(-1).astype(np.int64), np.exp(lps.reshape(-1).astype(np.float64)))
    return mass


def _priors(dropped_ids: np.ndarray) -> dict[str, np.ndarray]:
    zipf = 1.0 / (dropped_ids.astype(np.float64) + 1.0)
    return {"uniform": np.full(len(dropped_ids), 1.0 / len(dropped_ids)), "zipf": zipf / zipf.sum()}


def fit_tail(full_vocab: int, keep_ids: torch.Tensor, sequences: Sequence[Sequence[int]],
             topk: Sequence[tuple] | None = None, heldout: float = 0.2, seed: int = 13) -> TailFit:
    """Fit the dropped-id distribution on ``sequences`` (full-vocabulary ids) and their teacher top-k
    (``(ids (L-1, k), logprobs (L-1, k))`` per sequence, as kdops.lm.cache returns; None: counts only)."""
    dropped = _dropped_mask(full_vocab, keep_ids).numpy()
    dropped_ids = np.flatnonzero(dropped)
    n_dropped = len(dropped_ids)
    uniform_nats = math.log(max(1, n_dropped))
    if n_dropped == 0:
        return TailFit(torch.zeros(full_vocab), "uniform", 0.0, 0, 0.0, 0.0)
    order = np.random.default_rng(seed).permutation(len(sequences))
    n_held = int(round(heldout * len(sequences))) if len(sequences) > 1 else 0
    held, fit = order[:n_held], order[n_held:]
    pick = (lambda idx: [topk[i] for i in idx]) if topk is not None else (lambda idx: None)
    fit_mass = _mass(full_vocab, [sequences[i] for i in fit], pick(fit))[dropped_ids]
    targets = np.concatenate([np.asarray(sequences[i][1:], np.int64) for i in held]) if n_held else np.zeros(0, np.int64)
    targets = targets[dropped[targets]]  # the held-out tokens that need the tail
    where = np.searchsorted(dropped_ids, targets)
    priors = _priors(dropped_ids)
    best = ("uniform", 0.0, uniform_nats)
    if len(targets) and fit_mass.sum() > 0:
        emp = fit_mass / fit_mass.sum()
        for name, prior in priors.items():
            for w in WEIGHTS:
                nats = float(-np.log(w * emp[where] + (1 - w) * prior[where]).mean())
                if nats < best[2]:
                    best = (name, w, nats)
    elif len(targets):  # no empirical mass to fit: still pick the better prior
        for name, prior in priors.items():
            nats = float(-np.log(prior[where]).mean())
            if nats < best[2]:
                best = (name, 0.0, nats)
    name, w, nats = best
    all_mass = _mass(full_vocab, sequences, topk)[dropped_ids]
    emp = all_mass / all_mass.sum() if all_mass.sum() > 0 else priors[name]
    tail = w * emp + (1 - w) * priors[name]
    out = torch.zeros(full_vocab)
    out[torch.from_numpy(dropped_ids)] = torch.from_numpy(np.log(tail)).float()
    return TailFit(out, name, w, int(len(targets)), nats, uniform_nats)


# ---------------------------------------------------------------------------------------------
# Context tail: <other>'s share and its spread over the dropped ids, from the student's last hidden state


@dataclass(frozen=True)
class TailConfig:
    """A trimmed student's context tail (``TailHead``), fitted after distillation with the student frozen."""

    rank: int = field(default=64, metadata={"help": "Rank of the dropped-id softmax (0: no context tail, the context-free tail only)."})
    calibration_fraction: float = field(default=0.1, metadata={"help": "Share of the round's sentences the head is fitted on (a seeded sample)."})
    calibration_max: int = field(default=1000, metadata={"help": "At most this many sentences."})
    # Off by default: holding the sentences out of distillation measured no better, so the student trains on all text
    holdout: bool = field(default=False, metadata={"help": "Hold those sentences out of distillation (and follow the student's perplexity on them while it trains)."})
    topm: int = field(default=64, metadata={"help": "Teacher's most likely dropped ids kept per position as the tail's target."})
    steps: int = field(default=600, metadata={"help": "Adam steps fitting the head."})
    batch_size: int = field(default=512, metadata={"help": "Positions per step."})
    lr: float = field(default=3e-3, metadata={"help": "Adam learning rate."})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay on the head."})
    val_fraction: float = field(default=0.2, metadata={"help": "Share of the held-out sentences the best step is chosen on."})
    seed: int = field(default=13, metadata={"help": "Seed for the split and the batches."})

    def __post_init__(self) -> None:
        if self.rank < 0 or self.topm < 1 or self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("rank must be >= 0; topm, steps, batch_size and lr positive.")
        if not 0.0 <= self.calibration_fraction < 1.0 or not 0.0 < self.val_fraction < 1.0:
            raise ValueError("calibration_fraction must be in [0, 1) and val_fraction in (0, 1).")


class TailHead(nn.Module):
    """What a trimmed student's last hidden state ``h`` adds to its ``<other>`` bucket:

    - ``shift(h) = h . other_w + other_b`` moves ``<other>``'s logit. Distillation leaves ``<other>`` far too
      unlikely on unseen text: the teacher's top-k holds a fifth of its mass on the dropped ids, and on its
      own training text (every id of 80 % of which is kept) the student learns that they rarely occur. On the
      bench student p(``<other>``) averaged 0.24 % over held-out positions where the teacher gave them 2.66 %.
    - ``p(id | <other>, h) = softmax(bias + rows @ (proj @ h))`` over the dropped ids: a rank-``r`` adaptive-
      softmax tail whose ``bias`` is the context-free tail (the student's ``tail_logprob``).

    ``rows`` and the shift start at zero, so an unfitted head scores exactly as the context-free tail does."""

    def __init__(self, num_dropped: int, hidden: int, rank: int):
        super().__init__()
        self.other_w = nn.Parameter(torch.zeros(hidden))
        self.other_b = nn.Parameter(torch.zeros(()))
        self.proj = nn.Parameter(torch.zeros(rank, hidden))
        self.rows = nn.Parameter(torch.zeros(num_dropped, rank))

    @property
    def rank(self) -> int:
        return int(self.proj.shape[0])

    def shift(self, h: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (...): added to ``<other>``'s logit."""
        return h.float() @ self.other_w + self.other_b

    def tail_logits(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """(N, H), (D,) -> (N, D) unnormalised log p(dropped id | <other>, h)."""
        return (h.float() @ self.proj.T) @ self.rows.T + bias

    def state(self) -> dict[str, torch.Tensor]:
        return {f"head_{k}": v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> "TailHead | None":
        if "head_rows" not in tensors:
            return None
        rows, proj = tensors["head_rows"], tensors["head_proj"]
        head = cls(rows.shape[0], proj.shape[1], proj.shape[0])
        head.load_state_dict({k[len("head_"):]: v for k, v in tensors.items() if k.startswith("head_")})
        return head


@dataclass
class HeadFit:
    head: TailHead
    tail_logprob: torch.Tensor  # (full_vocab,): the fitted bias, log-normalised over the dropped ids
    info: dict

    def summary(self) -> dict:
        return self.info


def _teacher_targets(teacher_model, sequences, dropped: torch.Tensor, pad_id: int, topm: int, batch_size: int = 16):
    """Per real position of ``sequences``: the teacher's log P(dropped ids) and its ``topm`` most likely dropped
    ids (as indices into the dropped ids) with their log-probabilities given a dropped id."""
    from kdops.lm.teacher import padded_batches

    log_mass, idx, cond = [], [], []
    with torch.inference_mode():
        for _, ids, mask in padded_batches(sequences, pad_id, batch_size, next(teacher_model.parameters()).device):
            lp = torch.log_softmax(teacher_model(input_ids=ids, attention_mask=mask,
                                                 use_cache=False).logits[:, :-1].float(), -1).cpu()
            valid = mask[:, 1:].bool().cpu()
            ld = lp[valid][:, dropped]  # (N, D)
            m = torch.logsumexp(ld, -1)
            v, i = ld.topk(min(topm, ld.shape[1]), -1)
            log_mass.append(m)
            idx.append(i)
            cond.append(v - m[:, None])
    return torch.cat(log_mass), torch.cat(idx), torch.cat(cond)


def _student_features(student, sequences, pad_id: int, batch_size: int = 16):
    """Per real position: the student's last hidden state and logit(p(<other>)) before any head."""
    from kdops.lm.teacher import padded_batches

    hs, so = [], []
    with torch.inference_mode():
        for _, ids, mask in padded_batches(sequences, pad_id, batch_size, next(student.model.parameters()).device):
            logits, hidden = student.logits_and_hidden(ids, mask)
            valid = mask[:, 1:].bool().cpu()
            logits = logits[:, :-1].float().cpu()[valid]
            o = student.other_id
            so.append(logits[:, o] - torch.logsumexp(logits[:, :o], -1))
            hs.append(hidden[:, :-1].float().cpu()[valid])
    return torch.cat(hs), torch.cat(so)


def head_loss(head: TailHead, bias: torch.Tensor, h, s_other, t_log_mass, t_idx, t_cond) -> torch.Tensor:
    """Per position, the expected NLL (beyond what the head cannot change) of a token drawn from the teacher:
    the <other>-or-not split (a binary cross-entropy against the teacher's mass on the dropped ids) plus, with
    that mass as weight, the cross-entropy of the tail against the teacher's top-m dropped ids."""
    split = torch.nn.functional.binary_cross_entropy_with_logits(s_other + head.shift(h), t_log_mass.exp(),
                                                                 reduction="none")
    tail = torch.log_softmax(head.tail_logits(h, bias), -1).gather(-1, t_idx)
    return split - t_log_mass.exp() * (t_cond.exp() * tail).sum(-1)


def fit_tail_head(student, teacher_model, sequences: Sequence[Sequence[int]], pad_id: int,
                  cfg: TailConfig = TailConfig(), teacher_embedding: torch.Tensor | None = None,
                  progress: bool = False) -> HeadFit:
    """Fit a ``TailHead`` for a trimmed ``student`` (frozen) on ``sequences`` it was not trained on, against the
    teacher's full next-token distributions there (one teacher forward pass). ``teacher_embedding`` (V, H), if
    given, starts ``proj`` on the top singular directions of its dropped rows (else a seeded random start).
    The best step on a held-out share of the sentences is kept, and kept only if it beats the context-free tail."""
    from tqdm.auto import tqdm

    if not student.trimmed or cfg.rank < 1:
        raise ValueError("fit_tail_head needs a trimmed student and cfg.rank >= 1.")
    seqs = [list(s) for s in sequences if len(s) > 1]
    if len(seqs) < 2:
        raise ValueError("fit_tail_head needs at least two sequences of two or more tokens.")
    dropped = _dropped_mask(student.full_vocab_size, student.keep_ids.cpu())
    dropped_ids = torch.nonzero(dropped).squeeze(-1)
    t0 = time.perf_counter()
    order = np.random.default_rng(cfg.seed).permutation(len(seqs))
    n_val = max(1, int(round(cfg.val_fraction * len(seqs))))
    parts = {"val": [seqs[i] for i in order[:n_val]], "fit": [seqs[i] for i in order[n_val:]]}
    data = {}
    for name, part in parts.items():
        h, so = _student_features(student, part, pad_id)
        data[name] = (h, so, *_teacher_targets(teacher_model, part, dropped_ids, pad_id, cfg.topm))
    hidden = data["fit"][0].shape[1]
    rank = min(cfg.rank, len(dropped_ids), hidden)  # no use beyond the rank of the dropped rows
    head = TailHead(len(dropped_ids), hidden, rank)
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        if teacher_embedding is not None and teacher_embedding.shape[1] == hidden:
            _, _, vh = torch.linalg.svd(teacher_embedding[dropped_ids].float(), full_matrices=False)
            head.proj.copy_(vh[:rank])
        else:
            head.proj.copy_(torch.randn(rank, hidden, generator=g) / math.sqrt(hidden))
    bias = nn.Parameter(student.tail_logprob.detach().cpu()[dropped_ids].clone())
    opt = torch.optim.AdamW([*head.parameters(), bias], lr=cfg.lr, weight_decay=cfg.weight_decay)

    def val_loss() -> float:
        with torch.no_grad():
            h, so, lm, ti, tc = data["val"]
            return float(sum(head_loss(head, bias, h[s:s + 2048], so[s:s + 2048], lm[s:s + 2048], ti[s:s + 2048],
                                       tc[s:s + 2048]).sum() for s in range(0, len(h), 2048)) / len(h))

    start = best = val_loss()
    best_state, best_step = ({k: v.clone() for k, v in head.state_dict().items()}, bias.detach().clone()), 0
    n_fit = data["fit"][0].shape[0]
    for step in tqdm(range(1, cfg.steps + 1), desc="fit tail head", unit="step", disable=not progress):
        pick = torch.randint(0, n_fit, (min(cfg.batch_size, n_fit),), generator=g)
        loss = head_loss(head, bias, *(x[pick] for x in data["fit"])).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.steps:
            v = val_loss()
            if v < best:
                best, best_step = v, step
                best_state = ({k: x.clone() for k, x in head.state_dict().items()}, bias.detach().clone())
    head.load_state_dict(best_state[0])
    tail = torch.zeros(student.full_vocab_size)
    tail[dropped_ids] = torch.log_softmax(best_state[1], -1)
    info = {"rank": rank, "sentences": len(seqs), "fit_positions": n_fit, "val_positions": int(data["val"][0].shape[0]),
            "val_nats_context_free": round(start, 5), "val_nats": round(best, 5), "best_step": best_step,
            "teacher_mass_dropped": round(float(data["val"][2].exp().mean()), 5),
            "student_p_other_before": round(float(torch.sigmoid(data["val"][1]).mean()), 5),
            "student_p_other_after": round(float(torch.sigmoid(data["val"][1] + head.shift(data["val"][0]).detach()).mean()), 5),
            "params": sum(p.numel() for p in head.parameters()),
            "seconds": round(time.perf_counter() - t0, 1)}
    return HeadFit(head, tail, info)
