"""``monitor_tick``: the flow ``kdops up`` runs on a schedule (and the demo runs per window).

champion (registry) -> its reference profile (built once from its lineage's training texts, cached under
``Home.reference(model, v)``) -> the prediction log since the last check -> ``monitor_flow`` -> on ``retrain``, the served
texts become a snapshot and ``distill_flow`` continues the champion (a run of the ``kdops-distill`` deployment when
it exists); ``review`` opens a case inside ``monitor_flow``. Generic over the task kind: a causal-LM champion is
monitored on its prompts (text checks only) because its kind gives no probabilities or teacher labels.

State kept in ``Home.loop_state(model)``: the champion last seen, the time checked up to, the distill run started last.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
import uuid
from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.tasks import LoopContext, evaluate, save_snapshot
from kdops import kinds
from kdops.artifacts import Artifact
from kdops.paths import atomic_write, read_json
from kdops.registry import Champion

log = logging.getLogger("kdops.monitor")
DISTILL_DEPLOYMENT = "distill_flow/kdops-distill"


# -- state on disk ------------------------------------------------------------------------------------

def read_state(ctx: LoopContext) -> dict:
    return read_json(ctx.paths.loop_state(ctx.model), {})


def write_state(ctx: LoopContext, state: dict) -> None:
    atomic_write(ctx.paths.loop_state(ctx.model), state)  # a killed tick never leaves half a state file


def reference_dir(ctx: LoopContext, version: int) -> Path:
    return ctx.paths.reference(ctx.model, version)


# -- tasks --------------------------------------------------------------------------------------------

@task(name="champion", retries=2, retry_delay_seconds=[2, 5], cache_policy=None)
def current_champion(ctx: LoopContext) -> Champion | None:
    from kdops.registry import Registry

    reg = Registry(tracking_uri=ctx.uri)
    version = reg.champion(ctx.model)
    return reg.champion_info(ctx.model, download_dir=ctx.paths.downloads(ctx.model, version)) if version else None


@task(name="champion-reference", cache_policy=None)
def champion_reference(ctx: LoopContext, champion: Champion, reference_rows: int) -> dict | None:
    """The champion's monitoring reference, built once per version and cached under ``Home.reference(model, v)``: its
    training texts (through its lineage) profiled with what its kind monitors, plus the champion's own
    disagreement with the teacher on them (the baseline of the disagreement check). None without any texts."""
    d = reference_dir(ctx, champion.version)
    if (d / "profile.json").exists() and (d / "monitor.json").exists():
        return read_json(d / "monitor.json")
    from kdops.lineage import lineage_chain, training_texts
    from kdops.registry import Registry
    from monitoring import MonitorConfig, profile_reference

    reg = Registry(tracking_uri=ctx.uri)
    chain = lineage_chain(lambda v: reg.lineage(ctx.model, v), champion.version)
    texts = training_texts(chain, ctx.paths.snapshots, reference_rows)
    if not texts:
        return None
    art = Artifact.read(champion.artifact)
    kind = kinds.get(art.kind)
    teacher = _teacher_or_none(ctx, art.kind)
    inputs = kind.reference(ctx.paths, art, texts, teacher)
    baseline = inputs.pop("baseline_rate", None)
    ref = profile_reference(texts, MonitorConfig(max_reference=max(40, reference_rows)), **inputs)
    meta = {"version": champion.version, "artifact": str(art.path), "rows": len(ref.texts),
            "label_names": list(art.label_names), "baseline_rate": baseline, "kind": art.kind.value}
    tmp = d.with_name(f"{d.name}.partial-{uuid.uuid4().hex[:8]}")
    ref.save(tmp)
    atomic_write(tmp / "monitor.json", meta)
    try:
        tmp.rename(d)
    except OSError:  # another tick built it first; theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    return read_json(d / "monitor.json")


def _teacher_or_none(ctx: LoopContext, kind):
    from flows.tasks import load_teacher

    return load_teacher(ctx, kind) if ctx.has_teacher else None


@task(name="served-texts", cache_policy=None)
def served_window(ctx: LoopContext, since: float, until: float) -> list[str]:
    import pandas as pd

    from kdops.prediction_log import read_predictions

    df = read_predictions(ctx.prediction_log, since=since)
    return df[df["time"] <= pd.Timestamp(until, unit="s", tz="UTC")]["text"].tolist()


def _flow_run_state(run_id: str | None):
    """The state of a flow run, or None when there is no such run (another API, a wiped database)."""
    if not run_id:
        return None
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            return client.read_flow_run(uuid.UUID(run_id)).state
        except Exception:
            return None


def _deployment_exists(name: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
            return True
        except ObjectNotFound:
            return False


@task(name="start-distill", cache_policy=None)
def start_distill(ctx: LoopContext, texts: list[str], champion: Champion, eval_id: str | None, state: dict,
                  recipe: str | None = None) -> dict:
    """Served texts -> a snapshot (unlabelled: the teacher labels them) -> ``distill_flow`` continuing the
    champion with its kind's default recipe, as a run of the ``kdops-distill`` deployment when it exists (the
    monitor returns at once), else in this process. The champion is gated on a fresh evaluation on ``eval_id``."""
    import pandas as pd

    logger = get_run_logger()
    running = _flow_run_state(state.get("distill_run"))
    if running is not None and not running.is_final():
        logger.info("distill run %s is still running; not starting another", state["distill_run"])
        return {"started": False, "reason": "a distill run is in flight", "flow_run": state["distill_run"]}
    eval_id = eval_id or champion.lineage.get("snapshot_ids", {}).get("eval")
    if not eval_id:
        logger.warning("no evaluation snapshot for v%s (pass eval_id to monitor_tick); no distillation", champion.version)
        return {"started": False, "reason": "no evaluation snapshot"}
    art = Artifact.read(champion.artifact)
    kind = kinds.get(art.kind)
    recipe = recipe or kind.incremental_recipe
    rows = pd.DataFrame({"text": list(dict.fromkeys(texts))}).assign(label=None, domain="served")
    train_id = save_snapshot(ctx, rows, art.label_names or None)
    report = kind.summary(evaluate.fn(ctx, _recipe(recipe), str(art.path), eval_id))
    champ = dataclasses.replace(champion, report=report)
    replay = [sid for sid in [champion.lineage.get("snapshot_ids", {}).get("train")] if sid]
    params = {"ctx": ctx, "train_id": train_id, "eval_id": eval_id, "recipe": recipe, "champion": champ,
              "replay_ids": replay}
    if _deployment_exists(DISTILL_DEPLOYMENT):
        from prefect.deployments import run_deployment

        run = run_deployment(DISTILL_DEPLOYMENT, parameters=params, timeout=0)
        logger.info("started %s run %s on snapshot %s (%d texts)", DISTILL_DEPLOYMENT, run.id, train_id, len(rows))
        return {"started": True, "flow_run": str(run.id), "train_id": train_id, "eval_id": eval_id}
    logger.info("no %s deployment; running its flow here on snapshot %s", DISTILL_DEPLOYMENT, train_id)
    from flows.loop import distill_flow

    out = distill_flow(deploy=bool(ctx.triton_url), **params)
    return {"started": True, "flow_run": None, "train_id": train_id, "eval_id": eval_id, "version": out["version"],
            "decision": out["decision"]["action"], "artifact": out["artifact"], "report": out["report"]}


def _recipe(name: str):
    from kdops.recipes import recipe

    return recipe(name)


def _new_champion(ctx: LoopContext, state: dict, version: int, now: float) -> None:
    """A new champion: a fresh trigger, and traffic from here on (older rows were served by the previous one)."""
    from monitoring import reset_trigger

    if state.get("champion") is not None:
        reset_trigger(ctx.paths.monitoring)
        state["last_checked"] = now
        get_run_logger().info("champion changed v%s -> v%s: trigger reset", state["champion"], version)
    state["champion"] = version
    write_state(ctx, state)


# -- the scheduled flow ---------------------------------------------------------------------------------

@flow(name="monitor_tick")
def monitor_tick(ctx: LoopContext, window_s: float = 3600.0, min_rows: int = 200, reference_rows: int = 2000,
                 eval_id: str | None = None, teacher_sample: bool = True, recipe: str | None = None,
                 trigger=None) -> dict:
    """One scheduled check of the served traffic against the registry's champion.

    ``window_s``: look back at most this far; ``min_rows``: wait (keep the window open) until this many
    predictions were served; ``reference_rows``: training texts in the champion's reference profile;
    ``eval_id``: evaluation snapshot for a retrain (default: the one the champion was gated on);
    ``teacher_sample``: run the teacher-disagreement check (needs a teacher: ``ctx.teacher_dir`` or
    ``ctx.teacher_url``); ``recipe``: the retrain round's recipe (default: the champion kind's); ``trigger``: a
    ``monitoring.TriggerConfig``."""
    from flows.loop import monitor_flow
    from monitoring import ReferenceProfile, calibrated_config

    logger, now = get_run_logger(), time.time()
    champion = current_champion(ctx)
    if champion is None:
        logger.info("no champion for %s in the registry; nothing to monitor", ctx.model)
        return {"action": "no-champion"}
    state = read_state(ctx)
    if state.get("champion") != champion.version:
        _new_champion(ctx, state, champion.version, now)
    meta = champion_reference(ctx, champion, reference_rows)
    if meta is None:
        logger.warning("v%s: no training texts found through its lineage; cannot build a reference", champion.version)
        return {"action": "no-reference", "champion": champion.version}
    since = max(float(state.get("last_checked") or 0.0), now - window_s)
    texts = served_window(ctx, since, now)
    if len(texts) < min_rows:
        logger.info("v%s: %d prediction(s) served since %s; waiting for %d", champion.version, len(texts),
                    time.strftime("%H:%M:%S", time.localtime(since)), min_rows)
        return {"action": "waiting", "champion": champion.version, "rows": len(texts)}
    checks_teacher = teacher_sample and ctx.has_teacher and meta.get("baseline_rate") is not None
    res = monitor_flow(ctx, ReferenceProfile.load(reference_dir(ctx, champion.version)), since, now,
                       window_id=time.strftime("tick-%Y%m%dT%H%M%S", time.gmtime(now)),
                       teacher_kind=meta["kind"] if checks_teacher else None,
                       config=calibrated_config(meta.get("baseline_rate")), trigger=trigger, artifact=str(champion.artifact))
    state["last_checked"] = now
    write_state(ctx, state)
    logger.info("v%s: %d row(s) checked: %s -> %s", champion.version, res.get("rows", 0), res.get("decision"), res.get("action"))
    out = {"champion": champion.version, **res}
    if res.get("action") == "retrain":
        out["distill"] = start_distill(ctx, texts, champion, eval_id, state, recipe)
        if out["distill"].get("flow_run"):
            state["distill_run"] = out["distill"]["flow_run"]
            write_state(ctx, state)
    return out
