"""Small typed Prefect tasks. Each calls one stage of kdops, serving or monitoring; no ML math here.

Every task is generic over the task kind: what differs between a classifier and a causal LM is looked up once,
in ``kdops.kinds``, from the round's recipe or the artifact. Tasks hand the next one an identifier (a snapshot
id, an artifact path, a registry version), never a global. Retries sit on the decorator for steps that touch a
server.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from prefect import task

from kdops import kinds
from kdops.artifacts import Artifact
from kdops.data import Snapshot, from_rows
from kdops.gate import Decision
from kdops.paths import Home

MODEL = "kdops-student"


@dataclass(frozen=True)
class LoopContext:
    """Where a loop keeps its state and which servers it talks to: configuration, not globals."""

    home: str = field(metadata={"help": "kdops data directory (snapshots, caches, students)."})
    teacher_dir: str = field(default="", metadata={"help": "Teacher model directory (a transformers model of the recipe's kind); empty: a served teacher (teacher_url) or none."})
    tracking_uri: str | None = field(default=None, metadata={"help": "MLflow tracking URI (None: the home's embedded SQLite)."})
    triton_url: str = field(default="", metadata={"help": "Triton HTTP host:port."})
    triton_grpc_url: str = field(default="", metadata={"help": "Triton gRPC host:port: model control goes over gRPC (an HTTP load blocks pinned HTTP connections)."})
    triton_key: str = field(default="", metadata={"help": "Admin key for Triton's model-control API (empty: $KDOPS_TRITON_ADMIN_KEY, so served deployments need not show it in their parameters)."})
    repository: str = field(default="", metadata={"help": "Triton model repository as seen from here."})
    model: str = field(default=MODEL, metadata={"help": "Registered and served model name."})
    prediction_log: str = field(default="", metadata={"help": "Prediction-log directory written by the server."})
    device: str = field(default="cpu", metadata={"help": "Training device."})
    teacher_url: str = field(default="", metadata={"help": "Triton HTTP host:port serving the teacher (instead of teacher_dir): no local teacher weights."})
    teacher_model: str = field(default="", metadata={"help": "The served teacher's model name (with teacher_url)."})
    teacher_api: str = field(default="", metadata={"help": "An OpenAI-compatible teacher: kdops.api_teacher.ApiTeacherConfig as JSON (no key: it names the environment variable holding one)."})
    runtime: str = field(default="auto", metadata={"help": "What serves a classifier on CPU: auto (its ONNX graph, INT8 where gated) or torch."})
    redact_texts: bool = field(default=False, metadata={"help": "The prediction log keeps texts' SHA-256 only."})
    review_per_window: int = field(default=10, metadata={"help": "Served texts each monitored window asks people to label (0: none)."})
    review_per_day: int = field(default=50, metadata={"help": "At most this many such texts a day."})

    @property
    def has_teacher(self) -> bool:
        return bool(self.teacher_dir or self.teacher_url or self.teacher_api)

    @property
    def teacher(self) -> kinds.TeacherSpec:
        """The loop's teacher as a spec; UserError when none (or a half-given served one) is configured."""
        if self.teacher_api:
            from dataclasses import replace

            from kdops.api_teacher import ApiTeacherConfig

            api = ApiTeacherConfig.from_json(self.teacher_api)
            return kinds.TeacherSpec(api=api if api.cache else replace(api, cache=str(self.paths.api_answers)))
        return kinds.TeacherSpec(path=self.teacher_dir, url=self.teacher_url, model=self.teacher_model)

    @property
    def paths(self) -> Home:
        return Home.at(self.home)

    @property
    def uri(self) -> str:
        return self.tracking_uri or self.paths.tracking_uri

    @property
    def admin_key(self) -> str:
        return self.triton_key or os.environ.get("KDOPS_TRITON_ADMIN_KEY", "")


def swap_config(ctx: LoopContext):
    """How this loop's swaps export: its prediction log, one torch thread per instance, its serving runtime."""
    from serving.export import ExportConfig
    from serving.swap import SwapConfig

    return SwapConfig(export=ExportConfig(prediction_log_dir=ctx.prediction_log, torch_threads=1, runtime=ctx.runtime,
                                          prediction_log_redact=ctx.redact_texts))


@functools.lru_cache(maxsize=2)
def _load_local_teacher(kind, spec: kinds.TeacherSpec, device: str, stamp: int):
    return kinds.get(kind).load_teacher(spec, device=device)


def served_teacher(spec: kinds.TeacherSpec):
    """The loader of served teachers the kinds are given: ``serving.teacher.TritonTeacher``."""
    from serving.teacher import TritonTeacher

    return TritonTeacher(spec.url, spec.model)


def load_teacher(ctx: LoopContext, kind):
    """The loop's teacher, shared by the tasks of a flow (read-only use): a round labels, distils and evaluates
    with it. A local one is loaded once per process (a rewritten weights file, a new modification time, loads
    afresh); a served one is asked for its config each time (one HTTP call), so a teacher re-deployed under the
    same name is seen with its new id and never fills the cache under the old one."""
    spec = ctx.teacher
    if spec.remote:
        return kinds.get(kind).load_teacher(spec, device=ctx.device, remote=served_teacher)
    weights = Path(spec.path) / "model.safetensors"
    stamp = weights.stat().st_mtime_ns if weights.exists() else 0
    return _load_local_teacher(kind, spec, ctx.device, stamp)


def save_snapshot(ctx: LoopContext, rows: pd.DataFrame, labels: tuple[str, ...] | None) -> str:
    """Rows in, snapshot id out. Flows take ids, not tables: Prefect stores flow parameters in its API
    (512 KB limit), and an id names exactly what a round trained on."""
    snap = from_rows(rows, labels)
    snap.save(ctx.paths.snapshots)
    return snap.id


def load_snapshot(ctx: LoopContext, snapshot_id: str) -> Snapshot:
    return Snapshot.load(ctx.paths.snapshots, snapshot_id)


@task(name="teacher-outputs", retries=2, retry_delay_seconds=[2, 5], cache_policy=None)
def teacher_outputs(ctx: LoopContext, recipe, snapshot_id: str) -> dict:
    """Fill the kind's cache for a snapshot; the teacher runs only on inputs it has not seen."""
    kind = kinds.for_recipe(recipe)
    return kind.teacher_outputs(ctx.paths, load_teacher(ctx, recipe.kind), load_snapshot(ctx, snapshot_id).texts, recipe)


def teacher_spend(ctx: LoopContext, kind, since: float) -> dict:
    """What the teacher's calls cost since ``since`` (requests, tokens, retries) for a teacher that counts them (an
    API teacher); {} for one that does not."""
    usage = getattr(load_teacher(ctx, kind), "usage_since", None) if ctx.has_teacher else None
    return usage(since) if usage else {}


def round_key(ctx: LoopContext, recipe, snapshot_id: str, champion: Artifact | None, replay: tuple[str, ...]) -> str:
    teacher = load_teacher(ctx, recipe.kind)
    parts = [snapshot_id, teacher.id, recipe.to_dict(), champion.weights_sha256 if champion else None, sorted(replay)]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


@task(name="distill", cache_policy=None)
def distill_round(ctx: LoopContext, recipe, snapshot_id: str, champion: Artifact | None, parent_version: int | None,
                  replay: tuple[str, ...] = ()) -> dict:
    """Distil into ``<home>/<kind's students dir>/<round key>``; a re-run with the same inputs reuses the finished
    artifact (a killed flow does not retrain what it finished)."""
    kind = kinds.for_recipe(recipe)
    key = round_key(ctx, recipe, snapshot_id, champion, replay)
    out = ctx.paths.students(kind.students_dir) / key
    if (out / "kdops.json").exists():
        return {"artifact": str(out), "reused": True, "key": key, "history": []}
    res = kind.run_round(kinds.RoundRequest(
        home=ctx.paths, teacher=load_teacher(ctx, recipe.kind), train_snapshot=snapshot_id, out_dir=out, recipe=recipe,
        champion=champion, parent_version=parent_version, replay_snapshots=tuple(replay), device=ctx.device))
    return {"artifact": str(out), "reused": False, "key": key, "history": res.history, **res.info}


@task(name="evaluate", cache_policy=None)
def evaluate(ctx: LoopContext, recipe, artifact: str, eval_snapshot_id: str, speed: bool = False) -> dict:
    art = Artifact.read(artifact)
    return kinds.get(art.kind).evaluate(ctx.paths, art, load_teacher(ctx, art.kind),
                                        load_snapshot(ctx, eval_snapshot_id).rows, recipe, speed=speed)


@task(name="gate-reference", cache_policy=None)
def gate_reference(ctx: LoopContext, champion, eval_id: str) -> dict | None:
    """The champion's summary the gate compares with, plus each slice's best promoted accuracy on the same
    evaluation snapshot (``kdops.gate.slice_reference``)."""
    if champion is None or champion.report is None:
        return champion.report if champion else None
    from kdops.registry import Registry

    best = Registry(tracking_uri=ctx.uri).best_slices(ctx.model, eval_id)
    return {**champion.report, "best_per_domain": best} if best else champion.report


@task(name="gate", cache_policy=None)
def gate_task(recipe, report: dict, champion_summary: dict | None) -> Decision:
    return kinds.for_recipe(recipe).gate(report, champion_summary, recipe)


@task(name="serving-graphs", cache_policy=None)
def serving_graphs(ctx: LoopContext, artifact: str, eval_snapshot_id: str) -> dict:
    """What a candidate will be served from (a classifier's ONNX graphs, INT8 gated on the evaluation rows); before
    registration, so the registered version carries them."""
    from kdops.onnx_predict import choose_graph

    art = Artifact.read(artifact)
    art = kinds.get(art.kind).prepare_serving(art, load_snapshot(ctx, eval_snapshot_id).rows)
    choice = choose_graph(art)
    return {"runtime": choice.runtime if choice else "torch", "reason": choice.reason if choice else
            (art.extra.get("onnx") or {}).get("skipped", "no ONNX graphs for this kind")}


@task(name="register", retries=3, retry_delay_seconds=[2, 5, 15], cache_policy=None)
def register(ctx: LoopContext, recipe, artifact: str, report: dict, distill_info: dict, snapshot_ids: dict) -> int:
    """A tracking run (recipe, learning curve, report, plots, inputs) and a registry version with lineage."""
    from kdops.registry import Registry, Tracking

    art = Artifact.read(artifact)
    reg = Registry(tracking_uri=ctx.uri)
    for v in reg.versions(ctx.model):  # idempotent across re-runs: the same weights are one version
        if v.get("weights_sha256") == art.weights_sha256:
            return int(v["version"])
    kind = kinds.get(art.kind)
    metrics, figures = kind.tracking(report, distill_info.get("history") or [])
    key = distill_info.get("key", "")
    with Tracking(tracking_uri=ctx.uri).run(f"distill-{key}", tags={"kdops.round_key": key, "kdops.kind": art.kind.value}) as run:
        run.log_params({"recipe": recipe.to_dict(), "reused": distill_info.get("reused")})
        for i, rec in enumerate(distill_info.get("history") or []):
            step = int(rec.get("epoch", rec.get("step", i)))
            run.log_metrics({k: v for k, v in rec.items() if isinstance(v, (int, float)) and k not in ("epoch", "step")}, step=step)
        run.log_eval_report(report)
        metrics = {**metrics, **{f"teacher_{k}": float(v) for k, v in (distill_info.get("teacher_spend") or {}).items()}}
        if metrics:
            run.log_metrics(metrics)
        for context, sid in snapshot_ids.items():
            run.log_snapshot(load_snapshot(ctx, sid), context=context)
        for name, fig in figures.items():
            run.log_figure(fig, name)
        return reg.register(artifact, run.run_id, name=ctx.model, lineage={"snapshot_ids": snapshot_ids})


@task(name="hot-swap", retries=1, retry_delay_seconds=[5], cache_policy=None)
def hot_swap_task(ctx: LoopContext, artifact: str) -> dict:
    from serving.client import ServingClient
    from serving.swap import hot_swap

    client = ServingClient(ctx.triton_url, admin_key=ctx.admin_key, grpc_url=ctx.triton_grpc_url)
    return hot_swap(client, ctx.model, artifact, repo=ctx.repository, cfg=swap_config(ctx)).to_dict()


@task(name="open-review", cache_policy=None)
def open_review(ctx: LoopContext, kind: str, payload: dict, reason: str) -> int:
    from kdops.review import ReviewQueue

    return ReviewQueue(ctx.paths.review_db).add(kind, payload, reason)


@task(name="texts-for-review", cache_policy=None)
def texts_for_review(ctx: LoopContext, window: pd.DataFrame, teacher_sample: dict, label_names) -> list[int]:
    """The window's most informative texts (teacher-student disagreement, then the student's least confident) into
    the review queue, within the daily budget; a person's label comes back as a hard label and into the golden set."""
    import numpy as np

    from kdops.review import ReviewQueue, informative

    probs = list(window["probabilities"])
    if not ctx.review_per_window or not probs or any(len(p) == 0 for p in probs):
        return []  # a generation model's window: nothing to be unsure about
    picks = informative(np.stack(probs), teacher_sample.get("teacher"), teacher_sample.get("index"),
                        ctx.review_per_window, list(label_names or []))
    texts = window["text"].tolist()
    return ReviewQueue(ctx.paths.review_db).add_texts([(texts[i], kind, why) for i, kind, why in picks], ctx.review_per_day)


@task(name="review-labels", cache_policy=None)
def with_review_labels(ctx: LoopContext, train_id: str, eval_id: str) -> tuple[str, str]:
    """Snapshots ``train_id`` + the queue's labelled cases and ``eval_id`` + the golden set (domain ``golden``);
    the ids are unchanged when there is nothing to add. A case labelled outside the snapshot's label set (the
    queue accepts any string from the CLI) is left out and logged, never trained on."""
    from prefect import get_run_logger

    from kdops.review import ReviewQueue

    if not ctx.paths.review_db.exists():
        return train_id, eval_id
    queue, out = ReviewQueue(ctx.paths.review_db), []
    for sid, extra in ((train_id, queue.labelled_cases()), (eval_id, queue.golden_set())):
        snap = load_snapshot(ctx, sid)
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
    """One tracking run per checked window (experiment ``kdops-monitoring``): each test's statistic and p-value
    as metrics, the verdict as tags, and the Evidently HTML report as an artifact. Returns the run id."""
    import math

    from kdops.registry import Tracking

    name = f"monitor-{history_row.get('window_id') or history_row['timestamp']}"
    tags = {"kdops.verdict": history_row["decision"], "kdops.action": history_row["action"],
            "kdops.fired": ",".join(history_row.get("reasons", []))[:500]}
    with Tracking(tracking_uri=ctx.uri).run(name, experiment="kdops-monitoring", tags=tags) as run:
        metrics = {"rows": float(rows)}
        if isinstance(history_row.get("estimated_acc"), float) and math.isfinite(history_row["estimated_acc"]):
            metrics["estimated_acc"] = history_row["estimated_acc"]  # the student's accuracy without labels
        for test, r in history_row.get("tests", {}).items():
            for k in ("statistic", "p_value"):
                v = r.get(k)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    metrics[f"{test}.{k}"] = float(v)
        run.log_metrics(metrics)
        if history_row.get("report") and Path(history_row["report"]).exists():
            run.log_artifact(history_row["report"], "evidently")
        return run.run_id
