"""Stage 5: the promotion gate, a pure function of two evaluation reports and thresholds.

``gate(candidate, champion, thresholds) -> Decision``: ``promote`` when the candidate keeps enough of the
teacher's accuracy, forgets no domain slice beyond tolerance against the champion, and fits the latency
budget; ``review`` when it misses a threshold by less than the review band (a person decides);
``reject`` otherwise. Every reason is spelled out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class GateThresholds:
    min_retention: float = field(default=0.97, metadata={"help": "Student accuracy / teacher accuracy must reach this."})
    max_slice_drop: float = field(default=0.01, metadata={"help": "Largest accuracy drop on any domain slice vs the champion."})
    max_p99_ms: float | None = field(default=None, metadata={"help": "Latency budget: p99 ms at batch size 1 (None = no budget)."})
    review_band: float = field(default=0.01, metadata={"help": "Misses by less than this go to a person instead of a reject."})
    min_slice_rows: int = field(default=30, metadata={"help": "Slices with fewer rows are too noisy to gate on."})

    def __post_init__(self) -> None:
        if not 0.0 < self.min_retention <= 1.5:
            raise ValueError("min_retention must be in (0, 1.5].")
        if self.max_slice_drop < 0 or self.review_band < 0:
            raise ValueError("max_slice_drop and review_band must be non-negative.")


@dataclass(frozen=True)
class Decision:
    action: str  # "promote" | "review" | "reject"
    reasons: tuple[str, ...]

    def to_dict(self) -> dict:
        return asdict(self)


class _Checks:
    """Collects every threshold check as ok, soft (within the review band) or hard, then decides."""

    def __init__(self, review_band: float):
        self.band, self.hard, self.soft, self.ok = review_band, [], [], []

    def __call__(self, name: str, value: float, limit: float, higher_is_better: bool) -> None:
        gap = (limit - value) if higher_is_better else (value - limit)
        cmp = ">=" if higher_is_better else "<="
        msg = f"{name} {value:.4f} (limit {cmp} {limit:.4f})"
        if gap <= 0:
            self.ok.append(msg)
        elif gap < self.band:
            self.soft.append(msg + f": missed by {gap:.4f}, within the review band")
        else:
            self.hard.append(msg + f": missed by {gap:.4f}")

    def decision(self) -> Decision:
        if self.hard:
            return Decision("reject", tuple(self.hard + self.soft))
        if self.soft:
            return Decision("review", tuple(self.soft))
        return Decision("promote", tuple(self.ok) or ("no thresholds to check",))


def slice_reference(dom: str, champion: dict, candidate: dict) -> tuple[float, str]:
    """What a slice must not fall below (before the tolerance): the champion's accuracy, or the slice's best promoted
    accuracy (``champion["best_per_domain"]``) capped at the teacher's on that slice when that is higher. Against the
    champion alone, rounds that each lose a little within tolerance add up; against the best they cannot."""
    ref, what = champion["per_domain"][dom]["accuracy"], "champion"
    best = (champion.get("best_per_domain") or {}).get(dom)
    if best is not None:
        teacher = (candidate.get("teacher_per_domain") or {}).get(dom, {}).get("accuracy")
        capped = min(best, teacher) if teacher is not None else best
        if capped > ref:
            ref, what = capped, "best promoted" if capped == best else "teacher"
    return ref, what


def gate(candidate: dict, champion: dict | None, th: GateThresholds = GateThresholds()) -> Decision:
    """Decide on ``candidate`` (an ``EvalReport.to_dict()``) against the serving ``champion``'s summary (or None),
    which may carry each slice's best promoted accuracy (``best_per_domain``)."""
    check = _Checks(th.review_band)
    hard = check.hard

    check("retention", candidate["retention"], th.min_retention, True)
    if champion is not None:
        for dom, m in champion.get("per_domain", {}).items():
            cand = candidate.get("per_domain", {}).get(dom)
            if cand is None:
                hard.append(f"slice {dom!r}: evaluated for the champion but missing for the candidate")
                continue
            if min(m.get("n", 0), cand.get("n", 0)) < th.min_slice_rows:
                continue
            ref, what = slice_reference(dom, champion, candidate)
            check(f"slice {dom!r} accuracy (vs {what} {ref:.4f})", cand["accuracy"], ref - th.max_slice_drop, True)
    if th.max_p99_ms is not None:
        p99 = candidate.get("latency", {}).get("batch1", {}).get("p99_ms")
        if p99 is None:
            hard.append("latency budget set but the candidate has no batch-1 latency measurement")
        else:
            check("p99 latency ms (batch 1)", p99, th.max_p99_ms, False)
    return check.decision()


@dataclass(frozen=True)
class LMGateThresholds:
    """The gate for causal-LM students: perplexity against the teacher and the champion, optionally speed."""

    max_ppl_ratio: float = field(default=1.15, metadata={"help": "Student perplexity / teacher perplexity (held-out text) must stay at or below this."})
    max_domain_ppl_increase: float = field(default=0.05, metadata={"help": "Largest relative perplexity rise on any domain vs the champion (0.05 = 5 %)."})
    min_speedup: float | None = field(default=None, metadata={"help": "Generation tokens/s vs the teacher (None = not gated; needs a speed measurement)."})
    review_band: float = field(default=0.05, metadata={"help": "Misses by less than this go to a person instead of a reject."})

    def __post_init__(self) -> None:
        if self.max_ppl_ratio <= 0 or self.max_domain_ppl_increase < 0 or self.review_band < 0:
            raise ValueError("max_ppl_ratio must be positive; max_domain_ppl_increase and review_band non-negative.")


def gate_lm(candidate: dict, champion: dict | None, th: LMGateThresholds = LMGateThresholds()) -> Decision:
    """Decide on an LM candidate (``LMReport.summary()``) against the serving champion's summary (or None).

    Perplexity ratios, so the review band is relative too: 1.18 against a limit of 1.15 is within a 0.05 band.
    """
    check = _Checks(th.review_band)
    if candidate.get("ppl_ratio") is None:
        check.hard.append("no perplexity ratio against the teacher in the candidate report")
    else:
        check("perplexity / teacher", candidate["ppl_ratio"], th.max_ppl_ratio, False)
    if champion is not None:
        for key, value in champion.items():
            if not key.startswith("student_ppl/"):
                continue
            cand = candidate.get(key)
            if cand is None:
                check.hard.append(f"{key}: evaluated for the champion but missing for the candidate")
                continue
            check(f"{key} / champion's", cand / value, 1.0 + th.max_domain_ppl_increase, False)
    if th.min_speedup is not None:
        if candidate.get("speedup") is None:
            check.hard.append("speed threshold set but the candidate has no generation speed measurement")
        else:
            check("generation speedup", candidate["speedup"], th.min_speedup, True)
    return check.decision()
