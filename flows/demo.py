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
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

from kdops import corpora
from kdops.distill import DistillConfig
from kdops.gate import GateThresholds
from kdops.paths import home
from kdops.rounds import StudentShape

log = logging.getLogger("kdops.demo")
DOMAINS = ("tweets", "amazon", "nyt")


class LoadGenerator:
    """Client threads calling Triton with texts of the current domain; every request is recorded."""

    def __init__(self, url: str, model: str, threads: int = 8, rate_limit_s: float = 0.0):
        self.url, self.model, self.threads, self.pause = url, model, threads, rate_limit_s
        self.pool: list[str] = []
        self.samples: list[tuple[float, float, bool]] = []
        self.stop_event = threading.Event()
        self.t0 = time.time()
        self.lock = threading.Lock()
        self.workers: list[threading.Thread] = []

    def set_pool(self, texts: list[str]) -> None:
        self.pool = list(texts)

    def _run(self, seed: int) -> None:
        from serving.client import ServingClient

        client, rng = ServingClient(self.url, timeout_s=30), np.random.default_rng(seed)
        while not self.stop_event.is_set():
            pool = self.pool
            if not pool:
                time.sleep(0.1)
                continue
            text = pool[int(rng.integers(len(pool)))]
            t = time.time()
            try:
                client.predict(self.model, [text])
                ok = True
            except Exception:  # counted, not raised: a failed request is what the demo measures
                ok = False
            with self.lock:
                self.samples.append((t - self.t0, (time.time() - t) * 1000, ok))
            if self.pause:
                time.sleep(self.pause)

    def start(self) -> "LoadGenerator":
        self.workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)]
        for w in self.workers:
            w.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        for w in self.workers:
            w.join(35)

    def failed_between(self, a: float, b: float) -> tuple[int, int]:
        with self.lock:
            rows = [s for s in self.samples if a - self.t0 <= s[0] <= b - self.t0]
        return sum(1 for s in rows if not s[2]), len(rows)


def _accuracy_per_domain(artifact: str, tests: dict[str, pd.DataFrame]) -> dict:
    from kdops.predict import Predictor

    p = Predictor.from_dir(artifact)
    out = {}
    for d, rows in tests.items():
        y = rows["label"].map({n: i for i, n in enumerate(corpora.SENTIMENT_LABELS)}).to_numpy()
        out[d] = float((p.predict_proba(rows["text"].tolist()).argmax(-1) == y).mean())
    return out


def _reference(artifact: str, texts: list[str], teacher, cache):
    """The champion's reference profile, and a monitor config whose disagreement baseline is the champion's
    own disagreement with the teacher on that reference (a fixed baseline would be wrong for most students)."""
    from kdops.predict import Predictor
    from monitoring import DisagreementCheck, MonitorConfig, profile_reference

    p = Predictor.from_dir(artifact)
    probs = p.predict_proba(texts)
    base = float((probs.argmax(-1) != cache.get_or_compute(teacher, texts).argmax(-1)).mean())
    cfg = MonitorConfig(disagreement=DisagreementCheck(sample_share=1.0, baseline_rate=min(0.5, base), tolerance=0.03))
    ref = profile_reference(texts, cfg, probabilities=probs, embeddings=p.embed(texts), label_names=corpora.SENTIMENT_LABELS)
    return ref, cfg


def run_demo(json_out: Path, report: Path, quick: bool = False) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for noisy in ("httpx", "httpcore", "urllib3"):  # one line per HTTP call to Prefect otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from flows.loop import distill_flow, monitor_flow
    from flows.report import render
    from flows.services import PrefectServer
    from flows.tasks import LoopContext, save_snapshot
    from kdops.teacher import TeacherTrainConfig, bootstrap_sentiment_teacher
    from serving.server import ServerConfig, TritonServer

    t_start = time.time()
    root = home()
    window = 200 if quick else 500
    v1_rows = 2000 if quick else 4000
    eval_per_domain = 150 if quick else 400
    teacher_dir = bootstrap_sentiment_teacher(TeacherTrainConfig())
    tests = {d: corpora.load("sentiment", split="test", domains=(d,), limit_per_domain=eval_per_domain).rows
             for d in corpora.SENTIMENT_DOMAINS}
    from kdops.evaluate import softmax  # noqa: F401  (teacher accuracy below uses the cache)
    from kdops.soft_labels import SoftLabelCache
    from kdops.teacher import HFTeacher

    teacher = HFTeacher(teacher_dir)
    cache = SoftLabelCache(root / "soft_labels.sqlite")
    teacher_acc = {}
    for d, rows in tests.items():
        y = rows["label"].map({n: i for i, n in enumerate(corpora.SENTIMENT_LABELS)}).to_numpy()
        teacher_acc[d] = float((cache.get_or_compute(teacher, rows["text"].tolist()).argmax(-1) == y).mean())

    run_dir = root / "demo" / time.strftime("%Y%m%d-%H%M%S")
    repo, plog = run_dir / "triton-repo", run_dir / "predictions"
    cfg = DistillConfig(epochs=3 if quick else 4, early_stopping_patience=0)
    inc_cfg = DistillConfig(epochs=2, lr=1e-4, early_stopping_patience=0, replay_share=1.0)
    thresholds = GateThresholds(min_retention=0.9, max_slice_drop=0.03)
    from monitoring import TriggerConfig

    # 2-of-3 hysteresis as in production; a 1-window cool-down because nothing here works the review queue,
    # and a 6-window one would hide the retrain verdict that follows a review (demo traffic is short).
    trigger_cfg = TriggerConfig(cooldown=1)
    rounds: list[dict] = []
    # The monitoring state under <home> outlives a run; this run starts with a fresh trigger and reports only
    # its own windows.
    (root / "monitoring" / "trigger.json").unlink(missing_ok=True)
    run_started = pd.Timestamp.now(tz="UTC").isoformat()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with PrefectServer(root) as prefect, temporary_settings({PREFECT_API_URL: prefect.url}), \
            TritonServer(ServerConfig(repository=str(repo), log_file=str(run_dir / "triton.log"))) as triton:
        ctx = LoopContext(home=str(root), teacher_dir=str(teacher_dir), triton_url=triton.url, triton_grpc_url=triton.grpc_url, triton_key=triton.admin_key,
                          repository=str(repo), prediction_log=str(plog))
        movie = corpora.load("sentiment", split="train", domains=("movie",), limit_per_domain=v1_rows).rows
        # Each round is evaluated on the domains seen so far: v1 is gated on movie reviews, not on domains
        # nobody has shown it yet; later rounds must keep every slice they inherit (the gate's forgetting check).
        seen = ["movie"]
        labels = corpora.SENTIMENT_LABELS
        r0 = distill_flow(ctx, save_snapshot(ctx, movie, labels), save_snapshot(ctx, tests["movie"], labels), cfg,
                          StudentShape(), thresholds, None)
        if "promotion" not in r0:
            raise RuntimeError(f"student v1 was not deployed: gate said {r0['decision']['action']}: {r0['decision']['reasons']}")
        champion = {"version": r0["version"], "artifact": r0["artifact"], "report": r0["report"]}
        acc0 = _accuracy_per_domain(r0["artifact"], tests)
        rounds.append({"domain": "movie", "drift_detected": None, "decision": r0["decision"]["action"], "version": r0["version"],
                       "student_acc_before": None, "student_acc_after": acc0, "teacher_acc": teacher_acc,
                       "retention": r0["report"]["retention"], "swap_failed": 0, "detect_to_serve_s": None})
        reference_texts = movie["text"].tolist()
        ref, mon_cfg = _reference(r0["artifact"], reference_texts[:2000], teacher, cache)
        # Steady traffic of about 40 requests/s from 8 clients: a busy service, not a saturating benchmark
        # (bench/serving.py measures that), so the two cores still have room to distil the next version.
        load = LoadGenerator(triton.url, ctx.model, threads=8, rate_limit_s=0.2)
        load.set_pool(movie["text"].tolist())
        load.start()
        swap_times: list[float] = []  # seconds since the load started at which a hot swap completed
        time.sleep(3)
        stream = {d: corpora.load("sentiment", split="train", domains=(d,)).rows for d in DOMAINS}
        for d in DOMAINS:
            load.set_pool(stream[d]["text"].tolist())
            detected, rec = False, {"domain": d, "drift_detected": False, "swap_failed": 0, "detect_to_serve_s": None,
                                    "student_acc_before": _accuracy_per_domain(champion["artifact"], tests), "teacher_acc": teacher_acc}
            for w in range(4):  # at most 4 windows per phase
                since = time.time()
                while time.time() - since < 300:  # wait for a full window of served traffic (bounded)
                    time.sleep(1)
                    _, n = load.failed_between(since, time.time())
                    if n >= window:
                        break
                until = time.time()
                mon = monitor_flow(ctx, ref, since, until, window_id=f"{d}-{w}", config=mon_cfg, trigger=trigger_cfg)
                log.info("window %s-%d: %s -> %s", d, w, mon.get("decision"), mon.get("action"))
                rec.setdefault("verdicts", []).append(mon.get("decision"))
                if mon.get("action") == "retrain":
                    detected, t_detect = True, time.time()
                    from kdops.prediction_log import read_predictions

                    served = read_predictions(plog, since=since - 0 if w == 0 else since)
                    new = pd.DataFrame({"text": served["text"].drop_duplicates().tolist()}).assign(label=None, domain=d)
                    seen.append(d)
                    seen_rows = pd.concat([tests[x] for x in seen], ignore_index=True)
                    r = distill_flow(ctx, save_snapshot(ctx, new, labels), save_snapshot(ctx, seen_rows, labels), inc_cfg,
                                     StudentShape(), thresholds, champion)
                    failed, total = load.failed_between(t_detect, time.time())
                    rec.update({"drift_detected": True, "decision": r["decision"]["action"], "version": r["version"],
                                "student_acc_after": _accuracy_per_domain(r["artifact"], tests), "retention": r["report"]["retention"],
                                "swap_failed": failed, "swap_requests": total, "detect_to_serve_s": time.time() - t_detect})
                    if "promotion" in r:
                        swap_times.append(time.time() - load.t0)
                        champion = {"version": r["version"], "artifact": r["artifact"], "report": r["report"]}
                        reference_texts = reference_texts + new["text"].tolist()
                        ref, mon_cfg = _reference(champion["artifact"], reference_texts[-2000:], teacher, cache)
                        (root / "monitoring" / "trigger.json").unlink(missing_ok=True)  # a new champion, a fresh trigger
                    break
            rec.setdefault("student_acc_after", rec["student_acc_before"])
            rounds.append(rec)
        load.stop()
        failed_all, total_all = load.failed_between(0, time.time() + 1)
        hist_path = root / "monitoring" / "history.jsonl"
        history = [json.loads(x) for x in hist_path.read_text().splitlines() if x.strip()] if hist_path.exists() else []
        history = [h for h in history if h.get("timestamp", "") >= run_started]
        drift_hist = [{"window": i, "verdict": h.get("decision"),
                       "scores": {k: -np.log10(max(float(t.get("p_value") or 1.0), 1e-12)) for k, t in h.get("tests", {}).items()}}
                      for i, h in enumerate(history)]
        summary = {"rounds": rounds, "total_failed_requests": failed_all, "total_requests": total_all,
                   "seconds": time.time() - t_start,
                   "links": {"MLflow UI": f".venv/bin/kdops registry ui  (store {root / 'mlflow'})",
                             "Prefect API/UI": prefect.url.removesuffix("/api") + " (while running)",
                             "Triton": f"http://{triton.url}/v2/models/{ctx.model}",
                             "drift reports": str(root / "monitoring" / "reports"), "run dir": str(run_dir)}}
        render(summary, report, latency_samples=load.samples, swap_times=swap_times, drift_history=drift_hist)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(summary, indent=2, default=str))
    _print_table(summary, report, json_out)
    return summary


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
