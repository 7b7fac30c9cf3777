"""Schedules, the difficulty curriculum and hard-example weights: exact values and properties."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from kdops.schedules import Curriculum, Schedule, hard_example_weights, teacher_entropy


@pytest.mark.parametrize(
    "schedule, progress, expected",
    [
        (Schedule(5.0, 1.0), 0.0, 5.0),
        (Schedule(5.0, 1.0), 0.5, 3.0),
        (Schedule(5.0, 1.0), 1.0, 1.0),
        (Schedule(0.3, 0.7, "cosine"), 0.0, 0.3),
        (Schedule(0.3, 0.7, "cosine"), 0.5, 0.5),
        (Schedule(0.3, 0.7, "cosine"), 0.25, 0.3 + 0.4 * (1 - math.cos(math.pi / 4)) / 2),
        (Schedule(0.3, 0.7, "cosine"), 1.0, 0.7),
        (Schedule.constant(2.0), 0.7, 2.0),
        (Schedule(4.0, 1.0, "step"), 0.49, 4.0),
        (Schedule(4.0, 1.0, "step"), 0.5, 1.0),
        (Schedule(4.0, 1.0, "step", steps=4), 0.3, 3.0),
        (Schedule(4.0, 1.0, "step", steps=4), 1.0, 1.0),
        (Schedule(5.0, 1.0), -0.5, 5.0),  # clamped
        (Schedule(5.0, 1.0), 1.5, 1.0),
    ],
)
def test_schedule_values(schedule, progress, expected):
    assert math.isclose(schedule(progress), expected, rel_tol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "cosine", "step"])
def test_schedule_monotone_between_endpoints(kind):
    s = Schedule(5.0, 1.0, kind)
    values = [s(p) for p in np.linspace(0, 1, 21)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[0] == 5.0 and values[-1] == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(start=1.0, end=2.0, kind="exp"), "kind"),
        (dict(start=1.0, end=2.0, kind="constant"), "constant"),
        (dict(start=float("nan"), end=2.0), "finite"),
        (dict(start=1.0, end=2.0, kind="step", steps=1), "steps"),
    ],
)
def test_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)


def test_schedule_frozen_and_nan_progress():
    s = Schedule(1.0, 2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.start = 3.0
    with pytest.raises(ValueError, match="NaN"):
        s(float("nan"))


def _hard_share(idx, difficulty):
    return float(np.mean(difficulty[idx] > np.median(difficulty)))


def test_curriculum_hard_share_rises_with_progress():
    difficulty = np.arange(100, dtype=float)
    cur = Curriculum(start_share=0.2, end_share=0.8)
    rng = np.random.default_rng(0)
    for progress, share in [(0.0, 0.2), (0.5, 0.5), (1.0, 0.8)]:
        idx = cur.select(difficulty, progress, 20, rng)
        assert idx.dtype == np.int64 and idx.shape == (20,) and len(set(idx.tolist())) == 20
        assert _hard_share(idx, difficulty) == pytest.approx(share)


def test_curriculum_deterministic_given_rng_and_shuffled():
    difficulty = np.random.default_rng(1).random(50)
    cur = Curriculum()
    a = cur.select(difficulty, 0.3, 16, np.random.default_rng(7))
    b = cur.select(difficulty, 0.3, 16, np.random.default_rng(7))
    assert np.array_equal(a, b)
    hard = difficulty[a] > np.median(difficulty)
    assert not (np.all(hard[:5]) and not np.any(hard[5:]))  # not hard-first: the batch is permuted


def test_curriculum_small_pools_and_oversized_batch():
    rng = np.random.default_rng(2)
    flat = np.ones(10)  # nothing above the median: every example is "easy"
    assert sorted(Curriculum().select(flat, 1.0, 10, rng).tolist()) == list(range(10))
    difficulty = np.arange(6, dtype=float)  # 3 hard, 3 easy; asking for 5 hard tops up from easy
    idx = Curriculum(end_share=1.0).select(difficulty, 1.0, 5, rng)
    assert len(set(idx.tolist())) == 5 and _hard_share(idx, difficulty) == pytest.approx(3 / 5)
    big = Curriculum(start_share=0.5).select(difficulty, 0.0, 20, rng)
    assert big.shape == (20,) and big.max() < 6 and _hard_share(big, difficulty) == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs", [dict(start_share=-0.1), dict(end_share=1.2), dict(by="loss")])
def test_curriculum_validation(kwargs):
    with pytest.raises(ValueError):
        Curriculum(**kwargs)


def test_curriculum_select_rejects_bad_inputs():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        Curriculum().select(np.array([]), 0.5, 4, rng)
    with pytest.raises(ValueError):
        Curriculum().select(np.arange(4.0), 0.5, 0, rng)


def test_teacher_entropy_values():
    logits = np.array([[0.0, 0.0, 0.0, 0.0], [1000.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    h = teacher_entropy(logits)
    p = np.exp([1.0, 2.0, 3.0, 4.0]) / np.exp([1.0, 2.0, 3.0, 4.0]).sum()
    assert h.shape == (3,) and math.isclose(h[0], math.log(4), rel_tol=1e-12)
    assert h[1] == pytest.approx(0.0, abs=1e-12)
    assert math.isclose(h[2], float(-(p * np.log(p)).sum()), rel_tol=1e-12)
    assert np.allclose(teacher_entropy(torch.tensor(logits, requires_grad=True)), h)


def test_hard_example_weights_properties():
    loss = torch.tensor([0.1, 2.0, 0.5, 1.0], requires_grad=True)
    w = hard_example_weights(loss, power=1.0, floor=0.5)
    assert not w.requires_grad and w.shape == (4,)
    assert w.mean().item() == pytest.approx(1.0)
    assert torch.equal(torch.argsort(w), torch.argsort(loss.detach()))
    assert w.min().item() >= 0.5
    sharper = hard_example_weights(loss, power=2.0, floor=0.5)
    assert sharper.max() > w.max() and sharper.mean().item() == pytest.approx(1.0)
    assert torch.equal(hard_example_weights(loss, power=0.0), torch.ones(4))
    assert torch.equal(hard_example_weights(torch.zeros(3)), torch.ones(3))
    assert torch.allclose(hard_example_weights(loss, floor=1.0), torch.ones(4))


@pytest.mark.parametrize("kwargs", [dict(power=-1.0), dict(floor=1.5)])
def test_hard_example_weights_validation(kwargs):
    with pytest.raises(ValueError):
        hard_example_weights(torch.ones(3), **kwargs)
