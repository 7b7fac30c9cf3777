"""``review_flow``: a person works the review queue from Prefect's UI.

The flow lists the open cases in the run's description and pauses with a typed form
(``pause_flow_run(wait_for_input=ReviewForm)``): Prefect renders one row per case, pre-filled with
``skip``. The reviewer picks ``approve``, ``reject`` or ``label`` (with a label) and clicks Resume; the
flow applies each decision to the queue, which is where ``kdops review`` (the CLI) writes too.

What a decision does:
- a labelled text case becomes a hard label in the next distillation round and enters the frozen golden
  evaluation set (``kdops.review``; ``distill_flow`` reads both);
- an approved ``candidate`` model (the registry's ``challenger``) is promoted through ``flows.promotion.promote``:
  hot swap and ``champion`` alias as one transaction (the alias alone when the loop has no Triton); a rejected
  one is written to the ledger as rejected and stops being the challenger.

``decide`` is the one way a decision is applied, here and in ``kdops review approve|reject|label``: the registry
and Triton first, the queue after, so a promotion that fails leaves the case open to decide again.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger, pause_flow_run
from prefect.input import RunInput
from pydantic import BaseModel, Field

from flows.tasks import LoopContext


class CaseDecision(BaseModel):
    case_id: int = Field(description="Review case id (see the table above).")
    decision: Literal["skip", "approve", "reject", "label"] = Field(
        "skip", description="skip leaves the case open; label needs a label.")
    label: str | None = Field(None, description="For 'label': one of the label names listed above.")


class ReviewForm(RunInput):
    reviewer: str = Field(description="Your name; recorded with every decision.")
    decisions: list[CaseDecision] = Field(description="One row per case.")


def _describe(cases: list[dict], label_names: list[str]) -> str:
    lines = ["### kdops review", f"Labels: {', '.join(f'`{x}`' for x in label_names)}", "",
             "| case | kind | reason | content |", "|---|---|---|---|"]
    for c in cases:
        p = c["payload"]
        content = p.get("text") or (f"model v{p.get('version')}: {p.get('summary')}" if c["kind"] == "candidate" else str(p))
        content = str(content).replace("|", "\\|").replace("\n", " ")[:300]
        lines.append(f"| {c['id']} | {c['kind']} | {c['reason'].replace('|', '/')[:120]} | {content} |")
    return "\n".join(lines)


def decide(ctx: LoopContext, queue, case_id: int, decision: str, label: str | None, reviewer: str) -> dict:
    """Apply one decision: a ``candidate`` case's approve / reject reaches the registry (and Triton) first, then
    the queue records it. Returns the decided case, with ``"applied"`` (the promotion or ledger entry) added."""
    from flows.promotion import decide_candidate
    from kdops.review import ReviewError

    case = queue.get(case_id)
    if case["status"] != "open":
        raise ReviewError(f"case {case_id} is already {case['status']} (by {case['reviewer']}).")
    applied = decide_candidate(ctx, case, decision, reviewer) if case["kind"] == "candidate" else None
    return {**queue.decide(case_id, decision, label, reviewer=reviewer), "applied": applied}


@flow(name="review_flow")
def review_flow(ctx: LoopContext, label_names: list[str], kinds: list[str] | None = None, limit: int = 25,
                timeout_s: int = 3600, poll_s: int = 10) -> dict:
    """Pause for a reviewer's decisions on up to ``limit`` open cases; apply them; report what changed."""
    from kdops.review import ReviewError, ReviewQueue

    log = get_run_logger()
    queue = ReviewQueue(ctx.paths.review_db)
    cases = [c for c in queue.open() if kinds is None or c["kind"] in kinds][:limit]
    if not cases:
        log.info("review queue: nothing open")
        return {"cases": 0, "applied": [], "errors": []}
    log.info("review queue: %d open case(s); waiting for a reviewer in the Prefect UI (Resume)", len(cases))
    form = ReviewForm.with_initial_data(description=_describe(cases, label_names), reviewer="",
                                        decisions=[CaseDecision(case_id=c["id"]) for c in cases])
    answer = pause_flow_run(wait_for_input=form, timeout=timeout_s, poll_interval=poll_s)
    by_id, applied, errors = {c["id"]: c for c in cases}, [], []
    for d in answer.decisions:
        if d.decision == "skip":
            continue
        try:
            if d.case_id not in by_id:
                raise ReviewError(f"case {d.case_id} was not in this review")
            if d.decision == "label" and d.label not in label_names:
                raise ReviewError(f"label {d.label!r} is not one of {label_names}")
            decide(ctx, queue, d.case_id, d.decision, d.label, answer.reviewer or "prefect-ui")
            applied.append({"case_id": d.case_id, "decision": d.decision, "label": d.label})
        except Exception as e:  # one bad row does not lose the others; each error is reported
            log.error("case %s: %s", d.case_id, e)
            errors.append({"case_id": d.case_id, "error": str(e)})
    log.info("review applied %d decision(s), %d error(s)", len(applied), len(errors))
    return {"cases": len(cases), "applied": applied, "errors": errors}
