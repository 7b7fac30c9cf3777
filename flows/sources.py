"""Scheduled data rounds: ``ingest_tick`` scans the watched directory (deployment ``kdops-ingest``);
``scheduled_round`` turns the queued snapshots into one training snapshot -> ``distill_flow`` (a first round, or the
champion continued with its kind's incremental recipe and replay). The snapshots leave the queue only once the
round finished; a failed round leaves them queued and the champion serving. ``distill_flow`` without a
``train_id`` is this: the ``kdops-distill`` deployment's scheduled runs. The queue itself is ``kdops.sources``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict
from typing import Callable

from prefect import flow, get_run_logger

from flows.tasks import LoopContext
from kdops.data import DataSchema
from kdops.paths import Home
from kdops.recipes import ClassifierRecipe, LMRecipe
from kdops.sources import ROUNDS_KEPT, DataQueue, QueuedSnapshot, RoundRecord, one_line, scan_watch_dir

log = logging.getLogger("kdops.sources")


@flow(name="ingest_tick")
def ingest_tick(ctx: LoopContext, watch_dir: str, data_schema: DataSchema | None = None, labels: list[str] | None = None,
                label_map: dict[str, str] | None = None, settle_s: float = 5.0) -> dict:
    """Scan the watched directory once: new files ingested and queued for the next scheduled round."""
    logger = get_run_logger()
    results = scan_watch_dir(ctx.paths, watch_dir, data_schema or DataSchema(), labels, label_map, settle_s)
    for r in results:
        (logger.warning if r.status == "failed" else logger.info)(r.summary())
    queued = DataQueue.load(ctx.paths).queued
    counts = {s: sum(r.status == s for r in results) for s in ("ingested", "failed", "skipped", "writing")}
    logger.info("%s: %s; %d snapshot(s) (%d rows) queued for the next round", watch_dir,
                ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "nothing new", len(queued), sum(q.rows for q in queued))
    return {**counts, "queued": len(queued), "results": [asdict(r) for r in results]}


# -- the scheduled round ----------------------------------------------------------------------------------

def _training_snapshot(ctx: LoopContext, taken: list[QueuedSnapshot], labels: tuple[str, ...] | None) -> str:
    """The queued snapshots as one training snapshot (rows repeated across files kept once)."""
    import pandas as pd

    from flows.tasks import load_snapshot, save_snapshot

    snaps = [load_snapshot(ctx, q.snapshot) for q in taken]
    labels = labels or next((s.labels for s in snaps if s.labels), None)
    rows = pd.concat([s.rows for s in snaps], ignore_index=True)
    rows = rows.drop_duplicates(subset=["id", "text", "label", "domain"], ignore_index=True)
    if rows["id"].duplicated().any():  # two files used the same ids for different rows: qualify them by snapshot
        rows = pd.concat([s.rows.assign(id=s.id + "/" + s.rows["id"].astype(str)) for s in snaps], ignore_index=True)
    return save_snapshot(ctx, rows, labels)


def _plan(ctx: LoopContext, taken: list[QueuedSnapshot], eval_id: str | None, recipe, incremental_recipe: str | None) -> dict:
    """What the round runs: training snapshot, evaluation snapshot, recipe, champion (freshly evaluated), replay."""
    from flows.monitor import current_champion
    from flows.tasks import evaluate
    from kdops import kinds
    from kdops.artifacts import Artifact, Kind
    from kdops.errors import UserError
    from kdops.recipes import resolve_recipe

    champion = current_champion.fn(ctx)
    art = Artifact.read(champion.artifact) if champion else None
    eval_id = eval_id or (champion.lineage.get("snapshot_ids", {}).get("eval") if champion else None)
    if not eval_id:
        raise UserError("no evaluation data for the scheduled round: set [data] test in kdops.toml (or pass eval_id).")
    replay: list[str] = []
    if champion:
        kind = kinds.get(art.kind)
        recipe = incremental_recipe or kind.incremental_recipe
        champion = dataclasses.replace(champion, report=kind.summary(
            evaluate.fn(ctx, resolve_recipe(recipe), str(art.path), eval_id)))  # gated on the same data as the candidate
        replay = [sid for sid in [champion.lineage.get("snapshot_ids", {}).get("train")] if sid]
    else:
        recipe = recipe or kinds.get(Kind.CLASSIFIER).default_recipe
    labels = tuple(art.label_names) if art is not None and art.label_names else None
    return {"train_id": _training_snapshot(ctx, taken, labels), "eval_id": eval_id, "recipe": recipe,
            "champion": champion, "replay_ids": replay}


def _record(home: Home, record: RoundRecord, drained: tuple[str, ...]) -> None:
    with DataQueue.update(home) as queue:
        queue.queued = [q for q in queue.queued if q.snapshot not in set(drained)]
        queue.rounds = (queue.rounds + [record])[-ROUNDS_KEPT:]


def drain_queue(ctx: LoopContext, run_round: Callable[..., dict], eval_id: str | None = None, recipe=None,
                incremental_recipe: str | None = None, use_review: bool = True, speed: bool = False, deploy: bool = True,
                logger: logging.Logger | logging.LoggerAdapter = log) -> dict:
    """The body of ``scheduled_round`` with the round function passed in (``distill_flow``; a stub in tests)."""
    taken = list(DataQueue.load(ctx.paths).queued)
    if not taken:
        logger.info("no new data queued since the last round; nothing to train")
        return {"action": "empty-queue"}
    ids = tuple(q.snapshot for q in taken)
    t0 = time.time()
    record = RoundRecord(at=t0, status="failed", snapshots=ids, rows=sum(q.rows for q in taken))
    try:
        plan = _plan(ctx, taken, eval_id, recipe, incremental_recipe)
        name = plan["recipe"] if isinstance(plan["recipe"], str) else plan["recipe"].name
        record = dataclasses.replace(record, train_id=plan["train_id"], eval_id=plan["eval_id"], recipe=name)
        champ = plan["champion"]
        logger.info("scheduled round on %d queued snapshot(s) (%d rows) -> %s, recipe %s, %s", len(ids), record.rows,
                    plan["train_id"], name, f"continuing v{champ.version}" if champ else "first round")
        out = run_round(ctx=ctx, use_review=use_review, speed=speed, deploy=deploy and bool(ctx.triton_url), **plan)
    except Exception as e:
        _record(ctx.paths, dataclasses.replace(record, error=one_line(e), seconds=time.time() - t0), drained=())
        logger.error("scheduled round failed (%s); its %d snapshot(s) stay queued", one_line(e), len(ids))
        raise
    decision = (out.get("decision") or {}).get("action")
    _record(ctx.paths, dataclasses.replace(record, status="finished", version=out.get("version"), decision=decision,
                                           seconds=time.time() - t0), drained=ids)
    logger.info("scheduled round: v%s %s; %d snapshot(s) drained from the queue", out.get("version"), decision, len(ids))
    return {"action": "round", "snapshots": list(ids), **out}


@flow(name="scheduled_round")
def scheduled_round(ctx: LoopContext, eval_id: str | None = None, recipe: str | ClassifierRecipe | LMRecipe | None = None,
                    incremental_recipe: str | None = None, use_review: bool = True, speed: bool = False,
                    deploy: bool = True) -> dict:
    """Retrain on the data that arrived since the last round: the queued snapshots -> one ``distill_flow`` round.

    ``eval_id``: evaluation snapshot (default: the one the champion was gated on). ``recipe``: a first round's
    recipe (default: the classifier's); a round that continues the champion uses ``incremental_recipe`` (default:
    its kind's). An empty queue is a no-op."""
    from flows.loop import distill_flow

    return drain_queue(ctx, distill_flow, eval_id, recipe, incremental_recipe, use_review, speed, deploy, get_run_logger())
