"""The continuous loop as Prefect flows: thin, top-down lists of the tasks in flows/tasks.py.

- ``distill_flow``: snapshot -> soft labels (cached) -> incremental distillation -> evaluate against the
  teacher and the champion -> gate -> register -> promote | review | reject.
- ``promote_flow`` / ``rollback_flow`` (``flows.promotion``): the registry's ``champion`` alias and what Triton
  serves, moved as one transaction.
- ``monitor_flow``: read a window of the prediction log, run the drift checks, act on the verdict.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import pandas as pd
from prefect import flow, get_run_logger

from flows.promotion import act_on_decision
from flows.tasks import (LoopContext, distill_round, evaluate, gate_reference, gate_task, load_teacher, log_monitor_run,
                         open_review, register, serving_graphs, teacher_outputs, teacher_spend, texts_for_review, with_review_labels)
from kdops import kinds
from kdops.artifacts import Artifact
from kdops.recipes import ClassifierRecipe, LMRecipe, resolve_recipe
from kdops.registry import Champion


@flow(name="distill_flow")
def distill_flow(ctx: LoopContext, train_id: str | None = None, eval_id: str | None = None,
                 recipe: str | ClassifierRecipe | LMRecipe = "classifier", champion: Champion | None = None,
                 deploy: bool = True, use_review: bool = True, replay_ids: list[str] | None = None, speed: bool = False) -> dict:
    """One round of any task kind on snapshot ``train_id`` (new rows), evaluated on snapshot ``eval_id``.

    Without ``train_id`` (the ``kdops-distill`` deployment's scheduled runs) it is ``flows.sources.scheduled_round``:
    the snapshots queued from the watched directory since the last round; ``recipe`` is then a first round's, and a
    round continuing the champion uses its kind's incremental recipe.

    ``recipe``: a named recipe (``kdops.recipes``) or a recipe value; its kind chooses the implementation.
    ``champion``: the serving champion, or None for a first round; its ``report`` (the summary its promotion
    recorded, or a fresh evaluation on ``eval_id``) is what the gate compares slice by slice.
    ``use_review``: add the review queue's labelled cases to training (hard labels) and its golden set to the
    evaluation (slice ``golden``). ``replay_ids``: earlier snapshots whose text is replayed."""
    if train_id is None:
        from flows.sources import scheduled_round

        return scheduled_round(ctx, eval_id, recipe, use_review=use_review, speed=speed, deploy=deploy)
    if eval_id is None:
        raise ValueError("distill_flow: a round on train_id needs eval_id.")
    log = get_run_logger()
    t0, started = time.perf_counter(), time.time()
    recipe = resolve_recipe(recipe)
    kind = kinds.for_recipe(recipe)
    if use_review:
        train_id, eval_id = with_review_labels(ctx, train_id, eval_id)
    log.info("teacher outputs for %s: %s", train_id, teacher_outputs(ctx, recipe, train_id))
    info = distill_round(ctx, recipe, train_id, Artifact.read(champion.artifact) if champion else None,
                         champion.version if champion else None, tuple(replay_ids or ()))
    report = evaluate(ctx, recipe, info["artifact"], eval_id, speed)
    info["teacher_spend"] = teacher_spend(ctx, recipe.kind, started)
    decision = gate_task(recipe, report, gate_reference(ctx, champion, eval_id))
    log.info("gate: %s (%s)", decision.action, "; ".join(decision.reasons))
    if decision.action != "reject":
        served_as = serving_graphs(ctx, info["artifact"], eval_id)
        log.info("served as %s (%s)", served_as["runtime"], served_as["reason"])
    version = register(ctx, recipe, info["artifact"], report, info, {"train": train_id, "eval": eval_id})
    summary = {**kind.summary(report), "eval_id": eval_id}  # the ledger's best per slice compares like with like
    out = {"version": version, "artifact": info["artifact"], "report": report, "summary": summary,
           "decision": asdict(decision), "distill": {k: v for k, v in info.items() if k != "history"},
           "train_snapshot": train_id}
    out.update(act_on_decision(ctx, decision, version, info["artifact"], summary, deploy))
    out["seconds"] = time.perf_counter() - t0
    return out


@flow(name="monitor_flow")
def monitor_flow(ctx: LoopContext, reference, since: float, until: float | None = None, window_id: str | None = None,
                 teacher_kind: str | None = None, config=None, trigger=None, log_to_mlflow: bool = True,
                 artifact: str | None = None) -> dict:
    """Check the traffic logged since ``since`` against the champion's reference profile; the Evidently report
    and the test results go to an MLflow run (experiment ``kdops-monitoring``) unless ``log_to_mlflow`` is off.
    ``artifact``: the champion's directory, whose embeddings of the window feed the embedding-drift test."""
    import dataclasses

    from kdops.prediction_log import read_predictions
    from monitoring import MonitorConfig, TriggerConfig, monitor_window

    df = read_predictions(ctx.prediction_log, since=since)
    if until is not None:
        df = df[df["time"] <= pd.Timestamp(until, unit="s", tz="UTC")]
    if df.empty:
        return {"rows": 0, "action": "ok"}
    # ``teacher_kind``: label the window with the teacher of that kind (None: no disagreement check)
    teacher = kinds.get(teacher_kind).monitor_teacher(load_teacher(ctx, teacher_kind)) if teacher_kind else None
    window = df[["text", "probabilities"]].reset_index(drop=True)
    if artifact and reference.embeddings is not None:
        art = Artifact.read(artifact)
        embeddings = kinds.get(art.kind).embed(art, window["text"].tolist())
        if embeddings is not None:
            window["embedding"] = list(embeddings)
    config = dataclasses.replace(config or MonitorConfig(), window_size=max(20, len(window)))
    res = monitor_window(reference, window, ctx.paths.monitoring, config, trigger or TriggerConfig(),
                         teacher=teacher, window_id=window_id)
    run_id = log_monitor_run(ctx, res.history_row, len(window)) if log_to_mlflow else None
    asked = texts_for_review(ctx, window, res.teacher_sample, getattr(reference, "label_names", None))
    review_id = None
    if res.action == "review":  # a person decides; the case carries the evidence
        review_id = open_review(ctx, "drift", {"window_id": window_id, "rows": len(window), "fired": list(res.verdict.reasons),
                                               "report": str(res.report_path) if res.report_path else None},
                                res.verdict.explanation or "drift needs review")
    return {"rows": len(window), "decision": res.verdict.decision, "action": res.action, "review_id": review_id, "mlflow_run": run_id,
            "report": str(res.report_path) if res.report_path else None, "history": res.history_row,
            "review_texts": asked}
