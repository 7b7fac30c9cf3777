"""Serving bench (on demand, never a timed test): dynamic batching, student vs teacher, hot swaps under load.

    .venv/bin/python bench/serving.py --out bench/results/serving.json [--swaps 100] [--clients 32]

Runs its own tritonserver on 127.0.0.1 with tiny test models by default (--student/--teacher for real
dirs) and one asyncio gRPC load process of closed-loop clients (serving/loadgen.py), bounded in count and
time. The command and figures of record: bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TEXTS = ["this movie was really good", "a terrible boring plot and an awful actor", "what city is this",
         "i love this phone but the battery is bad", "the story was fine"]


CLIENT = {"kind": "grpc-async", "grpc_url": ""}


def load(url, model, clients, seconds, stop_when=None):
    """Closed loop: ``clients`` concurrent one-text requests back to back; returns (latencies s, errors, rps).
    grpc-async (default): one asyncio gRPC process (serving.loadgen); http-threads: a thread per client."""
    if CLIENT["kind"] == "grpc-async":
        from serving.loadgen import LoadProcess

        with LoadProcess(CLIENT["grpc_url"], model, clients, TEXTS) as lp:
            if stop_when is None:
                time.sleep(seconds)
            else:
                stop_when()
        CLIENT["timeline"] = lp.timeline()
        return lp.result()
    from serving.client import ServingClient

    client, lat, errs, stop = ServingClient(url), [], [], threading.Event()

    def run(i):
        k = i
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                client.infer(model, [TEXTS[k % len(TEXTS)]])
            except Exception as e:  # counted, never hidden
                errs.append(str(e)[:200])
            lat.append(time.perf_counter() - t0)
            k += 1

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    if stop_when is None:
        time.sleep(seconds)
    else:
        stop_when()
    stop.set()
    for t in threads:
        t.join(timeout=60)
    wall = time.perf_counter() - t0
    return np.array(lat), errs, len(lat) / wall


def pct(lat, q):
    return round(float(np.percentile(lat, q) * 1000), 2) if len(lat) else None


def phase_maxima(timeline, phases, per_swap: list | None = None) -> dict:
    """Worst latency (ms) of requests that were in flight during each phase of the swaps (export, load,
    smoke, switch, drain + unload): where a swap hurts clients, if it does. ``per_swap`` (a list) receives
    each swap's own maxima, to tell one outlier from a pattern."""
    starts, lat = timeline
    ends = starts + lat
    worst: dict[str, float] = {}
    for m0, t in phases:
        mine: dict[str, float] = {}
        a_switch = m0 + t["export"] + t["load"] + t.get("smoke", 0.0)
        spans = {"export": (m0, m0 + t["export"]), "load": (m0 + t["export"], m0 + t["export"] + t["load"]),
                 "smoke": (m0 + t["export"] + t["load"], a_switch), "switch": (a_switch, a_switch + t["switch"]),
                 "drain+unload": (a_switch + t["switch"], m0 + t["total"])}
        for name, (a, b) in spans.items():
            m = (starts <= b) & (ends >= a)
            if m.any():
                mine[name] = round(float(lat[m].max() * 1000), 1)
                worst[name] = max(worst.get(name, 0.0), mine[name])
        if per_swap is not None:
            per_swap.append(mine)
    return {k: round(v, 1) for k, v in worst.items()}


def swap_run(server, students, n, clients, cfg, steady_p99_ms) -> dict:
    """``n`` hot swaps, alternating two students, under ``clients`` closed-loop clients: failures, worst
    latency overall and per swap phase, which method each swap used, and the server's RSS every n/5 swaps."""
    from serving.swap import hot_swap

    swap_s, phases, methods, rss, loads = [], [], {}, [], []

    def swaps():
        for i in range(n):
            t0, m0 = time.perf_counter(), time.monotonic()
            r = hot_swap(server, "student", students[(i + 1) % 2], cfg=cfg)
            swap_s.append(time.perf_counter() - t0)
            phases.append((m0, r.timings_s))
            loads.append(r.timings_s.get("load", 0.0))
            methods[r.method] = methods.get(r.method, 0) + 1
            if (i + 1) % max(1, n // 5) == 0:
                rss.append(round(rss_kb(server.pids()) / 1024))

    t_run = time.perf_counter()
    lat, errs, rps = load(server.url, "student", clients, 0, stop_when=swaps)
    wall = time.perf_counter() - t_run
    out = dict(swaps=len(swap_s), swap_seconds=round(wall, 1), swap_requests=len(lat), swap_failed=len(errs),
               swap_errors=errs[:5], swap_requests_over_3x=int((lat * 1000 > 3 * steady_p99_ms).sum()),
               swap_max_latency_ms=round(float(lat.max() * 1000), 1), swap_p99_ms=pct(lat, 99),
               swap_seconds_mean=round(float(np.mean(swap_s)), 2), swap_rps=round(rps, 1), swap_methods=methods,
               rss_mb_trace=rss, swap_load_s_p50=round(float(np.median(loads)), 3) if loads else None,
               swap_load_s_max=round(float(max(loads)), 3) if loads else None)
    out["swap_max_over_steady_p99"] = round(out["swap_max_latency_ms"] / steady_p99_ms, 2)
    out["swap_p99_over_steady_p99"] = round(out["swap_p99_ms"] / steady_p99_ms, 2) if out["swap_p99_ms"] else None
    if CLIENT.get("timeline") is not None:
        per_swap: list = []
        out["swap_phase_max_latency_ms"] = phase_maxima(CLIENT["timeline"], phases, per_swap)
        out["swap_phase_max_latency_ms_per_swap"] = per_swap
        out["swaps_over_3x_steady_p99"] = sum(1 for m in per_swap if m and max(m.values()) > 3 * steady_p99_ms)
    return out


def control_run(server, seconds, clients, steady_p99_ms) -> dict:
    """The same load for as long as the swaps took, with no swap: how far the worst request of a window that long
    strays from the steady p99 on this box by itself. A max over tens of thousands of requests is the statistic the
    swap target judges; this is its baseline without swaps."""
    lat, errs, rps = load(server.url, "student", clients, seconds)
    worst = round(float(lat.max() * 1000), 1) if len(lat) else None
    return dict(control_seconds=round(seconds, 1), control_requests=len(lat), control_failed=len(errs),
                control_p99_ms=pct(lat, 99), control_max_latency_ms=worst,
                control_max_over_steady_p99=round(worst / steady_p99_ms, 2) if worst else None,
                control_requests_over_3x=int((lat * 1000 > 3 * steady_p99_ms).sum()))


def proc_counts(pids) -> dict:
    """Resident memory (MB), open file descriptors and threads over the server's processes."""
    fds = threads = 0
    for pid in pids:
        try:
            fds += len(list(Path(f"/proc/{pid}/fd").iterdir()))
            threads += int(next(line.split()[1] for line in open(f"/proc/{pid}/status") if line.startswith("Threads:")))
        except (OSError, StopIteration):
            pass
    return {"rss_mb": round(rss_kb(pids) / 1024, 1), "fds": fds, "threads": threads}


def soak(server, students, n, clients, cfg) -> dict:
    """``n`` hot swaps back to back under ``clients`` closed-loop clients: failures, and the server's memory, file
    descriptors and threads after the first tenth of the swaps (allocator and caches warm) against the end."""
    from serving.swap import hot_swap

    trace, done = [], [0]

    def swaps():
        trace.append({"swaps": 0, **proc_counts(server.pids())})
        for i in range(n):
            hot_swap(server, "student", students[(i + 1) % 2], cfg=cfg)
            done[0] += 1
            if (i + 1) % max(1, n // 10) == 0:
                trace.append({"swaps": i + 1, **proc_counts(server.pids())})

    t0 = time.perf_counter()
    lat, errs, rps = load(server.url, "student", clients, 0, stop_when=swaps)
    warm, end = trace[1] if len(trace) > 2 else trace[0], trace[-1]

    def growth(k):
        return round(100.0 * (end[k] - warm[k]) / max(warm[k], 1), 2)

    return {"soak_swaps": done[0], "soak_seconds": round(time.perf_counter() - t0, 1), "soak_requests": len(lat),
            "soak_failed": len(errs), "soak_errors": errs[:5], "soak_p99_ms": pct(lat, 99),
            "soak_rss_growth_pct": growth("rss_mb"), "soak_fd_growth": end["fds"] - warm["fds"],
            "soak_thread_growth": end["threads"] - warm["threads"], "soak_trace": trace}


def rss_kb(pids):
    total = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def tiny_models(root: Path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import make_teacher, make_tokenizer

    from kdops.artifacts import Lineage, save_student
    from kdops.student import from_teacher

    tok = make_tokenizer(root / "tok")
    teacher = make_teacher(tok, layers=4, hidden=128)  # the "expensive" one: 4 layers, 128 hidden
    teacher.config.id2label, teacher.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    teacher.save_pretrained(str(root / "teacher"), safe_serialization=True)
    tok.save_pretrained(str(root / "teacher"))
    students = []
    for seed in (0, 1):
        s = from_teacher(make_teacher(tok, layers=4, hidden=128, seed=seed), num_labels=2, layers=[1], embedding_size=32)
        students.append(save_student(root / f"student{seed}", s, tok, ["neg", "pos"], 64, Lineage()).path)
    return students, root / "teacher"


def with_graphs(students: list[Path], real: bool) -> None:
    """Give each student its ONNX graphs (kdops.onnx_export), INT8 gated on the sentiment test split for real students
    and on the bench texts for the tiny random ones (whose INT8 gate may fail: they then serve the fp32 graph)."""
    import pandas as pd

    from kdops import corpora
    from kdops.artifacts import Artifact
    from kdops.onnx_export import prepare
    from kdops.onnx_predict import choose_graph

    if real:
        rows = pd.concat([corpora.load("sentiment", split="test", domains=(d,)).rows.assign(domain=d)
                          for d in corpora.SENTIMENT_DOMAINS], ignore_index=True)
    else:
        rows = pd.DataFrame({"text": TEXTS * 20, "label": ["pos", "neg", "neg", "pos", "pos"] * 20})
    for d in students:
        art = prepare(Artifact.read(d), rows)
        choice = choose_graph(art)
        print(f"{d}: served as {choice.runtime if choice else 'torch'} ({choice.reason if choice else art.extra['onnx']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="Write the JSON results here.")
    ap.add_argument("--clients", type=int, default=32, help="Concurrent client threads.")
    ap.add_argument("--seconds", type=float, default=15.0, help="Duration of each steady-load phase.")
    ap.add_argument("--swaps", type=int, default=100, help="Hot swaps under load (fewer for a quick run).")
    ap.add_argument("--repeats", type=int, default=3, help="Rounds of the four alternating arms (batching off / on, stable name / direct); the median gain is reported.")
    ap.add_argument("--student", type=Path, nargs=2, default=None, help="Two real student dirs to swap between.")
    ap.add_argument("--teacher", type=Path, default=None, help="A real HF teacher dir (safetensors).")
    ap.add_argument("--nice-loading", action=argparse.BooleanOptionalAction, default=True,
                    help="Swaps at nice 19 (SwapConfig.nice_loading, on by default); --no-nice-loading swaps at normal priority.")
    ap.add_argument("--baseline-swaps", type=int, default=10,
                    help="After the swaps of record, this many swaps that each start a new stub, as the baseline (0: none).")
    ap.add_argument("--no-control", dest="control", action="store_false",
                    help="Skip the control window: the same load, as long as the swaps took, with no swap.")
    ap.add_argument("--no-standby", action="store_true",
                    help="Unload the old slot after each swap, so every swap starts a new stub (SwapConfig.standby=False): "
                         "the design before in-place reloads, as a baseline.")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads per model instance (0: torch default, all cores).")
    ap.add_argument("--instances", type=int, default=1, help="Model instances (stub processes) per student slot and for the teacher (ExportConfig.instance_count).")
    ap.add_argument("--onnx-threads", type=int, default=1, help="ONNX Runtime intra-op threads per instance.")
    ap.add_argument("--runtime", choices=("auto", "torch"), default="auto",
                    help="auto: the students serve their ONNX graphs (INT8 where gated; exported here if missing) and a torch copy of the "
                         "first is measured beside them; torch: the torch students only, as before ONNX.")
    ap.add_argument("--client", choices=("grpc-async", "http-threads"), default="grpc-async",
                    help="Load generator: one asyncio gRPC process, or one HTTP client thread per client in this process.")
    ap.add_argument("--soak", type=int, default=0, help="Only a soak: this many hot swaps under --clients, with the "
                                                         "server's memory, file descriptors and threads (0: the full bench).")
    args = ap.parse_args()

    from serving.client import ServingClient, ServingError
    from serving.export import ExportConfig, export_artifact
    from serving.server import ServerConfig, TritonServer
    from serving.swap import SwapConfig, deploy, hot_swap, slot_names
    from serving.teacher import deploy_teacher

    root = Path(tempfile.mkdtemp(prefix="kdops-bench-serving-"))
    students, teacher = tiny_models(root)
    students = list(args.student or students)
    teacher = args.teacher or teacher
    if args.runtime == "auto":
        with_graphs(students, real=args.student is not None)
    res = {"clients": args.clients, "seconds": args.seconds, "command": " ".join(sys.argv)}
    rows = []
    with TritonServer(ServerConfig(repository=str(root / "repo"))) as server:
        client = ServingClient.for_server(server)
        CLIENT.update(kind=args.client, grpc_url=server.grpc_url)
        res["client"] = args.client
        cfg = SwapConfig(nice_loading=args.nice_loading, standby=not args.no_standby,
                         export=ExportConfig(torch_threads=args.torch_threads, runtime=args.runtime,
                                             instance_count=args.instances, onnx_threads=args.onnx_threads))
        # Four arms, one artifact: batching off / on, each through the stable name clients use (the ensemble in
        # front of the hot-swap slots) and called directly (a plain model, no ensemble). The gain of record
        # compares the two stable-name arms, so batching is the only difference; the direct pair and the
        # ensemble's own cost are reported beside it.
        if args.soak:
            deploy(server, "student", students[0], cfg=cfg)
            res.update(soak(server, students, args.soak, args.clients, cfg))
            for k in ("soak_swaps", "soak_seconds", "soak_requests", "soak_failed", "soak_p99_ms", "soak_rss_growth_pct",
                      "soak_fd_growth", "soak_thread_growth"):
                print(f"{k:<24}{res[k]}")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(res, indent=2))
            return
        nobatch_cfg = replace(cfg, export=replace(cfg.export, dynamic_batching=False))
        deploy(server, "student", students[0], cfg=cfg)
        deploy(server, "nobatch", students[0], cfg=nobatch_cfg)
        for name, export in (("direct_nobatch", nobatch_cfg.export), ("direct_batch", cfg.export)):
            export_artifact(students[0], server.repository, name, 1, replace(export, warmup=False))
            client.load(name)
        # The teacher gets the students' instance count and threads: the ratio compares models, not configurations.
        deploy_teacher(server, teacher, "teacher", cfg=replace(cfg.export, runtime="torch"))
        torch_arm = args.runtime == "auto"
        if torch_arm:  # the same student served by torch: what the ONNX runtime gains through Triton
            deploy(server, "student_torch", students[0], cfg=replace(cfg, export=replace(cfg.export, runtime="torch")))
        # The arms alternate ``--repeats`` times and the run reports the median of the per-repeat gains: one
        # burst of other load on a shared 2-core box moves a single pair's gain.
        arms = ("nobatch", "student", "direct_nobatch", "direct_batch") + (("student_torch",) if torch_arm else ())
        pairs: dict[str, list] = {m: [] for m in arms}
        for _ in range(args.repeats):
            for model in arms:
                load(server.url, model, args.clients, 2.0)  # warm the connections and caches
                lat, errs, rps = load(server.url, model, args.clients, args.seconds)
                pairs[model].append((rps, lat, errs))

        def ratios(num, den):
            return [b[0] / a[0] for a, b in zip(pairs[den], pairs[num])]

        gains = ratios("student", "nobatch")
        mid = int(np.argsort(gains)[len(gains) // 2])  # the repeat with the median gain is the one reported
        load(server.url, "teacher", args.clients, 2.0)
        lat, errs, rps = load(server.url, "teacher", args.clients, args.seconds)
        pairs["teacher"] = [(rps, lat, errs)]
        shown = (("no batching", "nobatch", mid), ("dynamic batching", "student", mid),
                 ("direct, no batching", "direct_nobatch", mid), ("direct, batching", "direct_batch", mid),
                 ("teacher (batching)", "teacher", 0))
        for name, model, i in shown + ((("torch student (batching)", "student_torch", mid),) if torch_arm else ()):
            rps, lat, errs = pairs[model][i]
            rows.append((name, rps, pct(lat, 50), pct(lat, 95), pct(lat, 99), len(errs)))
            res[model] = {"rps": round(rps, 1), "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99),
                          "errors": len(errs) + sum(len(e) for _, _, e in pairs[model])}
            if model != "teacher":
                res[model]["rps_repeats"] = [round(r, 1) for r, _, _ in pairs[model]]
                res[model]["p95_ms_repeats"] = [pct(lat_, 95) for _, lat_, _ in pairs[model]]
        # Only the student's slots stay loaded for the swaps and the RSS figures.
        for name in ("nobatch", *slot_names("nobatch"), "direct_nobatch", "direct_batch", "teacher",
                     "student_torch", *slot_names("student_torch")):
            try:
                client.unload(name)
            except ServingError:  # a slot that was never loaded
                pass
        res["batching_throughput_gain"] = round(res["student"]["rps"] / res["nobatch"]["rps"], 2)
        res["batching_gain_repeats"] = [round(g, 2) for g in gains]
        res["batching_gain_direct_repeats"] = [round(g, 2) for g in ratios("direct_batch", "direct_nobatch")]
        res["batching_throughput_gain_direct"] = round(float(np.median(res["batching_gain_direct_repeats"])), 2)
        # Stable name with batching over the direct model without: mixes the ensemble's cost into the gain; kept
        # so older results stay comparable.
        res["batching_gain_mixed_repeats"] = [round(g, 2) for g in ratios("student", "direct_nobatch")]
        res["ensemble_cost_pct_repeats"] = [round(100 * (1 - g), 1) for g in ratios("student", "direct_batch")]
        res["student_vs_teacher_speedup"] = round(res["student"]["rps"] / res["teacher"]["rps"], 2)
        res["served_student_vs_teacher_speedup"] = res["student_vs_teacher_speedup"]
        res["runtime"] = args.runtime
        if torch_arm:
            res["served_onnx_vs_torch_repeats"] = [round(g, 2) for g in ratios("student", "student_torch")]
            res["served_onnx_vs_torch_speedup"] = round(float(np.median(res["served_onnx_vs_torch_repeats"])), 2)
        res["p50_ms"], res["p95_ms"], res["p99_ms"] = (res["student"][k] for k in ("p50_ms", "p95_ms", "p99_ms"))
        res["steady_p99_ms"] = res["student"]["p99_ms"]
        # Baseline after one swap, once the unloaded no-batch/teacher stubs have exited: their exit would read as
        # shrinkage.
        hot_swap(server, "student", students[1], cfg=cfg)
        hot_swap(server, "student", students[0], cfg=cfg)
        # And under load, without swaps: the serving working set (batch buffers, queues) is in the baseline, so
        # the growth is what the swaps add, not what serving under load needs anyway.
        load(server.url, "student", args.clients, 5.0)
        time.sleep(3)
        rss0 = rss_kb(server.pids())
        run = swap_run(server, students, args.swaps, args.clients, cfg, res["steady_p99_ms"])
        time.sleep(3)
        rss1 = rss_kb(server.pids())
        res.update(run, rss_kb_before=rss0, rss_kb_after=rss1, rss_growth_pct=round(100 * (rss1 - rss0) / rss0, 2))
        if args.control:
            res.update(control_run(server, run["swap_seconds"], args.clients, res["steady_p99_ms"]))
            rows.append(("no swaps (control)", res["control_requests"] / run["swap_seconds"], None, None,
                         res["control_p99_ms"], res["control_failed"]))
        if args.baseline_swaps:
            # The same swaps, each starting a new stub (the design before in-place reloads), same run and load.
            base = swap_run(server, students, args.baseline_swaps, args.clients, replace(cfg, standby=False),
                            res["steady_p99_ms"])
            res["baseline_fresh_load"] = {k: v for k, v in base.items() if k != "swap_phase_max_latency_ms_per_swap"}
            rows.append(("swaps: in-place reload", res["swap_rps"], None, None, res["swap_p99_ms"], res["swap_failed"]))
            rows.append(("swaps: fresh stub", base["swap_rps"], None, None, base["swap_p99_ms"], base["swap_failed"]))
    print(f"{'load':<24}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for r in rows:
        print(f"{r[0]:<24}{r[1]:>9.1f}{str(r[2] or '-'):>9}{str(r[3] or '-'):>9}{r[4]:>9}{r[5]:>8}")
    print(f"batching gain, stable name both arms: {res['batching_throughput_gain']}x (repeats "
          f"{res['batching_gain_repeats']}); direct: {res['batching_throughput_gain_direct']}x "
          f"({res['batching_gain_direct_repeats']}); ensemble cost with batching: {res['ensemble_cost_pct_repeats']} %")
    if "baseline_fresh_load" in res:
        b = res["baseline_fresh_load"]
        print(f"worst request during swaps / steady p99: in-place reload {res['swap_max_latency_ms']} ms "
              f"({res['swap_max_over_steady_p99']}x, {res['swaps']} swaps), fresh stub {b['swap_max_latency_ms']} ms "
              f"({b['swap_max_over_steady_p99']}x, {b['swaps']} swaps)")
    print(f"served student / teacher: {res['served_student_vs_teacher_speedup']}x"
          + (f"; ONNX / torch student: {res['served_onnx_vs_torch_speedup']}x ({res['served_onnx_vs_torch_repeats']})" if "served_onnx_vs_torch_speedup" in res else "")
          + f"; swap load p50 {res['swap_load_s_p50']} s (max {res['swap_load_s_max']}); p99 while swapping / steady "
          f"{res['swap_p99_over_steady_p99']}x, worst / steady p99 {res['swap_max_over_steady_p99']}x")
    if "control_max_latency_ms" in res:
        print(f"worst request without swaps, same load and length ({res['control_seconds']} s): "
              f"{res['control_max_latency_ms']} ms ({res['control_max_over_steady_p99']}x); requests over 3x the "
              f"steady p99: {res['swap_requests_over_3x']} of {res['swap_requests']} during swaps, "
              f"{res['control_requests_over_3x']} of {res['control_requests']} without")
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
