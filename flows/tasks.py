"""Small typed Prefect tasks. Each calls one stage of kdops, serving or monitoring; no ML math here.

Tasks hand the next one an identifier (a snapshot id, an artifact path, an MLflow version), never a
global. Retries sit on the decorator for the steps that touch a server.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from prefect import task

from kdops.data import Snapshot, from_rows
from kdops.distill import DistillConfig
from kdops.gate import Decision, GateThresholds, gate
from kdops.rounds import StudentShape

MODEL = "kdops-student"


@dataclass(frozen=True)
class LoopContext:
    """Where a loop keeps its state and which servers it talks to: configuration, not globals."""

    home: str = field(metadata={"help": "kdops data directory (snapshots, caches, students)."})
    teacher_dir: str = field(metadata={"help": "Teacher model directory (HF sequence classifier)."})
    tracking_uri: str | None = field(default=None, metadata={"help": "MLflow tracking URI (None: embedded SQLite)."})
    triton_url: str = field(default="", metadata={"help": "Triton HTTP host:port."})
    triton_grpc_url: str = field(default="", metadata={"help": "Triton gRPC host:port: model control goes over gRPC (an HTTP load blocks pinned HTTP connections)."})
    triton_key: str = field(default="", metadata={"help": "Admin key for Triton's model-control API (empty: $KDOPS_TRITON_ADMIN_KEY, so served deployments need not show it in their parameters)."})
    repository: str = field(default="", metadata={"help": "Triton model repository as seen from here."})
    model: str = field(default=MODEL, metadata={"help": "Registered and served model name."})
    prediction_log: str = field(default="", metadata={"help": "Prediction-log directory written by the server."})
    device: str = field(default="cpu", metadata={"help": "Training device."})


@functools.lru_cache(maxsize=2)
def _load_teacher(kind: str, directory: str, device: str, stamp: int):
    if kind == "causal-lm":
        from kdops.lm.teacher import HFCausalLMTeacher

        return HFCausalLMTeacher(directory, device=device)
    from kdops.teacher import HFTeacher

    return HFTeacher(directory, device=device)


def load_teacher(ctx: LoopContext, kind: str = "classifier"):
    """The loop's teacher, loaded once per process and shared by the tasks of a flow (read-only use): a round
    scores, distils and evaluates with it, and each load was a full read of the weights. A rewritten weights
    file (new modification time) loads afresh."""
    weights = Path(ctx.teacher_dir) / "model.safetensors"
    stamp = weights.stat().st_mtime_ns if weights.exists() else 0
    return _load_teacher(kind, str(ctx.teacher_dir), ctx.device, stamp)


def _teacher(ctx: LoopContext):
    return load_teacher(ctx)


def save_snapshot(ctx: LoopContext, rows: pd.DataFrame, labels: tuple[str, ...]) -> str:
    """Rows in, snapshot id out. Flows take ids, not tables: Prefect stores flow parameters in its API
    (512 KB limit), and an id names exactly what a round trained on."""
    snap = from_rows(rows, labels)
    snap.save(Path(ctx.home) / "snapshots")
    return snap.id


@task(name="teacher-soft-labels", retries=2, retry_delay_seconds=[2, 5], cache_policy=None)
def soft_labels(ctx: LoopContext, snapshot_id: str) -> dict:
    """Fill the cache for a snapshot; the teacher runs only on texts it has not seen."""
    from kdops.soft_labels import SoftLabelCache

    snap = Snapshot.load(Path(ctx.home) / "snapshots", snapshot_id)
    cache = SoftLabelCache(Path(ctx.home) / "soft_labels.sqlite")
    cache.get_or_compute(_teacher(ctx), snap.texts)
    return cache.stats.to_dict()


@task(name="distill", cache_policy=None)
def distill_round(ctx: LoopContext, snapshot_id: str, cfg: DistillConfig, shape: StudentShape,
                  champion_dir: str | None, parent_version: int | None) -> dict:
    """Distil into ``<home>/students/<round key>``; a re-run with the same inputs reuses the finished artifact."""
    import hashlib

    from kdops.replay import ReplayBuffer
    from kdops.rounds import run_round
    from kdops.soft_labels import SoftLabelCache

    teacher = _teacher(ctx)
    key = hashlib.sha256(json.dumps([snapshot_id, teacher.id, cfg.to_dict(), champion_dir, str(shape)], default=str).encode()).hexdigest()[:12]
    out = Path(ctx.home) / "students" / key
    if (out / "kdops.json").exists():  # idempotent re-run: a killed flow does not retrain what it finished
        return {"artifact": str(out), "reused": True, "key": key}
    snap = Snapshot.load(Path(ctx.home) / "snapshots", snapshot_id)
    replay_dir = Path(ctx.home) / "replay"
    replay = ReplayBuffer.load(replay_dir) if (replay_dir / "replay.json").exists() else ReplayBuffer()
    res = run_round(teacher, SoftLabelCache(Path(ctx.home) / "soft_labels.sqlite"), snap.rows, out, cfg, shape=shape,
                    champion_dir=Path(champion_dir) if champion_dir else None, replay=replay,
                    snapshot_ids={"train": snapshot_id}, parent_version=str(parent_version) if parent_version else None,
                    checkpoint_dir=Path(ctx.home) / "checkpoints" / key, progress=False)
    replay.save(replay_dir)
    return {"artifact": str(out), "reused": False, "key": key, "history": res.result.history, "seconds": res.result.seconds,
            "cache": res.cache, "soft_label_key": res.soft_label_key, "replay_rows": res.replay_rows}


@task(name="evaluate", cache_policy=None)
def evaluate_student(ctx: LoopContext, artifact: str, eval_snapshot_id: str, speed: bool = False) -> dict:
    from kdops.evaluate import evaluate
    from kdops.predict import Predictor
    from kdops.soft_labels import SoftLabelCache

    teacher = _teacher(ctx)
    snap = Snapshot.load(Path(ctx.home) / "snapshots", eval_snapshot_id)
    rows = snap.rows[snap.rows["label"].isin(teacher.label_names)].reset_index(drop=True)
    logits = SoftLabelCache(Path(ctx.home) / "soft_labels.sqlite").get_or_compute(teacher, rows["text"].tolist())
    return evaluate(Predictor.from_dir(artifact), rows, logits, teacher.label_names, speed=speed, robustness=False,
                    teacher_params=teacher.num_parameters()).to_dict()


@task(name="gate", cache_policy=None)
def gate_task(candidate: dict, champion: dict | None, thresholds: GateThresholds) -> Decision:
    return gate(candidate, champion, thresholds)


@task(name="register", retries=3, retry_delay_seconds=[2, 5, 15], cache_policy=None)
def register(ctx: LoopContext, artifact: str, report: dict, distill_info: dict, snapshot_ids: dict, cfg: DistillConfig) -> int:
    """An MLflow run (params, metrics, report, plots, inputs) and a model version with lineage."""
    from kdops import plots
    from kdops.artifacts import read_meta
    from kdops.registry import Registry

    reg = Registry(tracking_uri=ctx.tracking_uri)
    sha = read_meta(artifact).weights_sha256
    for v in reg.versions(ctx.model):  # idempotent across re-runs: the same weights are one version
        if v.get("weights_sha256") == sha:
            return int(v["version"])
    with reg.run(f"distill-{distill_info.get('key', '')}", tags={"kdops.round_key": distill_info.get("key", "")}) as run:
        run.log_params({"distill": cfg.to_dict(), "reused": distill_info.get("reused")})
        for rec in distill_info.get("history", []):
            run.log_metrics({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=rec["epoch"])
        run.log_eval_report(report)
        for context, sid in snapshot_ids.items():
            run.log_snapshot(Snapshot.load(Path(ctx.home) / "snapshots", sid), context=context)
        if distill_info.get("history"):
            run.log_figure(plots.learning_curves(distill_info["history"]), "learning_curves")
        run.log_figure(plots.domain_accuracy({"student": report, "teacher": None, "champion": None}), "domain_accuracy")
        return reg.register(artifact, run.run_id, name=ctx.model)


@task(name="hot-swap", retries=1, retry_delay_seconds=[5], cache_policy=None)
def hot_swap_task(ctx: LoopContext, artifact: str) -> dict:
    from serving.client import ServingClient
    from serving.export import ExportConfig
    from serving.swap import SwapConfig, hot_swap

    import os

    key = ctx.triton_key or os.environ.get("KDOPS_TRITON_ADMIN_KEY", "")
    client = ServingClient(ctx.triton_url, admin_key=key, grpc_url=ctx.triton_grpc_url)
    cfg = SwapConfig(export=ExportConfig(prediction_log_dir=ctx.prediction_log, torch_threads=1))
    return hot_swap(client, ctx.model, artifact, repo=ctx.repository, cfg=cfg).to_dict()


@task(name="registry-promote", retries=3, retry_delay_seconds=[2, 5, 15], cache_policy=None)
def promote_in_registry(ctx: LoopContext, version: int, reason: str, summary: dict) -> dict:
    from kdops.registry import Registry

    return Registry(tracking_uri=ctx.tracking_uri).promote(ctx.model, version, reason, summary, actor="promote_flow")


@task(name="open-review", cache_policy=None)
def open_review(ctx: LoopContext, kind: str, payload: dict, reason: str) -> int:
    from kdops.review import ReviewQueue

    return ReviewQueue(Path(ctx.home) / "review.sqlite").add(kind, payload, reason)


@task(name="review-labels", cache_policy=None)
def with_review_labels(ctx: LoopContext, train_id: str, eval_id: str) -> tuple[str, str]:
    """Snapshots ``train_id`` + the queue's labelled cases and ``eval_id`` + the golden set (domain ``golden``);
    the ids are unchanged when there is nothing to add. A case labelled outside the snapshot's label set (the
    queue accepts any string from the CLI) is left out and logged, never trained on."""
    from prefect import get_run_logger

    from kdops.review import ReviewQueue

    db = Path(ctx.home) / "review.sqlite"
    if not db.exists():
        return train_id, eval_id
    queue, snaps = ReviewQueue(db), Path(ctx.home) / "snapshots"
    out = []
    for sid, extra in ((train_id, queue.labelled_cases()), (eval_id, queue.golden_set())):
        snap = Snapshot.load(snaps, sid)
        extra = extra[~extra["text"].isin(set(snap.rows["text"]))]
        unknown = extra[~extra["label"].isin(snap.labels or ())]
        if len(unknown):
            get_run_logger().warning("review cases %s have labels outside %s; left out", unknown["id"].tolist(), snap.labels)
        extra = extra.drop(unknown.index)
        if extra.empty:
            out.append(sid)
            continue
        rows = pd.concat([snap.rows, extra[["id", "text", "label"]].assign(domain="golden")], ignore_index=True)
        out.append(save_snapshot(ctx, rows, snap.labels))
    return out[0], out[1]


@task(name="log-monitor-run", retries=2, retry_delay_seconds=[2, 5], cache_policy=None)
def log_monitor_run(ctx: LoopContext, history_row: dict, rows: int) -> str:
    """One MLflow run per checked window (experiment ``kdops-monitoring``): each test's statistic and p-value
    as metrics, the verdict as tags, and the Evidently HTML report as an artifact. Returns the run id."""
    import math

    from kdops.registry import Registry

    name = f"monitor-{history_row.get('window_id') or history_row['timestamp']}"
    tags = {"kdops.verdict": history_row["decision"], "kdops.action": history_row["action"],
            "kdops.fired": ",".join(history_row.get("reasons", []))[:500]}
    with Registry(tracking_uri=ctx.tracking_uri).run(name, experiment="kdops-monitoring", tags=tags) as run:
        metrics = {"rows": float(rows)}
        for test, r in history_row.get("tests", {}).items():
            for k in ("statistic", "p_value"):
                v = r.get(k)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    metrics[f"{test}.{k}"] = float(v)
        run.log_metrics(metrics)
        if history_row.get("report") and Path(history_row["report"]).exists():
            run.log_artifact(history_row["report"], "evidently")
        return run.run_id
