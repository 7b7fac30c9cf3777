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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

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
