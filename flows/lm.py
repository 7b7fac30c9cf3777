"""The loop for a causal-LM task: the same stages, registry, promotion and server as for classifiers.

``distill_lm_flow``: snapshot (text only) -> teacher top-k (cached per sequence) -> an LM round (carve from the
teacher, or continue the champion with replay) -> perplexity per domain against teacher and champion -> LM gate
-> MLflow run and model version with lineage -> ``promote_flow`` (the two-slot hot swap of a generation model on
Triton, then the ``champion`` alias) | review | reject.

``LoopContext.teacher_dir`` is the causal-LM teacher here, ``LoopContext.model`` the registered and served name
(``kdops-lm-student`` by default in the CLI).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.loop import act_on_decision
from flows.tasks import LoopContext, load_teacher
from kdops.data import Snapshot
from kdops.gate import Decision, LMGateThresholds, gate_lm
from kdops.lm.distill import LMDistillConfig
from kdops.lm.rounds import LMShape

LM_MODEL = "kdops-lm-student"


def _teacher(ctx: LoopContext):
    return load_teacher(ctx, "causal-lm")


def _snapshot(ctx: LoopContext, snapshot_id: str) -> Snapshot:
    return Snapshot.load(Path(ctx.home) / "snapshots", snapshot_id)


def _cache(ctx: LoopContext):
    from kdops.lm.cache import LMSoftLabelCache

    return LMSoftLabelCache(Path(ctx.home) / "lm_soft_labels.sqlite")


@task(name="lm-teacher-topk", retries=2, retry_delay_seconds=[2, 5], cache_policy=None)
def lm_soft_labels(ctx: LoopContext, snapshot_id: str, topk: int, max_length: int) -> dict:
    """Fill the top-k cache for a snapshot's texts; the teacher scores only sequences it has not seen."""
    teacher, cache = _teacher(ctx), _cache(ctx)
    cache.get_or_compute_topk(teacher, teacher.encode(_snapshot(ctx, snapshot_id).texts, max_length), topk)
    return cache.stats.to_dict()


@task(name="lm-distill", cache_policy=None)
def lm_distill(ctx: LoopContext, snapshot_id: str, cfg: LMDistillConfig, shape: LMShape, max_length: int,
               champion_dir: str | None, replay_ids: list[str]) -> dict:
    """One LM round into ``<home>/lm_students/<round key>``; a re-run with the same inputs reuses it."""
    from kdops.lm.rounds import run_lm_round

    teacher = _teacher(ctx)
    key = hashlib.sha256(json.dumps([snapshot_id, teacher.id, asdict(cfg), asdict(shape), max_length, champion_dir,
                                     sorted(replay_ids)], default=str).encode()).hexdigest()[:12]
    out = Path(ctx.home) / "lm_students" / key
    if (out / "kdops.json").exists():  # idempotent re-run after a crash
        return {"artifact": str(out), "reused": True, "key": key}
    replay = [t for sid in replay_ids for t in _snapshot(ctx, sid).texts]
    res = run_lm_round(teacher, _cache(ctx), _snapshot(ctx, snapshot_id).texts, out, cfg, shape, max_length,
                       champion_dir=champion_dir, replay_texts=replay, device=ctx.device, progress=False,
                       lineage={"snapshot_ids": {"train": snapshot_id, "replay": replay_ids}})
    return {"artifact": str(res.artifact), "reused": False, "key": key, "history": res.history, **res.info}


@task(name="lm-evaluate", cache_policy=None)
def lm_evaluate(ctx: LoopContext, artifact: str, eval_id: str, max_length: int, speed: bool = False) -> dict:
    """``LMReport.to_dict()``: perplexity per domain of teacher and student on the evaluation snapshot."""
    from kdops.lm.rounds import evaluate_lm

    rows = _snapshot(ctx, eval_id).rows
    by_domain = {str(d or "all"): g["text"].tolist() for d, g in rows.groupby(rows["domain"].fillna("all"))}
    return evaluate_lm(artifact, _teacher(ctx), by_domain, max_length, speed=speed, device=ctx.device,
                       cache=_cache(ctx)).to_dict()  # the teacher scores each held-out sequence once, across rounds


@task(name="lm-gate", cache_policy=None)
def lm_gate_task(candidate: dict, champion: dict | None, thresholds: LMGateThresholds) -> Decision:
    return gate_lm(candidate, champion, thresholds)


@task(name="lm-register", retries=3, retry_delay_seconds=[2, 5, 15], cache_policy=None)
def lm_register(ctx: LoopContext, artifact: str, report: dict, info: dict, snapshot_ids: dict, cfg: LMDistillConfig,
                shape: LMShape) -> int:
    """An MLflow run (config, loss per step, the LM report, a perplexity plot, inputs) and a model version."""
    from kdops import plots
    from kdops.artifacts import read_meta
    from kdops.registry import Registry

    reg = Registry(tracking_uri=ctx.tracking_uri)
    sha = read_meta(artifact).weights_sha256
    for v in reg.versions(ctx.model):  # idempotent across re-runs: the same weights are one version
        if v.get("weights_sha256") == sha:
            return int(v["version"])
    with reg.run(f"lm-distill-{info.get('key', '')}", tags={"kdops.round_key": info.get("key", ""), "kdops.kind": "causal-lm"}) as run:
        run.log_params({"distill": asdict(cfg), "shape": asdict(shape), "reused": info.get("reused"),
                        "layers": info.get("layers")})
        for rec in info.get("history", []):
            run.log_metrics({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])
        run.log_eval_report(report)
        for context, sid in snapshot_ids.items():
            run.log_snapshot(_snapshot(ctx, sid), context=context)
        if info.get("history"):
            run.log_figure(plots.learning_curves(info["history"]), "learning_curves")
        per = {name: {"per_domain": {d: {"perplexity": v[name]} for d, v in report["ppl_by_domain"].items()}}
               for name in ("student", "teacher")}
        run.log_figure(plots.domain_accuracy(per, "perplexity", ylim=None), "domain_perplexity")
        return reg.register(artifact, run.run_id, name=ctx.model,
                            lineage={"snapshot_ids": snapshot_ids, "topk": cfg.topk})


def short_lm_report(summary: dict) -> dict:
    """What the ledger keeps of an LM report and a later gate reads back as the champion's: the headline
    figures and the per-domain perplexities."""
    return {k: v for k, v in summary.items()
            if k in ("ppl_ratio", "student_ppl", "teacher_ppl", "param_ratio", "speedup") or k.startswith("student_ppl/")}


@flow(name="distill_lm_flow")
def distill_lm_flow(ctx: LoopContext, train_id: str, eval_id: str, cfg: LMDistillConfig = LMDistillConfig(),
                    shape: LMShape = LMShape(), thresholds: LMGateThresholds = LMGateThresholds(),
                    champion: dict | None = None, deploy: bool = True, max_length: int = 48,
                    replay_ids: list[str] | None = None, speed: bool = False) -> dict:
    """One LM round on snapshot ``train_id``, evaluated on ``eval_id`` (texts with a ``domain`` column).
    ``champion``: {"version", "artifact", "report"} of the serving LM champion (its ``report`` is the summary the
    gate compares per domain), or None. ``replay_ids``: earlier training snapshots to replay from."""
    log = get_run_logger()
    t0 = time.perf_counter()
    stats = lm_soft_labels(ctx, train_id, cfg.topk, max_length)
    log.info("teacher top-k for %s: %s", train_id, stats)
    info = lm_distill(ctx, train_id, cfg, shape, max_length, champion["artifact"] if champion else None, replay_ids or [])
    report = lm_evaluate(ctx, info["artifact"], eval_id, max_length, speed)
    summary = report["summary"]
    decision = lm_gate_task(summary, champion["report"] if champion else None, thresholds)
    log.info("LM gate: %s (%s)", decision.action, "; ".join(decision.reasons))
    version = lm_register(ctx, info["artifact"], report, info, {"train": train_id, "eval": eval_id}, cfg, shape)
    out = {"version": version, "artifact": info["artifact"], "report": report, "summary": summary,
           "decision": asdict(decision), "distill": {k: v for k, v in info.items() if k != "history"}}
    # What the ledger keeps, and the next round's gate reads back as the champion's report: the per-domain
    # perplexities included.
    short = short_lm_report(summary)
    out.update(act_on_decision(ctx, decision, version, info["artifact"], short, champion, deploy))
    out["seconds"] = time.perf_counter() - t0
    return out
