"""The continuous loop as Prefect flows: thin, top-down lists of the tasks in flows/tasks.py.

- ``distill_flow``: snapshot -> soft labels (cached) -> incremental distillation -> evaluate against the
  teacher and the champion -> gate -> register -> promote | review | reject.
- ``promote_flow``: a transaction. Hot swap on Triton, then move ``champion`` in the registry. If the swap
  fails, the old version never stopped serving (serving.swap's contract); if the registry step fails after
  a swap, the server is swapped back to the previous champion's artifact, so server and registry agree.
- ``monitor_flow``: read a window of the prediction log, run the drift checks, act on the verdict.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger

from flows.tasks import (LoopContext, distill_round, evaluate_student, gate_task, hot_swap_task, open_review,
                         log_monitor_run, promote_in_registry, register, soft_labels,
                         with_review_labels)
from kdops.distill import DistillConfig
from kdops.gate import GateThresholds
from kdops.rounds import StudentShape


@flow(name="promote_flow")
def promote_flow(ctx: LoopContext, version: int, artifact: str, reason: str, summary: dict,
                 previous_artifact: str | None = None) -> dict:
    log = get_run_logger()
    swap = hot_swap_task(ctx, artifact)  # raises SwapError with the old version still serving
    try:
        entry = promote_in_registry(ctx, version, reason, summary)
    except Exception:
        log.error("registry promotion of v%s failed after the swap; swapping the previous champion back", version)
        if previous_artifact:
            hot_swap_task(ctx, previous_artifact)
        raise
    log.info("v%s serving as %s and champion in the registry", version, swap["label"])
    return {"swap": swap, "ledger": entry}


@flow(name="distill_flow")
def distill_flow(ctx: LoopContext, train_id: str, eval_id: str,
                 cfg: DistillConfig = DistillConfig(), shape: StudentShape = StudentShape(),
                 thresholds: GateThresholds = GateThresholds(), champion: dict | None = None,
                 deploy: bool = True, use_review: bool = True) -> dict:
    """One round on snapshot ``train_id`` (new rows), evaluated on snapshot ``eval_id`` (see
    ``flows.tasks.save_snapshot``). ``champion``: {"version", "artifact", "report"} of the serving champion, or None.
    ``use_review``: add the review queue's labelled cases to the training rows (hard labels) and its golden set
    to the evaluation rows (slice ``golden``)."""
    log = get_run_logger()
    t0 = time.perf_counter()
    if use_review:  # people's labels: hard labels for training, the frozen golden set as an evaluation slice
        train_id, eval_id = with_review_labels(ctx, train_id, eval_id)
    stats = soft_labels(ctx, train_id)
    log.info("soft labels for %s: %s", train_id, stats)
    info = distill_round(ctx, train_id, cfg, shape, champion["artifact"] if champion else None,
                         champion["version"] if champion else None)
    report = evaluate_student(ctx, info["artifact"], eval_id)
    decision = gate_task(report, champion["report"] if champion else None, thresholds)
    log.info("gate: %s (%s)", decision.action, "; ".join(decision.reasons))
    version = register(ctx, info["artifact"], report, info, {"train": train_id, "eval": eval_id}, cfg)
    out = {"version": version, "artifact": info["artifact"], "report": report, "decision": asdict(decision),
           "distill": {k: v for k, v in info.items() if k != "history"}, "train_snapshot": train_id}
    summary = {"retention": report["retention"], "accuracy": report["overall"]["accuracy"],
               "per_domain": {k: v["accuracy"] for k, v in report["per_domain"].items()}}
    out.update(act_on_decision(ctx, decision, version, info["artifact"], summary, champion, deploy))
    out["seconds"] = time.perf_counter() - t0
    return out


def act_on_decision(ctx: LoopContext, decision, version: int, artifact: str, summary: dict, champion: dict | None,
                    deploy: bool) -> dict:
    """The gate's verdict carried out: ``promote`` runs ``promote_flow`` (when deploying), ``review`` opens a case
    for a person, ``reject`` does nothing (the champion keeps serving). Returns what to add to the flow's result."""
    previous = champion["artifact"] if champion else None
    reason = "; ".join(decision.reasons)
    if decision.action == "promote" and deploy:
        return {"promotion": promote_flow(ctx, version, artifact, reason, summary, previous)}
    if decision.action == "review":
        payload = {"version": version, "summary": summary, "artifact": artifact, "previous_artifact": previous}
        return {"review_id": open_review(ctx, "candidate", payload, reason)}
    return {}


@flow(name="monitor_flow")
def monitor_flow(ctx: LoopContext, reference, since: float, until: float | None = None, window_id: str | None = None,
                 teacher_sample: bool = True, config=None, trigger=None, log_to_mlflow: bool = True) -> dict:
    """Check the traffic logged since ``since`` against the champion's reference profile; the Evidently report
    and the test results go to an MLflow run (experiment ``kdops-monitoring``) unless ``log_to_mlflow`` is off."""
    import dataclasses

    from kdops.prediction_log import read_predictions
    from monitoring import MonitorConfig, TriggerConfig, monitor_window

    df = read_predictions(ctx.prediction_log, since=since)
    if until is not None:
        df = df[df["time"] <= pd.Timestamp(until, unit="s", tz="UTC")]
    if df.empty:
        return {"rows": 0, "action": "ok"}
    teacher = None
    if teacher_sample:
        from kdops.teacher import HFTeacher

        t = HFTeacher(ctx.teacher_dir)
        teacher = t.logits
    window = df[["text", "probabilities"]].reset_index(drop=True)
    config = dataclasses.replace(config or MonitorConfig(), window_size=max(20, len(window)))
    res = monitor_window(reference, window, Path(ctx.home) / "monitoring", config, trigger or TriggerConfig(),
                         teacher=teacher, window_id=window_id)
    run_id = log_monitor_run(ctx, res.history_row, len(window)) if log_to_mlflow else None
    review_id = None
    if res.action == "review":  # a person decides; the case carries the evidence
        review_id = open_review(ctx, "drift", {"window_id": window_id, "rows": len(window), "fired": list(res.verdict.reasons),
                                               "report": str(res.report_path) if res.report_path else None},
                                res.verdict.explanation or "drift needs review")
    return {"rows": len(window), "decision": res.verdict.decision, "action": res.action, "review_id": review_id, "mlflow_run": run_id,
            "report": str(res.report_path) if res.report_path else None, "history": res.history_row}
