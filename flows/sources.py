"""New data and schedules: a watched directory feeds a queue of snapshots; scheduled rounds drain it.

- ``scan_watch_dir``: each new CSV / JSONL / Parquet file under the watched directory is ingested once (validated,
  bad rows quarantined, snapshotted) and its snapshot queued. A file is known by its content (SHA-256): re-saved
  unchanged or copied elsewhere it is not ingested again. A file that is entirely bad is recorded as failed with its
  reason and not retried until its content changes. Files still being written (modified in the last ``settle_s``
  seconds, dotfiles, ``*.partial`` / ``*.tmp``) wait for the next scan.
- ``ingest_tick``: the scan as a flow (deployment ``kdops-ingest``, on the monitor's interval).
- ``scheduled_round``: the queued snapshots as one training snapshot -> ``distill_flow`` (a first round, or the
  champion continued with its kind's incremental recipe and replay). The snapshots leave the queue only once the
  round finished; a failed round leaves them queued and the champion serving. ``distill_flow`` without a
  ``train_id`` is this: the ``kdops-distill`` deployment's scheduled runs.
- ``status`` / ``status_command`` (``kdops status``): the champion, the next scheduled runs, the queue, the last round.

State: ``Home.sources / "queue.json"`` (a ``DataQueue``), read-modified-written under ``queue.lock``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import typer
from prefect import flow, get_run_logger

from flows.tasks import MODEL, LoopContext
from kdops.data import DataSchema
from kdops.paths import Home, atomic_write, read_json
from kdops.recipes import ClassifierRecipe, LMRecipe

log = logging.getLogger("kdops.sources")

SUFFIXES = frozenset({".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".parquet", ".pq"})
IN_PROGRESS = (".partial", ".tmp", ".part", ".crdownload", ".swp", "~")  # names writers use before the final rename
ROUNDS_KEPT = 50


# -- the queue on disk ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class QueuedSnapshot:
    """One ingested file waiting for the next scheduled round."""

    snapshot: str
    rows: int
    quarantined: int
    source: str
    sha256: str
    at: float


@dataclass(frozen=True)
class SeenFile:
    """A watched path as last scanned: size and mtime spare re-hashing an unchanged file."""

    size: int
    mtime_ns: int
    sha256: str


@dataclass(frozen=True)
class Content:
    """What became of one file content (by SHA-256), under whichever path it arrived."""

    status: str  # "ingested" | "failed"
    source: str
    at: float
    snapshot: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class RoundRecord:
    """One scheduled round: when, on which snapshots, and what came of it."""

    at: float
    status: str  # "finished" | "failed"
    snapshots: tuple[str, ...]
    rows: int
    train_id: str | None = None
    eval_id: str | None = None
    recipe: str | None = None
    version: int | None = None
    decision: str | None = None
    seconds: float | None = None
    error: str | None = None


@dataclass
class DataQueue:
    """The watched files seen, the snapshots queued in arrival order, and the scheduled rounds run (last 50)."""

    files: dict[str, SeenFile] = field(default_factory=dict)
    contents: dict[str, Content] = field(default_factory=dict)
    queued: list[QueuedSnapshot] = field(default_factory=list)
    rounds: list[RoundRecord] = field(default_factory=list)

    @property
    def last_round(self) -> RoundRecord | None:
        return self.rounds[-1] if self.rounds else None

    @staticmethod
    def file(home: Home) -> Path:
        return home.sources / "queue.json"

    @classmethod
    def load(cls, home: Home) -> "DataQueue":
        d = read_json(cls.file(home), {})
        return cls(files={p: SeenFile(**v) for p, v in d.get("files", {}).items()},
                   contents={h: Content(**v) for h, v in d.get("contents", {}).items()},
                   queued=[QueuedSnapshot(**q) for q in d.get("queued", [])],
                   rounds=[RoundRecord(**{**r, "snapshots": tuple(r["snapshots"])}) for r in d.get("rounds", [])])

    def save(self, home: Home) -> None:
        atomic_write(self.file(home), asdict(self))

    @classmethod
    @contextmanager
    def update(cls, home: Home) -> Iterator["DataQueue"]:
        """Load, change, save under an exclusive lock: a scan and a draining round never lose each other's
        changes. Nothing is saved if the block raises."""
        home.sources.mkdir(parents=True, exist_ok=True)
        with open(home.sources / "queue.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                queue = cls.load(home)
                yield queue
                queue.save(home)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


# -- scanning the watched directory ---------------------------------------------------------------------

@dataclass(frozen=True)
class ScanResult:
    """What one scan did with one file."""

    path: str
    status: str  # "ingested" | "failed" | "skipped" (content seen before) | "writing" (wait for the next scan)
    snapshot: str | None = None
    rows: int = 0
    quarantined: int = 0
    reason: str | None = None
    quarantine_path: str | None = None

    def summary(self) -> str:
        if self.status == "ingested":
            q = f", quarantined {self.quarantined} ({self.quarantine_path})" if self.quarantined else ""
            return f"{self.path}: queued snapshot {self.snapshot} ({self.rows} rows{q})"
        return f"{self.path}: {self.status}" + (f" ({self.reason})" if self.reason else "")


def _candidates(watch: Path) -> list[Path]:
    """Data files under ``watch`` in arrival order (mtime, then name); hidden and in-progress names left out."""
    out = []
    for p in watch.rglob("*"):
        rel = p.relative_to(watch).parts
        if any(part.startswith(".") for part in rel) or p.name.lower().endswith(IN_PROGRESS):
            continue
        if p.suffix.lower() in SUFFIXES and p.is_file():
            out.append(p)
    return sorted(out, key=lambda p: (_mtime(p), str(p)))


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _one_line(e: BaseException) -> str:
    from kdops.errors import UserError

    text = (str(e).strip().splitlines() or [""])[0]
    return text if isinstance(e, UserError) and text else f"{type(e).__name__}: {text}"


def _with_label_set(schema: DataSchema, labels, label_map) -> DataSchema:
    """Rows whose label is neither the teacher's nor mapped onto one are quarantined row by row."""
    if not labels or schema.labels is not None:
        return schema
    extra = tuple(k for k in (label_map or {}) if k not in labels)
    return dataclasses.replace(schema, labels=tuple(labels) + extra)


def _ingest_one(home: Home, path: Path, schema: DataSchema, labels, label_map) -> ScanResult:
    from kdops.data import from_rows, ingest
    from kdops.labels import align_labels

    try:
        snap, report = ingest(path, schema, home.root)
        if labels:  # the snapshot speaks the teacher's labels, whatever the file called them
            snap = from_rows(align_labels(snap.rows, labels, label_map, source=str(path)), tuple(labels))
            snap.save(home.snapshots)
    except Exception as e:  # DataError, LabelMismatch, a corrupt Parquet...: recorded, and the scan goes on
        return ScanResult(str(path), "failed", reason=_one_line(e))
    return ScanResult(str(path), "ingested", snap.id, len(snap), report.quarantined, quarantine_path=report.quarantine_path)


def scan_watch_dir(home: Home, watch_dir: str | Path, schema: DataSchema, labels: list[str] | tuple[str, ...] | None = None,
                   label_map: dict[str, str] | None = None, settle_s: float = 5.0) -> list[ScanResult]:
    """Ingest each new file under ``watch_dir`` once and queue its snapshot; returns what was done per file
    (files unchanged since an earlier scan are not listed). ``labels``: the teacher's label set, with
    ``label_map`` sending the data's names onto it (rows with other labels are quarantined)."""
    watch = Path(watch_dir).expanduser().resolve()
    if not watch.is_dir():
        log.warning("watched directory %s does not exist (yet); nothing to ingest", watch)
        return []
    schema = _with_label_set(schema, labels, label_map)
    results: list[ScanResult] = []
    with DataQueue.update(home) as queue:
        known_snapshots = {c.snapshot: c.source for c in queue.contents.values() if c.snapshot}
        for path in _candidates(watch):
            key = str(path)
            try:
                st = path.stat()
                if time.time() - st.st_mtime < settle_s:
                    results.append(ScanResult(key, "writing", reason=f"modified less than {settle_s:g} s ago"))
                    continue
                seen = queue.files.get(key)
                if seen and (seen.size, seen.mtime_ns) == (st.st_size, st.st_mtime_ns):
                    continue
                sha = _sha256(path)
            except OSError as e:  # vanished or unreadable between listing and reading: the next scan tries again
                log.warning("%s: %s; trying again next scan", key, e)
                continue
            queue.files[key] = SeenFile(st.st_size, st.st_mtime_ns, sha)
            if sha in queue.contents:
                if seen is None or seen.sha256 != sha:
                    c = queue.contents[sha]
                    results.append(ScanResult(key, "skipped", c.snapshot, reason=f"same content as {c.source} ({c.status})"))
                continue
            res = _ingest_one(home, path, schema, labels, label_map)
            now = time.time()
            if res.status == "ingested" and res.snapshot in known_snapshots:
                res = dataclasses.replace(res, status="skipped", reason=f"same rows as {known_snapshots[res.snapshot]}")
                queue.contents[sha] = Content("ingested", key, now, res.snapshot)
            elif res.status == "ingested":
                queue.contents[sha] = Content("ingested", key, now, res.snapshot)
                queue.queued.append(QueuedSnapshot(res.snapshot, res.rows, res.quarantined, key, sha, now))
                known_snapshots[res.snapshot] = key
            else:
                queue.contents[sha] = Content("failed", key, now, reason=res.reason)
            results.append(res)
    return results


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
        _record(ctx.paths, dataclasses.replace(record, error=_one_line(e), seconds=time.time() - t0), drained=())
        logger.error("scheduled round failed (%s); its %d snapshot(s) stay queued", _one_line(e), len(ids))
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


# -- status ---------------------------------------------------------------------------------------------

def _iso(t: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t)) if t else None


def _api_url(home: Home, api_url: str | None) -> str | None:
    """The Prefect API to ask: given, else the one this home's ``kdops up`` announced, else Prefect's setting."""
    if api_url:
        return api_url
    announced = read_json(home.service, {}) or {}
    if announced.get("prefect_api"):
        return announced["prefect_api"]
    from prefect.settings import PREFECT_API_URL

    return os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value() or None


def _reachable(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=3) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def _describe(schedule) -> str:
    if getattr(schedule, "interval", None) is not None:
        return f"every {schedule.interval.total_seconds():g} s"
    if getattr(schedule, "cron", None):
        return f"cron {schedule.cron} ({schedule.timezone or 'UTC'})"
    return f"rrule {getattr(schedule, 'rrule', '?')}"


def schedules(api_url: str) -> list[dict]:
    """Each kdops deployment with an active schedule, and the expected start of its next scheduled run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterTags, FlowRunFilter,
                                                FlowRunFilterDeploymentId, FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import DeploymentSort, FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    out = []
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        flows: dict = {}
        deps = client.read_deployments(deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=["kdops"])),
                                       sort=DeploymentSort.NAME_ASC, limit=200)
        for d in deps:
            active = [s for s in d.schedules if s.active]
            if not active:
                continue
            if d.flow_id not in flows:
                flows[d.flow_id] = client.read_flow(d.flow_id).name
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[d.id]),
                                              state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=1)
            start = runs[0].expected_start_time if runs else None
            out.append({"deployment": f"{flows[d.flow_id]}/{d.name}", "schedule": "; ".join(_describe(s.schedule) for s in active),
                        "paused": bool(d.paused), "next_run": _iso(start.timestamp()) if start else None,
                        "next_run_in_s": round(start.timestamp() - time.time(), 1) if start else None})
    return out


def _champion(home: Home, model: str, tracking_uri: str | None) -> dict:
    uri = tracking_uri or home.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return {"version": None, "note": "no registry yet"}  # not created just to say so
    try:
        from kdops.registry import Registry

        reg = Registry(tracking_uri=uri)
        version, challenger = reg.champion(model), reg.challenger(model)
        lineage = reg.lineage(model, version) if version else {}
    except Exception as e:  # an unreachable store must not hide the rest of the status
        return {"version": None, "error": _one_line(e)}
    return {"version": version, "challenger": challenger, "snapshots": lineage.get("snapshot_ids"),
            "parent_version": lineage.get("parent_version")}


def status(home: Home, model: str = MODEL, api_url: str | None = None, tracking_uri: str | None = None) -> dict:
    """The served champion, ``kdops up`` and its next scheduled runs, the queued snapshots, the failed files and the
    last scheduled round, as one JSON-ready dict. Without a reachable Prefect API the schedules are None."""
    queue = DataQueue.load(home)
    url = _api_url(home, api_url)
    service: dict = {"running": False, "prefect_api": url}
    sched = None
    if url and _reachable(url):
        try:
            sched, service["running"] = schedules(url), True
        except Exception as e:  # an API that answers /health but not queries: say so, show the rest
            service["error"] = _one_line(e)[:300]
    announced = read_json(home.service, {}) or {}
    service.update({k: announced[k] for k in ("pid", "started", "watch", "triton") if k in announced})
    failed = [{"path": c.source, "reason": c.reason, "at": _iso(c.at)} for c in queue.contents.values() if c.status == "failed"]
    last = queue.last_round
    return {"home": str(home), "model": model, "champion": _champion(home, model, tracking_uri), "service": service,
            "schedules": sched,
            "queue": [{**asdict(q), "at": _iso(q.at)} for q in queue.queued],
            "failed_files": failed,
            "last_round": {**asdict(last), "snapshots": list(last.snapshots), "at": _iso(last.at)} if last else None}


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = abs(seconds)
    span = f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"
    return f"in {span}" if seconds >= 0 else f"{span} late"


def format_status(st: dict) -> list[str]:
    """``status()`` as the lines ``kdops status`` prints."""
    c = st["champion"]
    lines = [f"home: {st['home']}"]
    if c.get("version") is not None:
        lines.append(f"champion: {st['model']} v{c['version']}" + (f" (challenger v{c['challenger']})" if c.get("challenger") else ""))
    else:
        lines.append(f"champion: {st['model']}: none yet" + (f" ({c.get('error') or c.get('note')})" if c.get("error") or c.get("note") else ""))
    svc = st["service"]
    if not svc["running"]:
        why = f" ({svc['error']})" if svc.get("error") else ""
        lines.append(f"kdops up is not running{why}: no scheduled runs" + (f" (Prefect API {svc['prefect_api']} does not answer)" if svc.get("prefect_api") and not why else ""))
    else:
        lines.append(f"kdops up: running (Prefect API {svc['prefect_api']})" + (f", watching {svc['watch']}" if svc.get("watch") else ""))
        if not st["schedules"]:
            lines.append("  no deployment has a schedule")
        for s in st["schedules"] or []:
            nxt = f"next run {s['next_run']} ({_ago(s['next_run_in_s'])})" if s["next_run"] else "no run scheduled yet"
            lines.append(f"  {s['deployment']}: {s['schedule']}{' (paused)' if s['paused'] else ''}; {nxt}")
    q = st["queue"]
    lines.append(f"queued for the next round: {len(q)} snapshot(s), {sum(x['rows'] for x in q)} rows" if q else
                 "queued for the next round: nothing")
    for x in q:
        lines.append(f"  {x['snapshot']}  {x['rows']} rows  {x['source']}  ({x['at']})")
    for f in st["failed_files"]:
        lines.append(f"  failed: {f['path']}: {f['reason']}")
    r = st["last_round"]
    if r is None:
        lines.append("last scheduled round: none yet")
    elif r["status"] == "finished":
        lines.append(f"last scheduled round: {r['at']}, {len(r['snapshots'])} snapshot(s), {r['rows']} rows -> "
                     f"v{r['version']} {r['decision']} ({r['recipe']}, {r['seconds']:.0f} s)")
    else:
        lines.append(f"last scheduled round: {r['at']} FAILED: {r['error']} ({len(r['snapshots'])} snapshot(s) kept queued)")
    return lines


def status_command(
    ctx: typer.Context,
    model: str = typer.Option(None, "--model", help="Registered and served model name (default: [serve] model in kdops.toml)."),
    json_out: str = typer.Option(None, "--json", help="Write the status as JSON to this file ('-': standard output)."),
) -> None:
    """The served champion, the next scheduled runs (while `kdops up` runs), the queued snapshots and the last round."""
    from kdops.cli_common import fail, session
    from kdops.errors import UserError

    try:
        model = model or session(ctx).project.serve.model
    except UserError as e:
        fail(e)
    st = status(Home.from_env(), model)
    if json_out:
        text = json.dumps(st, indent=2, default=str)
        if json_out == "-":
            typer.echo(text)
            return
        atomic_write(json_out, text)
    for line in format_status(st):
        typer.echo(line)


def announce(home: Home, **info) -> None:
    """``kdops up`` tells later ``kdops status`` calls where its Prefect API is (``Home.service``)."""
    atomic_write(home.service, {"pid": os.getpid(), "started": _iso(time.time()), **info})


def withdraw(home: Home) -> None:
    if (read_json(home.service, {}) or {}).get("pid") == os.getpid():
        home.service.unlink(missing_ok=True)
