"""Distillation losses, tested by their properties and by golden values.

Golden values live in ``tests/fixtures/losses/precomputed.json`` (inputs and expected value per case) and
are computed by ``regenerate_golden`` below: seeded numpy inputs and a deliberately naive pure-Python
reference (explicit loops and ``math``), never the functions under test. Rerun it with

    .venv/bin/python tests/test_losses.py --regen

only when a loss's definition changes on purpose, and say so in the commit.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdops.losses import (
    FeatureProjector,
    attention_transfer_loss,
    feature_kd_loss,
    lm_ce_loss,
    relation_kd_loss,
    response_kd_loss,
    sequence_kd_loss,
    token_kd_loss,
)

GOLDEN = Path(__file__).parent / "fixtures" / "losses" / "precomputed.json"
EPS = 1e-12  # the student-probability floor of attention_transfer_loss


# --------------------------------------------------------------------------------------------------
# Naive reference implementations (pure Python) and the golden-value generator.
# --------------------------------------------------------------------------------------------------


def _ref_log_softmax(row, temperature=1.0):
    z = [x / temperature for x in row]
    finite = [x for x in z if x != -math.inf]
    m = max(finite)
    log_norm = m + math.log(sum(math.exp(x - m) for x in finite))
    return [x - log_norm if x != -math.inf else -math.inf for x in z]


def _ref_kl(log_p, log_q):
    return sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q) if lp != -math.inf)


def _ref_response(student, teacher, labels, temperature, alpha, weights):
    n = len(student)
    w = weights if weights is not None else [1.0] * n
    kls = [_ref_kl(_ref_log_softmax(teacher[i], temperature), _ref_log_softmax(student[i], temperature))
           for i in range(n)]
    kd = sum(w[i] * kls[i] for i in range(n)) / sum(w) * temperature**2
    rows = [i for i in range(n) if labels is not None and labels[i] != -100]
    if not rows:
        return kd
    ce = sum(-w[i] * _ref_log_softmax(student[i])[labels[i]] for i in rows) / sum(w[i] for i in rows)
    return alpha * ce + (1 - alpha) * kd


def _ref_feature(student_hidden, teacher_hidden, layer_map, proj, mask):
    per_pair = []
    for k, (s, t) in enumerate(layer_map):
        total, count = 0.0, 0
        for b, seq in enumerate(student_hidden[s]):
            for pos, h in enumerate(seq):
                if mask is not None and not mask[b][pos]:
                    continue
                if proj is not None:  # y = W h, W (Dt, Ds)
                    h = [sum(wr[j] * h[j] for j in range(len(h))) for wr in proj[k]]
                target = teacher_hidden[t][b][pos]
                total += sum((a - c) ** 2 for a, c in zip(h, target)) / len(target)
                count += 1
        per_pair.append(total / count)
    return sum(per_pair) / len(per_pair)


def _ref_attention(student_attn, teacher_attn, layer_map, mask):
    def head_mean(a):
        heads = len(a)
        return [[[sum(a[h][q][k] for h in range(heads)) / heads for k in range(len(a[0][q]))]
                 for q in range(len(a[0]))]]

    per_pair = []
    for s, t in layer_map:
        total, count = 0.0, 0
        for b in range(len(student_attn[s])):
            a_s, a_t = student_attn[s][b], teacher_attn[t][b]
            if len(a_s) != len(a_t):
                a_s, a_t = head_mean(a_s), head_mean(a_t)
            for h in range(len(a_s)):
                for q in range(len(a_s[h])):
                    if mask is not None and not mask[b][q]:
                        continue
                    kl = 0.0
                    for k in range(len(a_s[h][q])):
                        pt, ps = a_t[h][q][k], a_s[h][q][k]
                        if (mask is None or mask[b][k]) and pt > 0:
                            kl += pt * (math.log(max(pt, EPS)) - math.log(max(ps, EPS)))
                    total += kl
                    count += 1
        per_pair.append(total / count)
    return sum(per_pair) / len(per_pair)


def _ref_relation(student_emb, teacher_emb):
    def cos_matrix(e):
        norms = [math.sqrt(sum(x * x for x in v)) for v in e]
        return [[sum(a * b for a, b in zip(u, v)) / (nu * nv) for v, nv in zip(e, norms)]
                for u, nu in zip(e, norms)]

    gs, gt = cos_matrix(student_emb), cos_matrix(teacher_emb)
    n = len(gs)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2


def _ref_token(logits, ids, logprobs, mode, beta, temperature, mask):
    total, count = 0.0, 0
    for b in range(len(logits)):
        for pos in range(len(logits[b])):
            if mask is not None and not mask[b][pos]:
                continue
            ls = _ref_log_softmax([logits[b][pos][i] for i in ids[b][pos]], temperature)
            lt = _ref_log_softmax(logprobs[b][pos], temperature)
            if mode == "forward":
                v = _ref_kl(lt, ls)
            elif mode == "reverse":
                v = _ref_kl(ls, lt)
            else:
                pm = [beta * math.exp(a) + (1 - beta) * math.exp(c) for a, c in zip(lt, ls)]
                lm = [math.log(x) for x in pm]
                v = beta * _ref_kl(lt, lm) + (1 - beta) * _ref_kl(ls, lm)
            total += v
            count += 1
    return temperature**2 * total / count


def _ref_sequence(logits, targets, mask):
    total, count = 0.0, 0
    for b in range(len(logits)):
        for pos in range(len(logits[b])):
            if targets[b][pos] == -100 or (mask is not None and not mask[b][pos]):
                continue
            total -= _ref_log_softmax(logits[b][pos])[targets[b][pos]]
            count += 1
    return total / count


def _attention_probs(rng, batch, heads, tokens, mask):
    scores = rng.normal(size=(batch, heads, tokens, tokens))
    scores = np.where(np.asarray(mask, bool)[:, None, None, :], scores, -np.inf)  # padded keys get 0 mass
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return (probs / probs.sum(-1, keepdims=True)).tolist()


def golden_cases() -> list[dict]:
    """Seeded inputs and their expected values from the naive references above."""
    rng = np.random.default_rng(20240601)
    r = lambda *shape, scale=1.0: np.round(rng.normal(scale=scale, size=shape), 4).tolist()  # noqa: E731
    cases = []

    s, t = r(4, 3, scale=2.0), r(4, 3, scale=2.0)
    labels, weights = [0, 2, -100, 1], [1.0, 0.5, 2.0, 1.5]
    for name, kw in [
        ("response_T2_a05", dict(labels=labels, temperature=2.0, alpha=0.5, weights=None)),
        ("response_T4_a03_weighted", dict(labels=labels, temperature=4.0, alpha=0.3, weights=weights)),
        ("response_T1_no_labels", dict(labels=None, temperature=1.0, alpha=0.5, weights=None)),
        ("response_alpha1_ce", dict(labels=labels, temperature=2.0, alpha=1.0, weights=None)),
    ]:
        expected = _ref_response(s, t, kw["labels"], kw["temperature"], kw["alpha"], kw["weights"])
        cases.append(dict(name=name, fn="response_kd_loss", inputs=dict(student_logits=s, teacher_logits=t),
                          kwargs=kw, expected=expected))

    mask = [[1, 1, 1, 0], [1, 1, 0, 0]]
    sh, th = [r(2, 4, 3) for _ in range(3)], [r(2, 4, 3) for _ in range(4)]
    layer_map = [[1, 1], [2, 3]]
    cases.append(dict(name="feature_same_width_masked", fn="feature_kd_loss",
                      inputs=dict(student_hidden=sh, teacher_hidden=th),
                      kwargs=dict(layer_map=layer_map, attention_mask=mask),
                      expected=_ref_feature(sh, th, layer_map, None, mask)))
    th5 = [r(2, 4, 5) for _ in range(4)]
    proj = [r(5, 3, scale=0.5) for _ in layer_map]
    cases.append(dict(name="feature_projected_masked", fn="feature_kd_loss",
                      inputs=dict(student_hidden=sh, teacher_hidden=th5, projector_weights=proj),
                      kwargs=dict(layer_map=layer_map, attention_mask=mask),
                      expected=_ref_feature(sh, th5, layer_map, proj, mask)))

    sa = [_attention_probs(rng, 2, 2, 4, mask) for _ in range(2)]
    ta_same = [_attention_probs(rng, 2, 2, 4, mask) for _ in range(2)]
    ta_more = [_attention_probs(rng, 2, 3, 4, mask) for _ in range(2)]
    cases.append(dict(name="attention_same_heads_masked", fn="attention_transfer_loss",
                      inputs=dict(student_attn=sa, teacher_attn=ta_same),
                      kwargs=dict(layer_map=[[0, 0], [1, 1]], attention_mask=mask),
                      expected=_ref_attention(sa, ta_same, [[0, 0], [1, 1]], mask)))
    cases.append(dict(name="attention_head_mismatch_masked", fn="attention_transfer_loss",
                      inputs=dict(student_attn=sa, teacher_attn=ta_more),
                      kwargs=dict(layer_map=[[1, 0]], attention_mask=mask),
                      expected=_ref_attention(sa, ta_more, [[1, 0]], mask)))

    se, te = r(4, 3), r(4, 6)
    cases.append(dict(name="relation_widths_differ", fn="relation_kd_loss",
                      inputs=dict(student_emb=se, teacher_emb=te), kwargs={}, expected=_ref_relation(se, te)))

    logits = r(2, 3, 6, scale=2.0)
    ids = [[rng.choice(6, size=3, replace=False).astype(int).tolist() for _ in range(3)] for _ in range(2)]
    lps = [[sorted(np.round(np.log(rng.dirichlet(np.ones(6))[:3]), 4).tolist(), reverse=True)
            for _ in range(3)] for _ in range(2)]
    tmask = [[1, 1, 0], [1, 1, 1]]
    token_settings = [("forward", 0.5, 1.0), ("reverse", 0.5, 2.0), ("jsd", 0.5, 1.0), ("jsd", 0.1, 2.0)]
    for mode, beta, temperature in token_settings:
        cases.append(dict(name=f"token_{mode}_b{beta}_T{temperature}", fn="token_kd_loss",
                          inputs=dict(student_logits=logits, topk_ids=ids, topk_logprobs=lps),
                          kwargs=dict(mode=mode, beta=beta, temperature=temperature, mask=tmask),
                          expected=_ref_token(logits, ids, lps, mode, beta, temperature, tmask)))

    targets = rng.integers(0, 6, size=(2, 3)).tolist()
    targets[1][0] = -100
    smask = [[0, 1, 1], [1, 1, 1]]
    cases.append(dict(name="sequence_masked", fn="sequence_kd_loss",
                      inputs=dict(student_logits=logits, target_ids=targets), kwargs=dict(mask=smask),
                      expected=_ref_sequence(logits, targets, smask)))
    return cases


def regenerate_golden(path: Path = GOLDEN) -> None:
    """Rewrite the golden fixture from ``golden_cases()``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"generator": "tests/test_losses.py --regen", "rel_tol": 1e-5,
                                "cases": golden_cases()}, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------
# Golden values.
# --------------------------------------------------------------------------------------------------


def _t(x, dtype=torch.float64):
    return None if x is None else torch.tensor(x, dtype=dtype)


def _run_case(case: dict) -> float:
    i, kw = case["inputs"], dict(case["kwargs"])
    long = lambda x: None if x is None else torch.tensor(x, dtype=torch.long)  # noqa: E731
    fn = case["fn"]
    if fn == "response_kd_loss":
        out = response_kd_loss(_t(i["student_logits"]), _t(i["teacher_logits"]),
                               labels=long(kw.pop("labels")), weights=_t(kw.pop("weights")), **kw)
    elif fn == "feature_kd_loss":
        projector = None
        if "projector_weights" in i:
            w = i["projector_weights"]
            projector = FeatureProjector(len(w[0][0]), len(w[0]), len(w)).double()
            with torch.no_grad():
                for k, wk in enumerate(w):
                    projector.maps[k].weight.copy_(_t(wk))
        out = feature_kd_loss([_t(h) for h in i["student_hidden"]], [_t(h) for h in i["teacher_hidden"]],
                              [tuple(p) for p in kw["layer_map"]], projector, long(kw["attention_mask"]))
    elif fn == "attention_transfer_loss":
        out = attention_transfer_loss([_t(a) for a in i["student_attn"]], [_t(a) for a in i["teacher_attn"]],
                                      [tuple(p) for p in kw["layer_map"]], long(kw["attention_mask"]))
    elif fn == "relation_kd_loss":
        out = relation_kd_loss(_t(i["student_emb"]), _t(i["teacher_emb"]))
    elif fn == "token_kd_loss":
        out = token_kd_loss(_t(i["student_logits"]), long(i["topk_ids"]), _t(i["topk_logprobs"]),
                            mode=kw["mode"], beta=kw["beta"], temperature=kw["temperature"],
                            mask=long(kw["mask"]))
    elif fn == "sequence_kd_loss":
        out = sequence_kd_loss(_t(i["student_logits"]), long(i["target_ids"]), long(kw["mask"]))
    else:
        raise KeyError(fn)
    assert out.dim() == 0
    return out.item()


_GOLDEN_CASES = json.loads(GOLDEN.read_text())["cases"] if GOLDEN.exists() else []


def test_golden_fixture_covers_every_loss():
    assert {c["fn"] for c in _GOLDEN_CASES} == {
        "response_kd_loss", "feature_kd_loss", "attention_transfer_loss", "relation_kd_loss", "token_kd_loss",
        "sequence_kd_loss",
    }


@pytest.mark.parametrize("case", _GOLDEN_CASES, ids=[c["name"] for c in _GOLDEN_CASES])
def test_golden_values(case):
    assert math.isclose(_run_case(case), case["expected"], rel_tol=1e-5)


def test_golden_in_float32_is_close_too():
    case = next(c for c in _GOLDEN_CASES if c["name"] == "response_T2_a05")
    i = case["inputs"]
    out = response_kd_loss(_t(i["student_logits"], torch.float32), _t(i["teacher_logits"], torch.float32),
                           torch.tensor(case["kwargs"]["labels"]), temperature=2.0, alpha=0.5)
    assert out.dtype == torch.float32 and math.isclose(out.item(), case["expected"], rel_tol=1e-5)


# --------------------------------------------------------------------------------------------------
# response_kd_loss properties.
# --------------------------------------------------------------------------------------------------


def _logits(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def test_response_zero_for_identical_logits():
    z = _logits(4, 5)
    assert response_kd_loss(z, z.clone(), temperature=3.0).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_response_kd_term_is_t2_kl(temperature):
    s, t = _logits(4, 5, seed=1), _logits(4, 5, seed=2)
    labels = torch.tensor([0, 1, 2, 3])
    log_s, log_t = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    expected = temperature**2 * F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)
    assert torch.allclose(response_kd_loss(s, t, labels, temperature=temperature, alpha=0.0), expected)
    assert torch.allclose(response_kd_loss(s, t, None, temperature=temperature, alpha=0.7), expected)


def test_response_alpha_one_is_cross_entropy_over_labelled_rows():
    s, t = _logits(5, 4, seed=3), _logits(5, 4, seed=4)
    labels = torch.tensor([1, -100, 3, 0, -100])
    expected = F.cross_entropy(s, labels, ignore_index=-100)
    assert torch.allclose(response_kd_loss(s, t, labels, alpha=1.0), expected)


def test_response_unlabelled_rows_do_not_enter_ce():
    s, t = _logits(4, 3, seed=5), _logits(4, 3, seed=6)
    labels = torch.tensor([0, -100, 2, -100])
    s2 = s.clone()
    s2[1] += 10.0 * torch.tensor([1.0, -1.0, 0.5], dtype=s.dtype)
    before, after = response_kd_loss(s, t, labels, alpha=1.0), response_kd_loss(s2, t, labels, alpha=1.0)
    assert torch.allclose(before, after)


def test_response_all_unlabelled_is_full_weight_kd():
    s, t = _logits(3, 4, seed=7), _logits(3, 4, seed=8)
    none = response_kd_loss(s, t, None, alpha=0.5)
    unlabelled = response_kd_loss(s, t, torch.full((3,), -100), alpha=0.5)
    assert torch.allclose(none, unlabelled)
    assert torch.allclose(none, response_kd_loss(s, t, torch.tensor([0, 1, 2]), alpha=0.0))


def test_response_weights_normalised_and_zero_weight_drops_row():
    s, t = _logits(4, 3, seed=9), _logits(4, 3, seed=10)
    labels = torch.tensor([0, 1, 2, 0])
    base = response_kd_loss(s, t, labels)
    assert torch.allclose(response_kd_loss(s, t, labels, weights=torch.full((4,), 3.0, dtype=s.dtype)), base)
    w = torch.tensor([1.0, 2.0, 0.5, 0.0], dtype=s.dtype)
    a = response_kd_loss(s, t, labels, weights=w)
    s2 = s.clone()
    s2[3] = torch.tensor([5.0, -5.0, 0.0])
    assert torch.allclose(a, response_kd_loss(s2, t, labels, weights=w))
    assert torch.allclose(a, response_kd_loss(s[:3], t[:3], labels[:3], weights=w[:3]))


def test_response_gradient_scale_stable_across_temperatures():
    # For small logits the T² factor cancels the 1/T² of the soft-target gradient (Hinton et al. §2.1).
    t = _logits(4, 6, seed=11, scale=0.1)
    norms = {}
    for temperature in (1.0, 4.0):
        s = _logits(4, 6, seed=12, scale=0.1).requires_grad_()
        response_kd_loss(s, t, None, temperature=temperature).backward()
        norms[temperature] = s.grad.norm().item()
    assert 0.5 < norms[4.0] / norms[1.0] < 2.0


def test_response_teacher_gets_no_gradient():
    s, t = _logits(2, 3).requires_grad_(), _logits(2, 3, seed=1).requires_grad_()
    response_kd_loss(s, t).backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("kwargs", [dict(alpha=1.5), dict(temperature=0.0), dict(weights=torch.ones(3))])
def test_response_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        response_kd_loss(_logits(2, 3), _logits(2, 3), **kwargs)


# --------------------------------------------------------------------------------------------------
# Feature, attention, relation and sequence losses.
# --------------------------------------------------------------------------------------------------


def test_feature_zero_for_identical_and_padding_ignored():
    h = [_logits(2, 4, 3, seed=k) for k in range(3)]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert feature_kd_loss(h, [x.clone() for x in h], [(0, 0), (2, 2)], attention_mask=mask).item() == 0.0
    noisy = [x.clone() for x in h]
    for x in noisy:
        x[0, 3] += 100.0
        x[1, 2:] = float("nan")
    assert feature_kd_loss(h, noisy, [(0, 0), (2, 2)], attention_mask=mask).item() == 0.0


def test_feature_projector_shapes_identity_and_gradient():
    assert all(isinstance(m, torch.nn.Identity) for m in FeatureProjector(8, 8, 2).maps)
    assert sum(p.numel() for p in FeatureProjector(8, 8, 2, identity_if_equal=False).parameters()) == 2 * 64
    proj = FeatureProjector(3, 5, 2).double()
    assert proj(1, _logits(2, 4, 3)).shape == (2, 4, 5)
    with pytest.raises(IndexError):
        proj(2, _logits(2, 4, 3))
    hs, ht = [_logits(2, 4, 3, seed=1)], [_logits(2, 4, 5, seed=2)]
    with pytest.raises(ValueError, match="FeatureProjector"):
        feature_kd_loss(hs, ht, [(0, 0)])
    feature_kd_loss(hs, ht, [(0, 0)], proj).backward()
    assert proj.maps[0].weight.grad is not None and proj.maps[1].weight.grad is None


def _attn(*shape, seed=0):
    return torch.softmax(_logits(*shape, seed=seed), -1)


def test_attention_zero_for_identical_positive_otherwise():
    a, b = _attn(2, 2, 4, 4, seed=1), _attn(2, 2, 4, 4, seed=2)
    assert attention_transfer_loss([a], [a.clone()], [(0, 0)]).item() == pytest.approx(0.0, abs=1e-12)
    assert attention_transfer_loss([a], [b], [(0, 0)]).item() > 0


def test_attention_head_mismatch_averages_heads():
    teacher = _attn(2, 4, 3, 3, seed=3)
    student = teacher.mean(1, keepdim=True)  # one head equal to the teacher's head average
    assert attention_transfer_loss([student], [teacher], [(0, 0)]).item() == pytest.approx(0.0, abs=1e-12)


def test_attention_padded_queries_and_keys_ignored():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    scores_s, scores_t = _logits(2, 2, 3, 3, seed=4), _logits(2, 2, 3, 3, seed=5)
    key_pad = ~mask.bool()[:, None, None, :]
    a_s = torch.softmax(scores_s.masked_fill(key_pad, -1e9), -1)
    a_t = torch.softmax(scores_t.masked_fill(key_pad, -1e9), -1)
    base = attention_transfer_loss([a_s], [a_t], [(0, 0)], mask)
    a_t2 = a_t.clone()
    a_t2[0, :, 2, :] = torch.tensor([0.9, 0.05, 0.05], dtype=a_t.dtype)  # padded query row changes
    assert torch.allclose(base, attention_transfer_loss([a_s], [a_t2], [(0, 0)], mask))


def test_relation_properties():
    e = _logits(5, 4, seed=6)
    scale = torch.tensor([1.0, 2.0, 0.5, 3.0, 10.0], dtype=e.dtype)[:, None]
    assert relation_kd_loss(e, e * scale).item() == pytest.approx(0.0, abs=1e-12)
    other = _logits(5, 9, seed=7)
    value = relation_kd_loss(e, other).item()
    assert 0.0 < value <= 4.0


def test_sequence_kd_matches_cross_entropy_and_mask():
    logits = _logits(2, 4, 7, seed=8)
    targets = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 1]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]])
    masked_targets = targets.masked_fill(mask == 0, -100).flatten()
    ref = F.cross_entropy(logits.flatten(0, 1), masked_targets, ignore_index=-100)
    assert torch.allclose(sequence_kd_loss(logits, targets, mask), ref)
    unmasked = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert torch.allclose(sequence_kd_loss(logits, targets), unmasked)


def test_lm_ce_loss_shifts():
    logits = _logits(1, 4, 7, seed=9)
    ids = torch.tensor([[3, 1, 4, 1]])
    ref = F.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert torch.allclose(lm_ce_loss(logits, ids), ref)


if __name__ == "__main__":
    if "--regen" in sys.argv:
        regenerate_golden()
        print(f"wrote {GOLDEN}")
    else:
        print(__doc__)
