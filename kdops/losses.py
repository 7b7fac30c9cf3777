"""Distillation losses: pure tensor functions, each runnable without a trainer.

Every loss returns a scalar tensor and treats the teacher side as a constant target (it is detached),
since the service never trains the teacher through the student's loss. Shapes: B batch, C classes,
T tokens, V vocabulary, K cached top-k entries, H heads, D hidden width.

- ``response_kd_loss``: soft-label KD on classifier logits (Hinton et al. 2015).
- ``feature_kd_loss`` + ``FeatureProjector``: hidden-state matching (FitNets, Romero et al. 2015; TinyBERT).
- ``attention_transfer_loss``: attention-distribution matching (MiniLM, Wang et al. 2020).
- ``relation_kd_loss``: similarity-preserving KD (Tung & Mori 2019).
- ``token_kd_loss``: token-level KD against a teacher's cached top-k log-probs (forward / reverse KL,
  generalised JSD as in TRL's ``generalized_jsd_loss`` / GKD, Agarwal et al. 2024).
- ``sequence_kd_loss``: CE on teacher generations (sequence-level KD, Kim & Rush 2016).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100

# Floor for student probabilities inside a log, so that a student that puts exactly 0 where the teacher
# does not (a fully masked attention key, an underflowed softmax) gives a large finite loss, not inf.
_PROB_EPS = 1e-12


def _kl_from_log(log_p: Tensor, log_q: Tensor, dim: int = -1) -> Tensor:
    """KL(p ‖ q) = Σ p·(log p − log q) over ``dim``, from log-probabilities; terms with p = 0 count 0.

    Written out rather than ``F.kl_div`` so that ``-inf`` entries of ``log_p`` (a padded top-k slot)
    give 0 instead of NaN, in the value and in the gradient.
    """
    p = log_p.exp()
    keep = p > 0  # false for p = 0 and for NaN
    p = torch.where(keep, p, torch.zeros_like(p))  # a zeroed p also zeroes the gradient into log_q
    safe_log_p = torch.where(keep, log_p, torch.zeros_like(log_p))
    return (p * (safe_log_p - log_q)).sum(dim)


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is true (all positions when it is None).

    Uses ``where`` rather than a product so that NaN/inf in masked-out positions (garbage padding)
    cannot leak into the result. An all-false mask gives 0 (still attached to the graph).
    """
    if mask is None:
        return values.mean()
    mask = mask.to(torch.bool).expand_as(values)
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")


def response_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    weights: Tensor | None = None,
) -> Tensor:
    """Hinton et al. 2015 (torchdistill's ``KDLoss``): ``L = α·CE(s, y) + (1−α)·T²·KL(p_t^T ‖ p_s^T)``.

    ``p^T = softmax(logits / T)``. The T² keeps the gradient w.r.t. the student logits at the same scale
    whatever T (the soft-target gradient is ∝ 1/T², Hinton et al. §2.1).

    Shapes: ``student_logits``, ``teacher_logits`` (B, C); ``labels`` (B,) long, ``-100`` = unlabelled;
    ``weights`` (B,) optional non-negative per-example weights (hard-example re-weighting).

    - KD term: Σ_i w_i·KL_i / Σ_i w_i over all rows (plain mean when ``weights`` is None).
    - CE term: Σ_i w_i·CE_i / Σ_i w_i over labelled rows only; unweighted it equals
      ``F.cross_entropy(s, y, ignore_index=-100)``.
    - No labelled row (``labels`` None or all -100): the loss is the KD term with weight 1, not (1−α)·KD,
      so an unlabelled batch is not silently down-weighted.

    Returns a scalar.
    """
    _check_temperature(temperature)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must both be (B, C); got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}."
        )
    batch = student_logits.shape[0]
    if weights is None:
        weights = torch.ones(batch, dtype=student_logits.dtype, device=student_logits.device)
    else:
        if weights.shape != (batch,):
            raise ValueError(f"weights must be (B,) = ({batch},), got {tuple(weights.shape)}.")
        weights = weights.detach().to(student_logits.dtype)

    teacher_logits = teacher_logits.detach()
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = _kl_from_log(log_p_t, log_p_s)  # (B,)
    kd = temperature**2 * (weights * kl).sum() / weights.sum()

    if labels is None:
        return kd
    if labels.shape != (batch,):
        raise ValueError(f"labels must be (B,) = ({batch},), got {tuple(labels.shape)}.")
    labelled = labels != IGNORE_INDEX
    if not bool(labelled.any()):
        return kd
    ce_rows = F.cross_entropy(student_logits, labels, ignore_index=IGNORE_INDEX, reduction="none")  # (B,)
    w_lab = torch.where(labelled, weights, torch.zeros_like(weights))
    ce = (w_lab * ce_rows).sum() / w_lab.sum()
    return alpha * ce + (1.0 - alpha) * kd


class FeatureProjector(nn.Module):
    """One bias-free linear map per distilled layer pair, student width → teacher width (TinyBERT's W_h).

    When ``student_dim == teacher_dim`` the maps are parameter-free identities (``identity_if_equal``):
    a student carved from its teacher (``kdops.student.from_teacher``) already lives in the teacher's
    hidden space, and a learned map there would only let the loss be met by the projector instead of
    the student. Pass ``identity_if_equal=False`` to learn maps anyway.
    """

    def __init__(self, student_dim: int, teacher_dim: int, num_pairs: int, *, identity_if_equal: bool = True):
        super().__init__()
        if student_dim <= 0 or teacher_dim <= 0 or num_pairs <= 0:
            raise ValueError(
                "student_dim, teacher_dim and num_pairs must be positive; "
                f"got {student_dim}, {teacher_dim}, {num_pairs}."
            )
        self.student_dim, self.teacher_dim, self.num_pairs = student_dim, teacher_dim, num_pairs
        if student_dim == teacher_dim and identity_if_equal:
            self.maps = nn.ModuleList(nn.Identity() for _ in range(num_pairs))
        else:
            self.maps = nn.ModuleList(
                nn.Linear(student_dim, teacher_dim, bias=False) for _ in range(num_pairs)
            )

    def forward(self, i: int, h: Tensor) -> Tensor:
        """Project the student hidden state of pair ``i``: (..., student_dim) → (..., teacher_dim)."""
        if not 0 <= i < self.num_pairs:
            raise IndexError(f"pair index {i} out of range for {self.num_pairs} pairs.")
        return self.maps[i](h)


def feature_kd_loss(
    student_hidden: list[Tensor],
    teacher_hidden: list[Tensor],
    layer_map: list[tuple[int, int]],
    projector: FeatureProjector | None = None,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """FitNets (Romero et al. 2015) / TinyBERT hidden-state loss: ``mean_pairs MSE(W_k·h^S_s, h^T_t)``.

    ``layer_map[k] = (s, t)`` pairs ``student_hidden[s]`` (B, T, Ds) with ``teacher_hidden[t]`` (B, T, Dt),
    using ``projector(k, ·)`` (required when Ds ≠ Dt). Indices are into the lists as given (with HF
    ``output_hidden_states`` index 0 is the embeddings). The squared error is averaged over real tokens
    (``attention_mask`` (B, T), 1 = real) and over the D features, then over pairs. Returns a scalar.
    """
    if not layer_map:
        raise ValueError("layer_map is empty: nothing to distil.")
    losses = []
    for k, (s, t) in enumerate(layer_map):
        h_s, h_t = student_hidden[s], teacher_hidden[t].detach()
        if attention_mask is not None:  # padded teacher states may be garbage; keep NaN out of the gradient
            h_t = torch.where(attention_mask.to(torch.bool)[..., None], h_t, torch.zeros_like(h_t))
        if projector is not None:
            h_s = projector(k, h_s)
        if h_s.shape != h_t.shape:
            raise ValueError(
                f"pair {k} ({s}->{t}): student {tuple(h_s.shape)} vs teacher {tuple(h_t.shape)}; "
                "pass a FeatureProjector when widths differ."
            )
        sq = (h_s - h_t).pow(2).mean(-1)  # (B, T)
        losses.append(_masked_mean(sq, attention_mask))
    return torch.stack(losses).mean()


def attention_transfer_loss(
    student_attn: list[Tensor],
    teacher_attn: list[Tensor],
    layer_map: list[tuple[int, int]],
    attention_mask: Tensor | None = None,
) -> Tensor:
    """MiniLM (Wang et al. 2020) attention transfer: ``KL(A^T_q ‖ A^S_q)`` over the key axis.

    ``student_attn[s]``, ``teacher_attn[t]``: attention probabilities (B, H, T, T), rows = queries summing
    to 1 over keys. For each pair ``(s, t)`` in ``layer_map`` the loss is the KL divergence from the
    teacher's to the student's key distribution, averaged over heads and over real query tokens
    (``attention_mask`` (B, T), 1 = real), then over pairs. Keys that are padding contribute nothing (both
    models give them ~0 mass under HF masking; their terms are dropped). When the head counts differ, each
    model's maps are first averaged over heads (a mean of distributions is a distribution), since there is
    no head-to-head correspondence; MiniLM itself assumes equal heads. Student probabilities are floored at
    1e-12 inside the log. Returns a scalar.
    """
    if not layer_map:
        raise ValueError("layer_map is empty: nothing to distil.")
    losses = []
    for s, t in layer_map:
        a_s, a_t = student_attn[s], teacher_attn[t].detach()
        if a_s.dim() != 4 or a_t.dim() != 4:
            raise ValueError(
                f"attention maps must be (B, H, T, T); got {tuple(a_s.shape)} and {tuple(a_t.shape)}."
            )
        if a_s.shape[1] != a_t.shape[1]:
            a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)  # (B, 1, T, T)
        if a_s.shape != a_t.shape:
            raise ValueError(f"pair ({s}, {t}): student {tuple(a_s.shape)} vs teacher {tuple(a_t.shape)}.")
        terms = torch.where(
            a_t > 0, a_t * (torch.log(a_t.clamp(min=_PROB_EPS)) - torch.log(a_s.clamp(min=_PROB_EPS))),
            torch.zeros_like(a_t),
        )
        if attention_mask is not None:
            key_real = attention_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, T)
            terms = torch.where(key_real, terms, torch.zeros_like(terms))
        kl = terms.sum(-1)  # (B, H, T) per query
        query_mask = None if attention_mask is None else attention_mask.to(torch.bool)[:, None, :]
        losses.append(_masked_mean(kl, query_mask))
    return torch.stack(losses).mean()


def relation_kd_loss(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """Similarity-preserving KD (Tung & Mori 2019): ``mean((Ĝ_S − Ĝ_T)²)``, Ĝ = cosine-similarity matrix.

    ``student_emb`` (B, Ds), ``teacher_emb`` (B, Dt): widths may differ, only the (B, B) batch-similarity
    matrices are compared (Ĝ_ij = cos(e_i, e_j)). Tung & Mori L2-normalise the rows of A·Aᵀ instead of the
    embeddings and divide ‖·‖²_F by B²; cosine similarity keeps every entry in [−1, 1] and the loss in
    [0, 4]. Extra trailing dims are flattened. Returns a scalar.
    """
    if student_emb.shape[0] != teacher_emb.shape[0]:
        raise ValueError(f"batch sizes differ: {student_emb.shape[0]} vs {teacher_emb.shape[0]}.")
    s = F.normalize(student_emb.flatten(1), dim=-1)
    t = F.normalize(teacher_emb.detach().flatten(1), dim=-1)
    return F.mse_loss(s @ s.T, t @ t.T)


def token_kd_loss(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    mode: str = "forward",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    residual: bool = False,
) -> Tensor:
    """Token-level KD against a teacher's cached top-k, scaled by T² and averaged over valid tokens.

    Shapes: ``student_logits`` (B, T, V); ``topk_ids`` (B, T, K) long; ``topk_logprobs`` (B, T, K) the
    teacher's log-probabilities at those ids (``-inf`` allowed for padded slots); ``mask`` (B, T), 1 = valid.

    Both distributions live on the K cached ids only:
    - teacher ``p_t = softmax(topk_logprobs / T)`` over K: the top-k renormalised to sum 1 (dividing
      log-probs by T equals dividing the teacher's logits by T, up to a constant that renormalising drops);
    - student ``p_s = softmax(gather(logits, ids) / T)`` over K, which equals
      ``log_softmax(logits / T)`` gathered at the ids and renormalised over them.

    ``mode``: ``"forward"`` KL(p_t ‖ p_s) (mean-seeking, Hinton); ``"reverse"`` KL(p_s ‖ p_t) (mode-seeking,
    MiniLLM); ``"jsd"`` the generalised JSD of TRL's ``generalized_jsd_loss`` (GKD, Agarwal et al. 2024):
    ``β·KL(p_t ‖ m) + (1−β)·KL(p_s ‖ m)``, ``m = β·p_t + (1−β)·p_s``. As in TRL, ``β = 0`` is defined as
    forward KL and ``β = 1`` as reverse KL: the JSD itself vanishes at the ends, but JSD_β/β → forward KL
    as β → 0 and JSD_β/(1−β) → reverse KL as β → 1. At β = 0.5 it is the symmetric JSD, bounded by log 2.

    ``residual=True`` compares K + 1 slots instead: each distinct cached id and the rest of the vocabulary,
    ``1 − Σ p`` (both models' full-softmax probabilities; the temperature then softens these K + 1). The
    renormalised top-k above says nothing about how much mass the student puts outside the teacher's top-k
    (on SmolLM2-135M the top-32 held 74 % of it on average); the rest slot does. Repeated ids (a trimmed
    student maps every dropped id to one ``<other>``) are merged into one slot, their teacher mass summed.
    Returns a scalar.
    """
    _check_temperature(temperature)
    if mode not in ("forward", "reverse", "jsd"):
        raise ValueError(f"mode must be 'forward', 'reverse' or 'jsd', got {mode!r}.")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}.")
    if (
        student_logits.dim() != 3
        or topk_ids.shape != topk_logprobs.shape
        or topk_ids.shape[:2] != student_logits.shape[:2]
    ):
        raise ValueError(
            f"expected student_logits (B, T, V) and topk_ids/topk_logprobs (B, T, K); got "
            f"{tuple(student_logits.shape)}, {tuple(topk_ids.shape)}, {tuple(topk_logprobs.shape)}."
        )
    if residual:
        per_token = _residual_kd(student_logits, topk_ids, topk_logprobs, mode, beta, temperature, mask)
        return temperature**2 * _masked_mean(per_token, mask)
    student_k = student_logits.gather(-1, topk_ids)  # (B, T, K)
    teacher_k = topk_logprobs.detach().to(student_k.dtype)  # (B, T, K)
    if mask is not None:  # masked tokens may hold garbage (NaN, all -inf): make them harmless, then drop them
        valid = mask.to(torch.bool)[..., None]
        student_k = torch.where(valid, student_k, torch.zeros_like(student_k))
        teacher_k = torch.where(valid, teacher_k, torch.zeros_like(teacher_k))
    log_p_s = F.log_softmax(student_k / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_k / temperature, dim=-1)
    return temperature**2 * _masked_mean(_divergence(log_p_t, log_p_s, mode, beta), mask)  # per token (B, T)


def _divergence(log_p_t: Tensor, log_p_s: Tensor, mode: str, beta: float) -> Tensor:
    if mode == "forward" or (mode == "jsd" and beta == 0.0):
        return _kl_from_log(log_p_t, log_p_s)
    if mode == "reverse" or (mode == "jsd" and beta == 1.0):
        return _kl_from_log(log_p_s, log_p_t)
    # log m = log(β·p_t + (1−β)·p_s), computed in log space as TRL does
    log_m = torch.logsumexp(torch.stack([log_p_t + math.log(beta), log_p_s + math.log(1.0 - beta)]), dim=0)
    return beta * _kl_from_log(log_p_t, log_m) + (1.0 - beta) * _kl_from_log(log_p_s, log_m)


_ABSENT = -1e4  # log-prob of a merged-away slot: exp() is exactly 0, yet finite so no 0 * inf can appear


def _with_rest(logp: Tensor) -> Tensor:
    """(..., K) log-probs of distinct ids -> (..., K + 1) with log(1 − Σ p) appended (floored at 1e-6)."""
    total = torch.logsumexp(logp, -1, keepdim=True)
    return torch.cat([logp, torch.log((-torch.expm1(total)).clamp(min=1e-6))], -1)


def _residual_kd(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, mode: str, beta: float,
                 temperature: float, mask: Tensor | None) -> Tensor:
    """Per-token divergence over the distinct top-k ids plus the rest of the vocabulary (see token_kd_loss)."""
    K = topk_ids.shape[-1]
    student_k = F.log_softmax(student_logits.float(), -1).gather(-1, topk_ids)  # full-softmax log-probs
    teacher_k = topk_logprobs.detach().float()
    if mask is not None:  # masked tokens may hold garbage: make them a harmless flat K-way split
        valid = mask.to(torch.bool)[..., None]
        flat = torch.full_like(student_k, -math.log(K + 1))
        student_k, teacher_k = torch.where(valid, student_k, flat), torch.where(valid, teacher_k, flat)
    same = topk_ids[..., :, None] == topk_ids[..., None, :]  # (B, T, K, K)
    repeat = (same & torch.ones(K, K, dtype=torch.bool, device=same.device).tril(-1)).any(-1)  # an earlier slot has it
    merged = torch.logsumexp(torch.where(same, teacher_k[..., None, :], torch.full_like(same, -math.inf, dtype=teacher_k.dtype)), -1)
    teacher_k = torch.where(repeat | ~torch.isfinite(merged), torch.full_like(merged, _ABSENT), merged)
    student_k = torch.where(repeat, torch.full_like(student_k, _ABSENT), student_k)
    log_p_t = F.log_softmax(_with_rest(teacher_k) / temperature, -1)
    log_p_s = F.log_softmax(_with_rest(student_k) / temperature, -1)
    return _divergence(log_p_t, log_p_s, mode, beta)


def sequence_kd_loss(student_logits: Tensor, target_ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """Sequence-level KD (Kim & Rush 2016): next-token CE of the student on the teacher's generations.

    ``student_logits`` (B, T, V); ``target_ids`` (B, T) long, already aligned with the logit positions
    (position i's logits predict ``target_ids[:, i]``); ``mask`` (B, T), 1 = a generated token to learn,
    0 = prompt or padding. Targets equal to -100 are ignored as well. Mean over counted tokens; a scalar.
    """
    if student_logits.dim() != 3 or target_ids.shape != student_logits.shape[:2]:
        raise ValueError(
            f"expected student_logits (B, T, V) and target_ids (B, T); got {tuple(student_logits.shape)}, "
            f"{tuple(target_ids.shape)}."
        )
    valid = target_ids != IGNORE_INDEX
    if mask is not None:
        valid = valid & mask.to(torch.bool)
    targets = torch.where(valid, target_ids, torch.zeros_like(target_ids))
    ce = F.cross_entropy(student_logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    return _masked_mean(ce, valid)


def lm_ce_loss(logits: Tensor, input_ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """Causal-LM CE with the usual shift: logits (B, T, V) at position i predict ``input_ids[:, i+1]``.

    ``mask`` (B, T) marks the tokens to predict (in ``input_ids`` positions). Delegates to
    ``sequence_kd_loss`` after shifting. Returns a scalar.
    """
    shifted_mask = None if mask is None else mask[:, 1:]
    return sequence_kd_loss(logits[:, :-1], input_ids[:, 1:], shifted_mask)
