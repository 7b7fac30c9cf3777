"""``kdops up``: the loop as a long-running service, and ``monitor_tick``, the flow its schedule runs.

One process starts Prefect's API server (or uses ``$PREFECT_API_URL``), points at the MLflow store (the
embedded SQLite file or ``$MLFLOW_TRACKING_URI``), starts tritonserver (or attaches to one), puts the
registry's champion on it, and serves five deployments with ``prefect.serve``:

- ``monitor_tick/kdops-monitor`` on an interval schedule: champion -> its reference profile (built once
  and cached on disk) -> the prediction log since the last check -> ``monitor_flow`` -> on ``retrain``,
  the served texts become a snapshot and ``distill_flow/kdops-distill`` is started (``review`` opens a
  case inside ``monitor_flow``). A causal-LM champion is monitored on its prompts (text checks only) and
  retrained by ``distill_lm_flow/kdops-distill-lm`` on the served prompts, replaying its own training text;
- ``distill_flow/kdops-distill``, ``distill_lm_flow/kdops-distill-lm``, ``promote_flow/kdops-promote`` and
  ``review_flow/kdops-review``, run on demand (from the UI, ``prefect deployment run``, or the monitor).

Scale-out is the same flows from ``prefect.yaml`` on a process work pool (see the README).

State kept under ``<home>/loop``: ``state.json`` (champion last seen, time checked up to, the distill run
started last) and ``reference/v<version>/`` (the champion's saved ``ReferenceProfile`` and the monitor
config calibrated for it). Flow parameters are ids and paths only: Prefect stores them in its API.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.tasks import MODEL, LoopContext, evaluate_student, save_snapshot

log = logging.getLogger("kdops.up")
DISTILL_DEPLOYMENT = "distill_flow/kdops-distill"
DISTILL_LM_DEPLOYMENT = "distill_lm_flow/kdops-distill-lm"


# -- state on disk ------------------------------------------------------------------------------------

def _state_path(ctx: LoopContext) -> Path:
    return Path(ctx.home) / "loop" / "state.json"


def read_state(ctx: LoopContext) -> dict:
    p = _state_path(ctx)
    return json.loads(p.read_text()) if p.exists() else {}


def write_state(ctx: LoopContext, state: dict) -> None:
    p = _state_path(ctx)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(p)  # atomic: a killed tick never leaves half a state file


def reference_dir(ctx: LoopContext, version: int) -> Path:
    return Path(ctx.home) / "loop" / "reference" / f"v{version}"


# -- tasks --------------------------------------------------------------------------------------------

@task(name="champion", retries=2, retry_delay_seconds=[2, 5], cache_policy=None)
def champion_version(ctx: LoopContext) -> int | None:
    from kdops.registry import Registry

    return Registry(tracking_uri=ctx.tracking_uri).champion(ctx.model)


def _champion_artifact(ctx: LoopContext, version: int) -> Path:
    from kdops.registry import Registry

    dst = Path(ctx.home) / "mlflow" / "downloads" / ctx.model / f"v{version}"
    return Registry(tracking_uri=ctx.tracking_uri).download(ctx.model, version, dst=dst)


def _lineage_texts(ctx: LoopContext, version: int, limit: int) -> list[str]:
    """The texts the champion was distilled on: its train snapshot, then its parents' (an incremental round
    trains on new rows plus replay, so what it knows is the union), newest first, ``limit`` at most."""
    from kdops.data import DataError, Snapshot
    from kdops.registry import Registry

    reg, texts, visited, v = Registry(tracking_uri=ctx.tracking_uri), {}, set(), version
    while v is not None and len(texts) < limit and v not in visited:
        visited.add(v)
        lin = reg.lineage(ctx.model, v)
        sid = (lin.get("snapshot_ids") or {}).get("train")
        if sid:
            try:
                snap = Snapshot.load(Path(ctx.home) / "snapshots", sid)
                for t in snap.texts:  # a dict keeps the order and drops repeats
                    if len(texts) >= limit:
                        break
                    texts.setdefault(t, None)
            except DataError:
                log.warning("v%s: train snapshot %s is not in %s/snapshots; skipped", v, sid, ctx.home)
        parent = lin.get("parent_version")
        v = int(parent) if parent not in (None, "", "None") else None
    return list(texts)


@task(name="champion-reference", cache_policy=None)
def champion_reference(ctx: LoopContext, version: int, reference_rows: int) -> dict | None:
    """The champion's monitoring reference, built once per version and cached under
    ``<home>/loop/reference/v<version>/``: its training texts profiled with its own predictions and
    embeddings, plus a monitor config whose disagreement baseline is the champion's own disagreement with the
    teacher on those texts (a fixed baseline would be wrong for most students). None without any texts."""
    d = reference_dir(ctx, version)
    if (d / "profile.json").exists() and (d / "monitor.json").exists():
        return json.loads((d / "monitor.json").read_text())
    from kdops.artifacts import read_meta
    from kdops.predict import Predictor
    from monitoring import MonitorConfig, profile_reference

    texts = _lineage_texts(ctx, version, reference_rows)
    if not texts:
        return None
    artifact = _champion_artifact(ctx, version)
    if read_meta(artifact).kind == "causal-lm":
        # A generation model: the prompts are what is monitored (text checks only; no class probabilities,
        # embeddings or teacher labels to compare)
        ref = profile_reference(texts, MonitorConfig(max_reference=max(40, reference_rows)))
        meta = {"version": version, "artifact": str(artifact), "rows": len(ref.texts), "label_names": [],
                "baseline_rate": None, "kind": "causal-lm"}
        return _save_reference(d, ref, meta)
    p = Predictor.from_dir(artifact)
    probs = p.predict_proba(texts)
    baseline = None
    if ctx.teacher_dir:
        from kdops.soft_labels import SoftLabelCache
        from kdops.teacher import HFTeacher

        teacher_logits = SoftLabelCache(Path(ctx.home) / "soft_labels.sqlite").get_or_compute(HFTeacher(ctx.teacher_dir), texts)
        baseline = float((probs.argmax(-1) != teacher_logits.argmax(-1)).mean())
    ref = profile_reference(texts, MonitorConfig(max_reference=max(40, reference_rows)), probabilities=probs,
                            embeddings=p.embed(texts), label_names=p.label_names)
    meta = {"version": version, "artifact": str(artifact), "rows": len(ref.texts), "label_names": list(p.label_names),
            "baseline_rate": baseline, "kind": "classifier"}
    return _save_reference(d, ref, meta)


def _save_reference(d: Path, ref, meta: dict) -> dict:
    tmp = d.with_name(f"{d.name}.partial-{uuid.uuid4().hex[:8]}")
    ref.save(tmp)
    (tmp / "monitor.json").write_text(json.dumps(meta, indent=2))
    try:
        tmp.rename(d)
    except OSError:  # another tick built it first; theirs is as good
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return json.loads((d / "monitor.json").read_text())


def _monitor_config(meta: dict):
    from monitoring import DisagreementCheck, MonitorConfig

    if meta.get("baseline_rate") is None:
        return MonitorConfig()
    # The teacher re-labels the whole window: a sample of 5 % cannot reach the split alpha (see flows/demo.py).
    return MonitorConfig(disagreement=DisagreementCheck(sample_share=1.0, baseline_rate=min(0.5, meta["baseline_rate"]),
                                                        tolerance=0.03))


@task(name="served-texts", cache_policy=None)
def served_window(ctx: LoopContext, since: float, until: float) -> list[str]:
    from kdops.prediction_log import read_predictions

    import pandas as pd

    df = read_predictions(ctx.prediction_log, since=since)
    return df[df["time"] <= pd.Timestamp(until, unit="s", tz="UTC")]["text"].tolist()


def _eval_snapshot(ctx: LoopContext, version: int) -> str | None:
    """The evaluation snapshot the champion was gated on (its run's ``kdops.snapshot.eval`` tag)."""
    from kdops.registry import Registry

    reg = Registry(tracking_uri=ctx.tracking_uri)
    run = reg.get_run(reg.model_version(ctx.model, version).run_id)
    return run.data.tags.get("kdops.snapshot.eval")


def _deployment_exists(name: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
            return True
        except ObjectNotFound:
            return False


def _run_in_flight(run_id: str | None) -> bool:
    if not run_id:
        return False
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            state = client.read_flow_run(uuid.UUID(run_id)).state
        except Exception:  # gone (another API, a wiped database): not in flight
            return False
    return state is not None and not state.is_final()


@task(name="start-distill", cache_policy=None)
def start_distill(ctx: LoopContext, texts: list[str], version: int, artifact: str, label_names: list[str],
                  eval_id: str | None, state: dict) -> dict:
    """Served texts -> a snapshot (unlabelled: the teacher labels them) -> ``distill_flow``, as a run of the
    ``kdops-distill`` deployment when it exists (the monitor returns at once), else in this process."""
    import pandas as pd

    from kdops.artifacts import read_meta

    logger = get_run_logger()
    if _run_in_flight(state.get("distill_run")):
        logger.info("distill run %s is still running; not starting another", state["distill_run"])
        return {"started": False, "reason": "a distill run is in flight", "flow_run": state["distill_run"]}
    eval_id = eval_id or _eval_snapshot(ctx, version)
    if not eval_id:
        logger.warning("no evaluation snapshot for v%s (pass eval_id to monitor_tick); no distillation", version)
        return {"started": False, "reason": "no evaluation snapshot"}
    rows = pd.DataFrame({"text": list(dict.fromkeys(texts))}).assign(label=None, domain="served")
    train_id = save_snapshot(ctx, rows, tuple(label_names))
    lm = read_meta(artifact).kind == "causal-lm"
    if lm:
        # An LM round: the served prompts are new text for the teacher's top-k; the champion's own training
        # snapshot is replayed; the gate compares per-domain perplexity with the champion's on eval_id.
        from flows.lm import lm_evaluate, short_lm_report
        from kdops.registry import Registry

        lineage = Registry(tracking_uri=ctx.tracking_uri).lineage(ctx.model, version)
        max_length = int(lineage.get("max_length") or 48)
        report = short_lm_report(lm_evaluate.fn(ctx, artifact, eval_id, max_length)["summary"])
        replay = [sid for sid in [(lineage.get("snapshot_ids") or {}).get("train")] if sid]
        params = {"ctx": dataclasses.asdict(ctx), "train_id": train_id, "eval_id": eval_id, "max_length": max_length,
                  "champion": {"version": version, "artifact": artifact, "report": report}, "replay_ids": replay}
    else:
        champion = {"version": version, "artifact": artifact, "report": evaluate_student.fn(ctx, artifact, eval_id)}
        params = {"ctx": dataclasses.asdict(ctx), "train_id": train_id, "eval_id": eval_id, "champion": champion}
    deployment = DISTILL_LM_DEPLOYMENT if lm else DISTILL_DEPLOYMENT
    if _deployment_exists(deployment):
        from prefect.deployments import run_deployment

        run = run_deployment(deployment, parameters=params, timeout=0)
        logger.info("started %s run %s on snapshot %s (%d texts)", deployment, run.id, train_id, len(rows))
        return {"started": True, "flow_run": str(run.id), "train_id": train_id, "eval_id": eval_id}
    logger.info("no %s deployment; running its flow here on snapshot %s", deployment, train_id)
    if lm:
        from flows.lm import distill_lm_flow

        params.pop("ctx")
        out = distill_lm_flow(ctx, deploy=bool(ctx.triton_url), **params)
    else:
        from flows.loop import distill_flow

        out = distill_flow(ctx, train_id, eval_id, champion=params["champion"], deploy=bool(ctx.triton_url))
    return {"started": True, "flow_run": None, "train_id": train_id, "eval_id": eval_id,
            "version": out["version"], "decision": out["decision"]["action"]}


# -- the scheduled flow ---------------------------------------------------------------------------------

@flow(name="monitor_tick")
def monitor_tick(ctx: LoopContext, window_s: float = 3600.0, min_rows: int = 200, reference_rows: int = 2000,
                 eval_id: str | None = None, teacher_sample: bool = True) -> dict:
    """One scheduled check of the served traffic against the registry's champion.

    ``window_s``: look back at most this far; ``min_rows``: wait (keep the window open) until this many
    predictions were served; ``reference_rows``: training texts in the champion's reference profile;
    ``eval_id``: evaluation snapshot for a retrain (default: the one the champion was gated on);
    ``teacher_sample``: run the teacher-disagreement check (needs ``ctx.teacher_dir``)."""
    from flows.loop import monitor_flow
    from monitoring import ReferenceProfile

    logger = get_run_logger()
    now = time.time()
    version = champion_version(ctx)
    if version is None:
        logger.info("no champion for %s in the registry; nothing to monitor", ctx.model)
        return {"action": "no-champion"}
    state = read_state(ctx)
    if state.get("champion") != version:
        if state.get("champion") is not None:
            # A new champion: a fresh trigger (hysteresis counted against the old one means nothing now), and
            # traffic from here on (older rows were served by the previous model).
            (Path(ctx.home) / "monitoring" / "trigger.json").unlink(missing_ok=True)
            state["last_checked"] = now
            logger.info("champion changed v%s -> v%s: trigger reset", state["champion"], version)
        state["champion"] = version
        write_state(ctx, state)
    meta = champion_reference(ctx, version, reference_rows)
    if meta is None:
        logger.warning("v%s: no training texts found through its lineage; cannot build a reference", version)
        return {"action": "no-reference", "champion": version}
    since = max(float(state.get("last_checked") or 0.0), now - window_s)
    texts = served_window(ctx, since, now)
    if len(texts) < min_rows:
        logger.info("v%s: %d prediction(s) served since %s; waiting for %d", version, len(texts),
                    time.strftime("%H:%M:%S", time.localtime(since)), min_rows)
        return {"action": "waiting", "champion": version, "rows": len(texts)}
    reference = ReferenceProfile.load(reference_dir(ctx, version))
    classifier = meta.get("kind", "classifier") == "classifier"  # an LM's teacher labels nothing to disagree with
    res = monitor_flow(ctx, reference, since, now, window_id=time.strftime("tick-%Y%m%dT%H%M%S", time.gmtime(now)),
                       teacher_sample=teacher_sample and classifier and bool(ctx.teacher_dir),
                       config=_monitor_config(meta))
    state["last_checked"] = now
    write_state(ctx, state)
    logger.info("v%s: %d row(s) checked: %s -> %s", version, res.get("rows", 0), res.get("decision"), res.get("action"))
    out = {"champion": version, **res}
    if res.get("action") == "retrain":
        out["distill"] = start_distill(ctx, texts, version, meta["artifact"], meta["label_names"], eval_id, state)
        if out["distill"].get("flow_run"):
            state["distill_run"] = out["distill"]["flow_run"]
            write_state(ctx, state)
    elif res.get("action") == "review":
        logger.info("review case %s opened", res.get("review_id"))
    return out


# -- the service ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UpConfig:
    """What ``kdops up`` starts and how often it checks."""

    home: str = field(metadata={"help": "kdops data directory (snapshots, registry store, Prefect database, logs)."})
    teacher_dir: str = field(default="", metadata={"help": "Teacher directory; empty: no teacher-disagreement check."})
    interval_s: float = field(default=300.0, metadata={"help": "Seconds between monitor_tick runs."})
    window_s: float = field(default=3600.0, metadata={"help": "A tick looks back at most this many seconds."})
    min_rows: int = field(default=200, metadata={"help": "A tick checks a window once it holds this many predictions."})
    triton_url: str = field(default="", metadata={"help": "Attach to this Triton (HTTP host:port); empty: start tritonserver."})
    triton_grpc_url: str = field(default="", metadata={"help": "gRPC host:port of the attached Triton."})
    triton_key: str = field(default="", metadata={"help": "Model-control key of the attached Triton."})
    repository: str = field(default="", metadata={"help": "Triton model repository as seen from here; empty: <home>/triton-repo."})
    model: str = field(default=MODEL, metadata={"help": "Registered and served model name."})
    for_seconds: float | None = field(default=None, metadata={"help": "Stop after this many seconds; None: until a signal."})

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.window_s <= 0 or self.min_rows < 1:
            raise ValueError("interval_s and window_s must be positive and min_rows at least 1.")
        if self.triton_url and not (self.repository and self.triton_key):
            raise ValueError("an attached Triton needs its model repository (as seen from here) and its admin key.")
        if self.for_seconds is not None and self.for_seconds <= 0:
            raise ValueError("for_seconds must be positive.")


def build_deployments(ctx: LoopContext, cfg: UpConfig, label_names: list[str] | None) -> list:
    """The served deployments. Default parameters hold ids and paths (the context), nothing large."""
    from datetime import timedelta

    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.types.entrypoint import EntrypointType

    from flows.lm import distill_lm_flow
    from flows.loop import distill_flow, promote_flow
    from flows.review import review_flow

    c = dataclasses.asdict(ctx)
    # Module entrypoints: a run imports flows.up etc. from the installed package, whatever its working directory.
    common = {"entrypoint_type": EntrypointType.MODULE_PATH, "tags": ["kdops"]}
    review_params = {"ctx": c, **({"label_names": label_names} if label_names else {})}
    return [
        # A tick that finds the previous one still running is dropped, not queued behind it.
        monitor_tick.to_deployment("kdops-monitor", interval=timedelta(seconds=cfg.interval_s),
                                   parameters={"ctx": c, "window_s": cfg.window_s, "min_rows": cfg.min_rows},
                                   concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
                                   description="Check served traffic against the champion; retrain or open a review.", **common),
        # One distillation at a time: rounds queue rather than share the CPU.
        distill_flow.to_deployment("kdops-distill", parameters={"ctx": c}, concurrency_limit=1,
                                   description="One incremental distillation round -> gate -> register -> promote | review.", **common),
        distill_lm_flow.to_deployment("kdops-distill-lm", parameters={"ctx": c}, concurrency_limit=1,
                                      description="One causal-LM distillation round (teacher top-k, replay) -> gate -> register -> promote.",
                                      **common),
        promote_flow.to_deployment("kdops-promote", parameters={"ctx": c},
                                   description="Hot swap on Triton and move the champion alias (a transaction).", **common),
        review_flow.to_deployment("kdops-review", parameters=review_params,
                                  description="Work the review queue from the Prefect UI (pauses for a form).", **common),
    ]


class _Stop(Exception):
    """Raised in the main thread by our SIGTERM handler before the Prefect runner installs its own."""


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def run_up(cfg: UpConfig, echo=print) -> None:
    """Start everything, serve the deployments until a signal or ``cfg.for_seconds``, then stop it all."""
    from contextlib import ExitStack

    from prefect import serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.services import PrefectServer
    from kdops.registry import Registry
    from serving.server import ServerConfig, TritonServer

    home = Path(cfg.home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    # Flow runs are child processes of the runner: they find the same data directory through the environment.
    os.environ["KDOPS_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    repo = Path(cfg.repository or home / "triton-repo").resolve()
    plog = home / "predictions"
    if not os.environ.get("PREFECT_API_URL"):
        _check_scheduler_deps(echo)
    previous_term = signal.signal(signal.SIGTERM, _raise_stop)  # a SIGTERM during start-up still cleans up
    try:
        with ExitStack() as stack:
            prefect = stack.enter_context(PrefectServer(home))
            stack.enter_context(temporary_settings({PREFECT_API_URL: prefect.url}))
            triton = stack.enter_context(TritonServer(ServerConfig(
                repository=str(repo), url=cfg.triton_url, grpc_url=cfg.triton_grpc_url, admin_key=cfg.triton_key,
                log_file=str(home / "triton" / "tritonserver.log") if not cfg.triton_url else "")))
            # The admin key reaches the served runs (child processes) through the environment, not through
            # deployment parameters, which the Prefect API and UI show to anyone who can read them.
            os.environ["KDOPS_TRITON_ADMIN_KEY"] = triton.admin_key
            ctx = LoopContext(home=str(home), teacher_dir=cfg.teacher_dir, tracking_uri=tracking_uri, triton_url=triton.url,
                              triton_grpc_url=triton.grpc_url, triton_key="", repository=str(repo),
                              model=cfg.model, prediction_log=str(plog))
            version = Registry(tracking_uri=tracking_uri).champion(cfg.model)
            label_names = _deploy_champion(ctx, triton, version, echo) if version is not None else None
            ui = prefect.url.removesuffix("/api")
            echo(f"Prefect API: {prefect.url}")
            echo(f"Prefect UI: {ui}{'' if prefect.external else ' (embedded, database ' + str(home / 'prefect') + ')'}")
            echo(f"MLflow store: {tracking_uri}  (browse: kdops registry ui)")
            echo(f"Triton: http://{triton.url} (gRPC {triton.grpc_url}){' attached' if cfg.triton_url else ''}; "
                 f"model {cfg.model}: {'v' + str(version) if version is not None else 'no champion yet'}")
            echo(f"Prediction log: {plog}; loop state: {home / 'loop'}")
            deployments = build_deployments(ctx, cfg, label_names)
            timer = None
            if cfg.for_seconds:
                # SIGINT is what Ctrl-C sends: prefect.serve handles it by shutting the runner down and returning.
                timer = threading.Timer(cfg.for_seconds, os.kill, (os.getpid(), signal.SIGINT))
                timer.daemon = True
                timer.start()
            try:
                serve(*deployments, print_starting_message=True)
            finally:
                if timer is not None:
                    timer.cancel()
                # Already stopping: a further SIGTERM must not cut the servers' shutdown short (the runner's
                # handler, still installed, would try to stop a runner that has stopped).
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                echo("kdops up: stopping")
    except (_Stop, KeyboardInterrupt, SystemExit) as e:
        # SystemExit: the Prefect runner's own SIGTERM handler stops it and exits; the servers are already
        # stopped by the ExitStack when this runs.
        log.info("kdops up stopped (%s)", type(e).__name__)
    finally:
        signal.signal(signal.SIGTERM, previous_term)
    echo("kdops up: stopped")


def _check_scheduler_deps(echo) -> None:
    """Prefect 3.8's scheduler inserts runs in bulk through an ORM hybrid property that SQLAlchemy 2.1 refuses
    (``InvalidRequestError: Can't evaluate bulk DML statement``, in the server log only): every schedule would
    silently never fire. Say so where the operator looks."""
    from importlib.metadata import version

    v = version("sqlalchemy")
    if tuple(int(x) for x in v.split(".")[:2]) >= (2, 1):
        echo(f"WARNING: SQLAlchemy {v} breaks the embedded Prefect server's scheduler (no scheduled run is ever "
             "created; deployments still run on demand). Install sqlalchemy<2.1.")


def _deploy_champion(ctx: LoopContext, triton, version: int, echo) -> list[str] | None:
    """Serve the registry's champion on Triton unless the attached server already serves its weights."""
    from kdops.artifacts import read_meta
    from serving.export import ExportConfig
    from serving.swap import SwapConfig, deploy, read_state

    artifact = _champion_artifact(ctx, version)
    meta = read_meta(artifact)
    history = read_state(ctx.repository, ctx.model)["history"]
    if ctx.triton_url and history and triton.cfg.url:
        try:
            if read_meta(history[-1]["artifact"]).weights_sha256 == meta.weights_sha256:
                echo(f"Triton already serves v{version} ({history[-1]['label']})")
                return list(meta.label_names)
        except Exception:  # the served artifact is gone or unreadable: deploy again
            pass
    res = deploy(triton, ctx.model, artifact, ctx.repository,
                 SwapConfig(export=ExportConfig(prediction_log_dir=ctx.prediction_log, torch_threads=1)))
    echo(f"deployed champion v{version} as {res.label} ({res.timings_s.get('total', 0):.1f} s)")
    return list(meta.label_names)
