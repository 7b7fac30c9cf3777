"""token_kd_loss (token-level KD against a teacher's cached top-k), tested by its properties; its golden values
are with the other losses' in tests/test_losses.py. A top-k covering the whole vocabulary makes the
forward/reverse swap exact."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdops.losses import token_kd_loss
from tests.test_losses import _logits

def _full_topk(a):
    ids = torch.arange(a.shape[-1]).expand(*a.shape[:-1], -1)
    return ids, F.log_softmax(a, -1)


@pytest.mark.parametrize("mode", ["forward", "reverse", "jsd"])
def test_token_zero_for_identical_distributions(mode):
    a = _logits(2, 3, 5, seed=13)
    ids, lps = _full_topk(a)
    assert token_kd_loss(a, ids, lps, mode=mode, temperature=2.0).item() == pytest.approx(0.0, abs=1e-12)


def test_token_topk_renormalisation_ignores_outside_ids():
    a = _logits(1, 2, 6, seed=14)
    ids = torch.tensor([[[0, 2, 4], [1, 3, 5]]])
    lps = torch.gather(F.log_softmax(a, -1), -1, ids) - 1.7  # any constant offset is renormalised away
    b = a.clone()
    b[..., [1, 3, 5]] += torch.tensor([3.0, -2.0, 1.0], dtype=a.dtype)  # row 0 ignores 1,3,5
    b[0, 1] = a[0, 1]
    assert token_kd_loss(a, ids, lps).item() == pytest.approx(0.0, abs=1e-12)
    assert token_kd_loss(b, ids, lps).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_token_forward_reverse_swap_and_jsd_symmetry(temperature):
    a, b = _logits(2, 3, 5, seed=15, scale=2.0), _logits(2, 3, 5, seed=16, scale=2.0)
    (ia, la), (ib, lb) = _full_topk(a), _full_topk(b)
    fwd = token_kd_loss(a, ib, lb, mode="forward", temperature=temperature)
    rev = token_kd_loss(b, ia, la, mode="reverse", temperature=temperature)
    assert torch.allclose(fwd, rev)
    assert not torch.allclose(fwd, token_kd_loss(a, ib, lb, mode="reverse", temperature=temperature))
    jab = token_kd_loss(a, ib, lb, mode="jsd", beta=0.5, temperature=temperature)
    jba = token_kd_loss(b, ia, la, mode="jsd", beta=0.5, temperature=temperature)
    assert torch.allclose(jab, jba)


def test_token_jsd_bounded_by_log2_and_limits():
    a, b = _logits(2, 4, 5, seed=17, scale=30.0), _logits(2, 4, 5, seed=18, scale=30.0)
    ids, lps = _full_topk(b)
    assert 0.0 < token_kd_loss(a, ids, lps, mode="jsd", beta=0.5).item() <= math.log(2) + 1e-9
    a, lps = a / 30, lps / 30  # moderate logits for the limits

    def loss(**kw):
        return token_kd_loss(a, ids, lps, **kw)

    fwd, rev = loss(mode="forward"), loss(mode="reverse")
    assert torch.equal(loss(mode="jsd", beta=0.0), fwd)
    assert torch.equal(loss(mode="jsd", beta=1.0), rev)
    small = 1e-4  # JSD_β/β → forward KL as β → 0, JSD_β/(1−β) → reverse KL as β → 1
    assert loss(mode="jsd", beta=small).item() / small == pytest.approx(fwd.item(), rel=1e-2)
    assert loss(mode="jsd", beta=1 - small).item() / small == pytest.approx(rev.item(), rel=1e-2)


def test_token_mask_respected_even_with_garbage():
    a, b = _logits(2, 3, 5, seed=19), _logits(2, 3, 5, seed=20)
    ids, lps = _full_topk(b)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    garbage = lps.clone()
    garbage[0, 2] = float("nan")
    garbage[1, 1:] = -float("inf")
    a_req = a.clone().requires_grad_()
    out = token_kd_loss(a_req, ids, garbage, mask=mask)
    out.backward()
    expected = torch.stack([token_kd_loss(a[0:1, :2], ids[0:1, :2], lps[0:1, :2]) * 2,
                            token_kd_loss(a[1:2, :1], ids[1:2, :1], lps[1:2, :1])]).sum() / 3
    assert torch.allclose(out, expected)
    assert torch.isfinite(a_req.grad).all() and a_req.grad[0, 2].abs().sum() == 0
    assert token_kd_loss(a, ids, lps, mask=torch.zeros(2, 3)).item() == 0.0


def test_token_padded_topk_slot_with_minus_inf_is_ignored():
    a = _logits(1, 1, 4, seed=21)
    ids3, lps3 = torch.tensor([[[0, 1, 2]]]), torch.log(torch.tensor([[[0.5, 0.3, 0.2]]], dtype=a.dtype))
    ids4 = torch.tensor([[[0, 1, 2, 3]]])
    lps4 = torch.cat([lps3, torch.full((1, 1, 1), -float("inf"), dtype=a.dtype)], -1)
    for mode in ("forward", "jsd"):
        out = token_kd_loss(a, ids4, lps4, mode=mode)
        assert torch.isfinite(out)
    # forward KL only reads the teacher's support; the student's renormalisation still spans id 3
    assert token_kd_loss(a, ids4, lps4).item() > 0


def test_token_residual_kd_sees_mass_outside_the_topk_and_merges_repeats():
    """The renormalised top-k KD cannot tell a student that matches the teacher from one that puts more mass
    outside the teacher's top-k; the residual slot can. Repeated ids are one slot holding their summed mass."""
    a = _logits(2, 3, 12, seed=31)
    top = torch.log_softmax(a, -1).topk(4, -1)
    ids, lps = top.indices, top.values  # the teacher: exactly ``a`` (partial top-k)
    for mode in ("forward", "reverse", "jsd"):
        assert token_kd_loss(a, ids, lps, mode=mode, residual=True).item() == pytest.approx(0.0, abs=1e-6)
    outside = a.clone()
    hit = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, ids, True)
    outside[~hit] += 2.0  # same shape inside the top-4, more mass outside it
    assert token_kd_loss(outside, ids, lps).item() == pytest.approx(0.0, abs=1e-6)
    assert token_kd_loss(outside, ids, lps, residual=True).item() > 0.1
    # two teacher slots naming one student id (dropped ids mapped to <other>) act as one slot with both masses
    p = torch.tensor([0.4, 0.2, 0.1, 0.1])
    ids_rep, lps_rep = torch.tensor([[[0, 1, 1, 2]]]), p.log().view(1, 1, 4)
    ids_one, lps_one = torch.tensor([[[0, 1, 2]]]), torch.tensor([0.4, 0.3, 0.1]).log().view(1, 1, 3)
    s = _logits(1, 1, 5, seed=32).requires_grad_()
    rep = token_kd_loss(s, ids_rep, lps_rep, residual=True)
    rep.backward()
    assert torch.isfinite(s.grad).all()
    one = token_kd_loss(s.detach(), ids_one, lps_one, residual=True)
    assert rep.item() == pytest.approx(one.item(), abs=1e-4) and rep.item() > 0
    # masked positions with garbage stay out of the value and the gradient
    g = lps.clone()
    g[0, 2] = float("nan")
    x = a.clone().requires_grad_()
    out = token_kd_loss(x, ids, g, mask=torch.tensor([[1, 1, 0], [1, 1, 1]]), residual=True)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all() and x.grad[0, 2].abs().sum() == 0


@pytest.mark.parametrize("kwargs", [dict(mode="kl"), dict(beta=1.5), dict(temperature=-1.0)])
def test_token_rejects_bad_arguments(kwargs):
    a = _logits(1, 2, 4)
    ids, lps = _full_topk(a)
    with pytest.raises(ValueError):
        token_kd_loss(a, ids, lps, **kwargs)
