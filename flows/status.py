"""``kdops status``: the champion, the next scheduled runs (asked of the Prefect API ``kdops up`` announced), the
queued snapshots and the last round. Works while ``kdops up`` is down: it says so and shows the rest."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import typer

from flows.tasks import MODEL
from kdops.paths import Home, atomic_write, read_json
from kdops.sources import DataQueue, one_line


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
        return {"version": None, "error": one_line(e)}
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
            service["error"] = one_line(e)[:300]
    announced = read_json(home.service, {}) or {}
    service.update({k: announced[k] for k in ("pid", "started", "watch", "triton", "metrics") if k in announced})
    if service["running"] and service.get("metrics"):
        from serving.metrics import triton_metrics

        try:  # Triton's own counters: requests, failures, batching, queue and compute time
            service["serving"] = triton_metrics(service["metrics"], model)
        except OSError as e:
            service["serving"] = {"error": one_line(e)}
    failed = [{"path": c.source, "reason": c.reason, "at": _iso(c.at)} for c in queue.contents.values() if c.status == "failed"]
    last = queue.last_round
    return {"home": str(home), "model": model, "champion": _champion(home, model, tracking_uri), "service": service,
            "schedules": sched,
            "queue": [{**asdict(q), "at": _iso(q.at)} for q in queue.queued],
            "failed_files": failed,
            "last_round": {**asdict(last), "snapshots": list(last.snapshots), "at": _iso(last.at)} if last else None,
            "last_window": _last_window(home)}


def _last_window(home: Home) -> dict | None:
    """The monitor's last checked window: when, its verdict and action, the student's label-free estimated accuracy."""
    path = home.monitoring / "history.jsonl"
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        row = json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None
    if row is None:
        return None
    return {k: row.get(k) for k in ("timestamp", "window_id", "decision", "action", "estimated_acc")}


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
        m = svc.get("serving")
        if m and "error" not in m:
            lines.append(f"  Triton ({svc.get('triton')}): {m['requests']} requests to {st['model']}, {m['failed']} failed; "
                         f"mean batch {m['mean_batch']}, queue {m['mean_queue_ms']} ms, compute {m['mean_compute_ms']} ms")
        elif m:
            lines.append(f"  Triton metrics unavailable: {m['error']}")
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
    w = st.get("last_window")
    if w:
        est = w.get("estimated_acc")
        lines.append(f"last monitored window: {w['timestamp']} {w['decision']} -> {w['action']}"
                     + (f"; estimated student accuracy {est:.3f} (no labels: the teacher's view)" if isinstance(est, float) else ""))
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
