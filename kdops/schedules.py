"""Schedules over training progress, a difficulty curriculum, and hard-example weights.

``progress`` is the fraction of training done, in [0, 1] (values outside are clamped). A ``Schedule``
anneals one scalar: the KD temperature (5 → 1) or a loss weight (KD weight 0.3 → 0.7). A ``Curriculum``
raises the share of hard examples in each batch as training goes on (Bengio et al. 2009).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

SCHEDULE_KINDS = ("linear", "cosine", "constant", "step")
DIFFICULTY_SIGNALS = ("teacher_entropy", "student_loss")


def _clamp_progress(progress: float) -> float:
    progress = float(progress)
    if math.isnan(progress):
        raise ValueError("progress is NaN.")
    return min(max(progress, 0.0), 1.0)


@dataclass(frozen=True)
class Schedule:
    start: float = field(metadata={"help": "Value at progress 0."})
    end: float = field(metadata={"help": "Value at progress 1 (must equal start for 'constant')."})
    kind: str = field(
        default="linear",
        metadata={"help": "linear | cosine (half-cosine ease) | constant | step (staircase)."},
    )
    steps: int = field(
        default=2,
        metadata={"help": "Levels of a 'step' schedule, evenly spaced start..end; 2 = end from halfway on."},
    )

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"Schedule kind must be one of {SCHEDULE_KINDS}, got {self.kind!r}.")
        if not (math.isfinite(self.start) and math.isfinite(self.end)):
            raise ValueError(f"Schedule start and end must be finite, got {self.start} and {self.end}.")
        if self.kind == "constant" and self.start != self.end:
            raise ValueError(
                f"A 'constant' schedule needs start == end, got {self.start} and {self.end}; "
                "use Schedule.constant(value)."
            )
        if not isinstance(self.steps, int) or self.steps < 2:
            raise ValueError(f"Schedule steps must be an int >= 2, got {self.steps!r}.")

    @classmethod
    def constant(cls, value: float) -> Schedule:
        return cls(value, value, "constant")

    def __call__(self, progress: float) -> float:
        """The value at ``progress`` (clamped to [0, 1])."""
        p = _clamp_progress(progress)
        if self.kind == "constant":
            return float(self.start)
        if self.kind == "linear":
            frac = p
        elif self.kind == "cosine":
            frac = (1.0 - math.cos(math.pi * p)) / 2.0
        else:  # step: level min(floor(p·steps), steps−1) of steps evenly spaced levels
            frac = min(int(p * self.steps), self.steps - 1) / (self.steps - 1)
        return float(self.start + (self.end - self.start) * frac)


@dataclass(frozen=True)
class Curriculum:
    start_share: float = field(default=0.2, metadata={"help": "Hard share of a batch at progress 0."})
    end_share: float = field(default=0.8, metadata={"help": "Hard share of a batch at progress 1."})
    by: str = field(
        default="teacher_entropy",
        metadata={"help": "Difficulty signal the caller computes: teacher_entropy (see teacher_entropy()) or "
                          "student_loss (per-example loss of the current student)."},
    )

    def __post_init__(self) -> None:
        for name in ("start_share", "end_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Curriculum {name} must be in [0, 1], got {value}.")
        if self.by not in DIFFICULTY_SIGNALS:
            raise ValueError(f"Curriculum by must be one of {DIFFICULTY_SIGNALS}, got {self.by!r}.")

    def hard_share(self, progress: float) -> float:
        """Target share of hard examples at ``progress``: linear from start_share to end_share."""
        return self.start_share + (self.end_share - self.start_share) * _clamp_progress(progress)

    def select(
        self, difficulty: np.ndarray, progress: float, batch: int, rng: np.random.Generator
    ) -> np.ndarray:
        """Indices (batch,) int64 into ``difficulty`` (N,) for one batch, in random order.

        "Hard" = difficulty strictly above the median, the rest is "easy". ``round(hard_share·batch)``
        indices are drawn from the hard pool and the rest from the easy pool, without replacement; a pool
        too small is topped up from the other (so with all difficulties equal, every index is "easy").
        Only when ``batch > N`` are indices drawn with replacement.
        """
        difficulty = np.asarray(difficulty, dtype=np.float64).reshape(-1)
        n = difficulty.size
        if n == 0:
            raise ValueError("difficulty is empty.")
        if batch <= 0:
            raise ValueError(f"batch must be positive, got {batch}.")
        if np.isnan(difficulty).any():
            raise ValueError("difficulty contains NaN.")
        is_hard = difficulty > np.median(difficulty)
        hard, easy = np.flatnonzero(is_hard), np.flatnonzero(~is_hard)
        if batch > n:  # more than the pool holds: sample each group with replacement at the target share
            n_hard = round(self.hard_share(progress) * batch) if hard.size else 0  # easy is never empty
            picked = np.concatenate([
                rng.choice(hard, n_hard, replace=True) if n_hard else hard[:0],
                rng.choice(easy, batch - n_hard, replace=True),
            ])
        else:
            n_hard = min(round(self.hard_share(progress) * batch), hard.size)
            n_hard = max(n_hard, batch - easy.size)  # top up from the hard pool when easy runs short
            picked = np.concatenate([rng.choice(hard, n_hard, replace=False),
                                     rng.choice(easy, batch - n_hard, replace=False)])
        return rng.permutation(picked).astype(np.int64)


def teacher_entropy(logits: np.ndarray | Tensor) -> np.ndarray:
    """Entropy (nats) of ``softmax(logits)`` along the last axis: (N, C) → (N,), float64.

    Computed from a max-shifted log-softmax so large logits do not overflow.
    """
    if isinstance(logits, Tensor):
        logits = logits.detach().cpu().numpy()
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -(np.exp(log_p) * log_p).sum(axis=-1)


def hard_example_weights(per_example_loss: Tensor, power: float = 1.0, floor: float = 0.5) -> Tensor:
    """Per-example weights (B,), mean exactly 1, increasing with the loss; detached.

    ``w_i = floor + (1 − floor) · ℓ_i^power / mean_j(ℓ_j^power)`` with ℓ clamped at 0. Every weight is
    ≥ ``floor`` (easy examples are down-weighted, never dropped), ``power`` sharpens the emphasis
    (0 = uniform), and the mean is 1 so the loss scale and learning rate keep their meaning. All-zero
    losses give all-ones. Feed the result to ``response_kd_loss(weights=...)``.
    """
    if power < 0:
        raise ValueError(f"power must be >= 0, got {power}.")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1], got {floor}.")
    if per_example_loss.dim() != 1 or per_example_loss.numel() == 0:
        raise ValueError(
            f"per_example_loss must be a non-empty (B,) tensor, got {tuple(per_example_loss.shape)}."
        )
    loss = per_example_loss.detach().clamp(min=0)
    scores = loss.pow(power)
    mean = scores.mean()
    if not bool(mean > 0):
        return torch.ones_like(loss)
    return floor + (1.0 - floor) * scores / mean
