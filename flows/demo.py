"""``kdops demo``: the whole service on this machine, on the shipped corpus and weights.

Student v1 is distilled on movie reviews and served on Triton; a load generator keeps calling it while the
traffic shifts to tweets, then product reviews, then editorials. Each window of served traffic goes through
the drift monitors; a retrain verdict runs distill_flow (incremental, on the served texts, teacher soft
labels only) and promote_flow (hot swap + registry). It ends with a table, an HTML report and JSON.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kdops import corpora
from kdops.artifacts import Kind

log = logging.getLogger("kdops.demo")
DOMAINS = ("tweets", "amazon", "nyt")


def _accuracy_per_domain(artifact: str, tests: dict[str, pd.DataFrame]) -> dict:
    from kdops.predict import Predictor

    p = Predictor.from_dir(artifact)
    out = {}
    for d, rows in tests.items():
        y = rows["label"].map({n: i for i, n in enumerate(corpora.SENTIMENT_LABELS)}).to_numpy()
        out[d] = float((p.predict_proba(rows["text"].tolist()).argmax(-1) == y).mean())
    return out


def _teacher_accuracy(ctx, tests: dict[str, pd.DataFrame]) -> dict:
    from flows.tasks import load_teacher
    from kdops.soft_labels import SoftLabelCache

    teacher, cache = load_teacher(ctx, Kind.CLASSIFIER), SoftLabelCache(ctx.paths.soft_labels)
    out = {}
    for d, rows in tests.items():
        y = rows["label"].map({n: i for i, n in enumerate(corpora.SENTIMENT_LABELS)}).to_numpy()
        out[d] = float((cache.get_or_compute(teacher, rows["text"].tolist()).argmax(-1) == y).mean())
    return out


@dataclass
class DemoPlan:
    """The demo's sizes: a full run, or the quick smoke run."""

    window: int = 500  # served requests per monitoring window
    v1_rows: int = 4000  # movie reviews student v1 is distilled on
    eval_per_domain: int = 400  # held-out reviews per domain

    @classmethod
    def quick(cls) -> "DemoPlan":
        return cls(window=200, v1_rows=2000, eval_per_domain=150)


def _wait_for_window(load, since: float, n: int, limit_s: float = 300) -> None:
    """Until ``n`` requests were served since ``since`` (bounded)."""
    while time.time() - since < limit_s:
        time.sleep(1)
        if load.failed_between(since, time.time())[1] >= n:
            return


def _phase(ctx, load, domain: str, pool: list[str], tests, eval_id: str, plan: DemoPlan,
           champion: dict, teacher_acc: dict) -> dict:
    """Serve one domain's traffic; each window is a ``monitor_tick`` (the flow ``kdops up`` schedules), and its
    retrain verdict runs ``distill_flow`` (incremental recipe) and ``promote_flow`` through it."""
    from flows.monitor import monitor_tick
    from monitoring import TriggerConfig

    load.set_pool(pool)
    rec = {"domain": domain, "drift_detected": False, "swap_failed": 0, "detect_to_serve_s": None,
           "student_acc_before": _accuracy_per_domain(champion["artifact"], tests), "teacher_acc": teacher_acc}
    # 2-of-3 hysteresis as in production; a 1-window cool-down because nothing here works the review queue
    trigger = TriggerConfig(cooldown=1)
    for w in range(4):  # at most 4 windows per phase
        _wait_for_window(load, time.time(), plan.window)
        t_check = time.time()
        tick = monitor_tick(ctx, window_s=3600, min_rows=plan.window, eval_id=eval_id,
                            recipe="classifier-incremental-quick", trigger=trigger)
        log.info("window %s-%d: %s -> %s", domain, w, tick.get("decision"), tick.get("action"))
        rec.setdefault("verdicts", []).append(tick.get("decision"))
        if tick.get("action") != "retrain":
            continue
        r = tick["distill"]
        failed, total = load.failed_between(t_check, time.time())
        rec.update({"drift_detected": True, "decision": r.get("decision"), "version": r.get("version"),
                    "student_acc_after": _accuracy_per_domain(r["artifact"], tests),
                    "retention": r["report"]["retention"], "swap_failed": failed, "swap_requests": total,
                    "detect_to_serve_s": time.time() - t_check})
        if r.get("decision") == "promote":
            rec["swap_time"] = time.time() - load.t0
            champion.update(version=r["version"], artifact=r["artifact"])
        break
    rec.setdefault("student_acc_after", rec["student_acc_before"])
    return rec


def _drift_history(home, run_started: str) -> list[dict]:
    hist_path = home.monitoring / "history.jsonl"
    history = [json.loads(x) for x in hist_path.read_text().splitlines() if x.strip()] if hist_path.exists() else []
    history = [h for h in history if h.get("timestamp", "") >= run_started]
    return [{"window": i, "verdict": h.get("decision"),
             "scores": {k: -np.log10(max(float(t.get("p_value") or 1.0), 1e-12)) for k, t in h.get("tests", {}).items()}}
            for i, h in enumerate(history)]


def _first_round(ctx, plan: DemoPlan, tests: dict, teacher_acc: dict, v1_recipe: str) -> tuple[dict, pd.DataFrame, str]:
    """Student v1 on movie reviews, gated on movie reviews only (nobody has shown it the other domains yet)."""
    from flows.loop import distill_flow
    from flows.tasks import save_snapshot
    from kdops.recipes import recipe

    v1 = recipe(v1_recipe)
    labels = corpora.SENTIMENT_LABELS
    movie = corpora.load("sentiment", split="train", domains=("movie",), limit_per_domain=plan.v1_rows).rows
    r0 = distill_flow(ctx, save_snapshot(ctx, movie, labels), save_snapshot(ctx, tests["movie"], labels), v1)
    if "promotion" not in r0:
        raise RuntimeError(f"student v1 was not deployed: gate said {r0['decision']['action']}: {r0['decision']['reasons']}")
    rec = {"domain": "movie", "drift_detected": None, "decision": r0["decision"]["action"], "version": r0["version"],
           "student_acc_before": None, "student_acc_after": _accuracy_per_domain(r0["artifact"], tests),
           "teacher_acc": teacher_acc, "retention": r0["report"]["retention"], "swap_failed": 0, "detect_to_serve_s": None}
    return rec, movie, r0["artifact"]


def _shifts(ctx, load, plan: DemoPlan, tests: dict, champion: dict, teacher_acc: dict) -> tuple[list, list]:
    """The traffic moves to each new domain in turn; each round is gated on every domain seen so far."""
    from flows.tasks import save_snapshot

    rounds, swap_times, seen = [], [], ["movie"]
    for d in DOMAINS:
        seen.append(d)
        eval_id = save_snapshot(ctx, pd.concat([tests[x] for x in seen], ignore_index=True), corpora.SENTIMENT_LABELS)
        pool = corpora.load("sentiment", split="train", domains=(d,)).rows["text"].tolist()
        rec = _phase(ctx, load, d, pool, tests, eval_id, plan, champion, teacher_acc)
        if "swap_time" in rec:
            swap_times.append(rec.pop("swap_time"))
        rounds.append(rec)
    return rounds, swap_times


def run_demo(json_out: Path, report: Path, quick: bool = False, project=None) -> dict:
    """Student v1 on movie reviews, served; traffic shifts to tweets, amazon, nyt; the loop keeps up.
    ``project`` (examples/sentiment/kdops.toml) names the teacher, the first recipe and the served model."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.monitor import monitor_tick
    from kdops.report import render
    from flows.services import PrefectServer
    from flows.tasks import LoopContext
    from kdops.paths import Home
    from kdops.teacher import TeacherTrainConfig, bootstrap_sentiment_teacher
    from monitoring import reset_trigger
    from serving.loadgen import LoadGenerator
    from serving.server import ServerConfig, TritonServer

    _quiet_logs()
    t_start, plan, paths = time.time(), DemoPlan.quick() if quick else DemoPlan(), Home.from_env()
    declared = project.teacher_path if project is not None else None
    teacher_dir = declared if declared and (declared / "config.json").is_file() else \
        bootstrap_sentiment_teacher(TeacherTrainConfig())
    v1_recipe = (project.student.recipe if project is not None else "") or "classifier-quick"
    model = project.serve.model if project is not None else "kdops"
    tests = {d: corpora.load("sentiment", split="test", domains=(d,), limit_per_domain=plan.eval_per_domain).rows
             for d in corpora.SENTIMENT_DOMAINS}
    run_dir = paths.demo / time.strftime("%Y%m%d-%H%M%S")
    # A run of its own: its registered model and trigger start fresh; it reports only its own windows.
    reset_trigger(paths.monitoring)
    run_started = pd.Timestamp.now(tz="UTC").isoformat()
    repo = run_dir / "triton-repo"
    with PrefectServer(paths.root) as prefect, temporary_settings({PREFECT_API_URL: prefect.url}), \
            TritonServer(ServerConfig(repository=str(repo), log_file=str(run_dir / "triton.log"))) as triton:
        ctx = LoopContext(home=str(paths.root), teacher_dir=str(teacher_dir), triton_url=triton.url,
                          triton_grpc_url=triton.grpc_url, triton_key=triton.admin_key, model=f"{model}-demo-{run_dir.name}",
                          repository=str(repo), prediction_log=str(run_dir / "predictions"))
        teacher_acc = _teacher_accuracy(ctx, tests)
        first, movie, artifact = _first_round(ctx, plan, tests, teacher_acc, v1_recipe)
        champion = {"version": first["version"], "artifact": artifact}
        # Steady traffic of about 40 requests/s from 8 clients: a busy service, not a saturating benchmark
        load = LoadGenerator(triton.url, ctx.model, threads=8, rate_limit_s=0.2)
        load.set_pool(movie["text"].tolist())
        load.start()
        time.sleep(3)
        monitor_tick(ctx, min_rows=10 ** 9)  # the loop state now follows v1
        rounds, swap_times = _shifts(ctx, load, plan, tests, champion, teacher_acc)
        load.stop()
        failed_all, total_all = load.failed_between(0, time.time() + 1)
        summary = {"rounds": [first, *rounds], "total_failed_requests": failed_all, "total_requests": total_all,
                   "seconds": time.time() - t_start,
                   "links": {"MLflow UI": f".venv/bin/kdops{' --project ' + str(project.source) if project is not None else ''} registry ui"
                                           f"  (store {paths.mlflow})",
                             "Prefect API/UI": prefect.url.removesuffix("/api") + " (while running)",
                             "Triton": f"http://{triton.url}/v2/models/{ctx.model}",
                             "drift reports": str(paths.monitoring / "reports"), "run dir": str(run_dir)}}
        render(summary, report, latency_samples=load.samples, swap_times=swap_times,
               drift_history=_drift_history(paths, run_started))
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(summary, indent=2, default=str))
    _print_table(summary, report, json_out)
    return summary


def _quiet_logs() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for noisy in ("httpx", "httpx2", "httpcore", "urllib3", "openai"):  # one line per HTTP call to Prefect otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if "--debug" not in sys.argv[1:]:  # a failed task's one-line log stays; its traceback is for --debug
        for name in ("prefect.task_runs", "prefect.flow_runs"):
            logger = logging.getLogger(name)
            if not any(isinstance(f, _NoTraceback) for f in logger.filters):
                logger.addFilter(_NoTraceback())


class _NoTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def _print_table(summary: dict, report: Path, json_out: Path) -> None:
    print(f"\n{'round':<8}{'drift':<8}{'decision':<10}{'acc before -> after (per domain)':<70}{'failed':<8}{'detect->serve s'}")
    for r in summary["rounds"]:
        before, after = r.get("student_acc_before") or {}, r.get("student_acc_after") or {}
        accs = " ".join(f"{d}:{before.get(d, float('nan')):.2f}->{after.get(d, float('nan')):.2f}" for d in after)
        dts = r.get("detect_to_serve_s")
        print(f"{r['domain']:<8}{str(r.get('drift_detected')):<8}{str(r.get('decision')):<10}{accs:<70}{r.get('swap_failed', 0)!s:<8}"
              f"{'' if dts is None else f'{dts:.0f}'}")
    print(f"\nfailed requests: {summary['total_failed_requests']} of {summary['total_requests']}; "
          f"{summary['seconds']:.0f} s; report {report}; summary {json_out}")
