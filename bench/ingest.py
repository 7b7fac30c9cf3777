"""Ingest at scale (#21): peak memory and speed of ``kdops.data.ingest`` on a generated CSV of short texts.

The CSV is seeded and made of real sentences: each text joins the first part of one sentence of the
four-domain sentiment corpus to the last part of another (label and domain from the first), so the texts read
like reviews and tweets and are almost all distinct; timestamps are ISO strings. A few rows of every kind of
bad are mixed in: exact duplicates (near and far back), empty texts, unknown labels, wrong field counts,
undecodable bytes, texts that span lines, and ``--oversized`` texts longer than the CSV parser's field limit.

Each ingest runs in a child process; the parent reads the child's peak resident memory from ``os.wait4``
(``ru_maxrss``). The old implementation (``kdops/data.py`` at ``--baseline-rev``, which read the whole file
into memory) runs on a smaller file (``--baseline-mb``, without the over-long texts, which it refuses whole),
and so does the new one: their snapshot ids must match. Then the new one ingests the full-size file.

Usage: ``.venv/bin/python bench/ingest.py --out bench/results/ingest.json [--size-mb 1024] [--baseline-mb 100]
[--workdir DIR] [--keep]`` (files go under a temporary directory, removed afterwards unless ``--keep``)
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BASELINE_REV = "bc86e581e6463b2ff130c76a9f62d0bfae769119"  # the last kdops/data.py that read whole files
LABELS = ("neg", "pos")
BAD_BYTES = "zzundecodablezz"  # replaced by invalid UTF-8 after the row is encoded


def generate(path: Path, size_mb: float, seed: int, oversized: int) -> dict:
    """Write the CSV; returns what went into it."""
    from kdops import corpora

    corpus = corpora.sentiment_frame()
    words = [t.split() for t in corpus["text"]]
    labels, domains = corpus["label"].tolist(), corpus["domain"].tolist()
    rng = np.random.default_rng(seed)
    target = int(size_mb * 2**20)
    at_oversized = set(rng.integers(1_000, max(1_001, target // 120), size=oversized).tolist())
    counts = dict.fromkeys(
        [
            "rows",
            "duplicates",
            "empty",
            "unknown_label",
            "wrong_fields",
            "undecodable",
            "multiline",
            "oversized",
        ],
        0,
    )
    recent: list[list[str]] = []
    early: list[list[str]] = []
    start = np.datetime64("2024-01-01T00:00:00")
    written, n = 0, 0
    with open(path, "wb") as fh:
        fh.write(b"text,label,domain,timestamp\n")
        while written < target:
            block = 10_000
            a, b = rng.integers(0, len(words), size=block), rng.integers(0, len(words), size=block)
            cut_a, cut_b, kind = rng.random(block), rng.random(block), rng.random(block)
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            for i in range(block):
                wa, wb = words[a[i]], words[b[i]]
                text = " ".join(wa[: max(1, int(len(wa) * cut_a[i]))] + wb[int(len(wb) * cut_b[i]) :])
                row = [text, labels[a[i]], domains[a[i]], str(start + np.timedelta64(n * 7, "s"))]
                k = kind[i]
                if n in at_oversized:
                    row[0] = ("a very long text " * 12_500)[:200_000]
                    counts["oversized"] += 1
                elif k < 0.004 and recent:
                    row = list(recent[int(k * 1e6) % len(recent)])
                    counts["duplicates"] += 1
                elif k < 0.005 and early:
                    row = list(early[int(k * 1e7) % len(early)])  # far back: another chunk
                    counts["duplicates"] += 1
                elif k < 0.006:
                    row[0] = " "
                    counts["empty"] += 1
                elif k < 0.007:
                    row[1] = "neutral"
                    counts["unknown_label"] += 1
                elif k < 0.0075:
                    row.append("surplus")
                    counts["wrong_fields"] += 1
                elif k < 0.008:
                    row[0] = f"{text} {BAD_BYTES}"
                    counts["undecodable"] += 1
                elif k < 0.009:
                    row[0] = f"{text}\n{text}"
                    counts["multiline"] += 1
                w.writerow(row)
                if len(recent) < 1_000:
                    recent.append(row)
                else:
                    recent[n % 1_000] = row
                if len(early) < 1_000 and len(row) == 4:
                    early.append(row)
                n += 1
            data = buf.getvalue().encode("utf-8").replace(BAD_BYTES.encode(), b"\xff\xfe bad")
            fh.write(data)
            written += len(data)
    counts["rows"] = n
    counts["bytes"] = path.stat().st_size
    return counts


def child(args) -> None:
    """Run one ingest in this process and write what it did as JSON."""
    import resource

    if args.module:
        spec = importlib.util.spec_from_file_location("kdops_data_baseline", args.module)
        data = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = data  # dataclasses look their module up while the class is made
        spec.loader.exec_module(data)
    else:
        from kdops import data
    import pandas as pd

    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    snap, rep = data.ingest(Path(args.input), data.DataSchema(labels=LABELS), Path(args.store))
    seconds = time.perf_counter() - t0
    out = {
        "seconds": seconds,
        "snapshot_id": snap.id,
        "kept": rep.kept,
        "quarantined": rep.quarantined,
        "reasons": rep.reasons,
        "rss_after_imports_mb": rss_imports,
        "peak_rss_ingest_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "pandas": pd.__version__,
        "rows_in_memory": getattr(snap, "_rows", True) is not None,
    }
    if args.child_load_rows and not out["rows_in_memory"]:
        # What a caller that asks for all rows of the snapshot pays: pandas 3 keeps them as Arrow strings.
        t0 = time.perf_counter()
        n = len(snap.rows)
        out |= {
            "load_rows_seconds": time.perf_counter() - t0,
            "loaded_rows": n,
            "peak_rss_with_rows_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    Path(args.result).write_text(json.dumps(out))


def run_child(impl: str, csv_path: Path, work: Path, module: Path | None, load_rows: bool = False) -> dict:
    store, result = Path(tempfile.mkdtemp(dir=work, prefix=f"store-{impl}-")), work / f"result-{impl}.json"
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--input",
        str(csv_path),
        "--store",
        str(store),
        "--result",
        str(result),
    ]
    if module:
        cmd += ["--module", str(module)]
    if load_rows:
        cmd += ["--child-load-rows"]
    t0 = time.perf_counter()
    with open(work / f"log-{impl}.txt", "w") as log:
        p = subprocess.Popen(
            cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    # peak_rss_mb: the whole child (os.wait4); peak_rss_ingest_mb: until ingest() returned (its own count)
    out = {
        "impl": impl,
        "file_mb": round(csv_path.stat().st_size / 2**20, 1),
        "exit_code": p.returncode,
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "peak_rss_ingest_mb": round(usage.ru_maxrss / 1024, 1),
        "wall_seconds": round(wall, 1),
    }
    if p.returncode == 0:
        r = json.loads(result.read_text())
        rows = r["kept"] + r["quarantined"]
        out.update(
            r,
            rows=rows,
            rows_per_s=round(rows / r["seconds"]),
            mb_per_s=round(out["file_mb"] / r["seconds"], 2),
        )
        out["peak_rss_ingest_mb"] = round(r["peak_rss_ingest_mb"], 1)
    else:
        out["log_tail"] = (work / f"log-{impl}.txt").read_text()[-2000:]
    shutil.rmtree(store, ignore_errors=True)
    return out


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="kdops-bench-ingest-", dir=args.workdir))
    try:
        results, files = [], {}
        if args.baseline_mb > 0:
            small = work / f"ingest-{args.baseline_mb:g}mb.csv"
            files["baseline"] = generate(small, args.baseline_mb, args.seed, oversized=0)
            old = work / "data_baseline.py"
            old.write_text(
                subprocess.run(
                    ["git", "show", f"{args.baseline_rev}:kdops/data.py"],
                    cwd=ROOT,
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
            )
            for impl, module in (("old", old), ("new", None)):
                results.append(run_child(impl, small, work, module) | {"file": "baseline"})
                print(
                    f"{impl} on {results[-1]['file_mb']} MB: {results[-1].get('seconds', 0):.1f} s",
                    flush=True,
                )
            small.unlink()
        big = work / f"ingest-{args.size_mb:g}mb.csv"
        files["full"] = generate(big, args.size_mb, args.seed, oversized=args.oversized)
        print(
            f"generated {files['full']['bytes'] / 2**20:.0f} MB, {files['full']['rows']:,} rows", flush=True
        )
        results.append(run_child("new", big, work, None, load_rows=args.load_rows) | {"file": "full"})
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    base = [r for r in results if r["file"] == "baseline"]
    full = results[-1]
    out = {
        "bench": "ingest",
        "command": " ".join([Path(sys.executable).name, "bench/ingest.py"] + sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "baseline_rev": args.baseline_rev,
        "files": files,
        "runs": results,
        "snapshot_ids_match": len(base) == 2
        and None is not base[0].get("snapshot_id") == base[1].get("snapshot_id"),
        "target": {
            "peak_rss_mb_max": 2048,
            "file_mb_min": 1000,
            "met": full["exit_code"] == 0 and full["file_mb"] >= 1000 and full["peak_rss_ingest_mb"] < 2048,
        },
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/ingest.json", help="Where to write the JSON results.")
    ap.add_argument("--size-mb", type=float, default=1024, help="Size of the file the new ingest reads.")
    ap.add_argument(
        "--baseline-mb", type=float, default=100, help="Size of the file both implementations read (0: skip)."
    )
    ap.add_argument("--baseline-rev", default=BASELINE_REV, help="Git revision of the old kdops/data.py.")
    ap.add_argument(
        "--oversized", type=int, default=3, help="Texts of 200,000 characters in the full-size file."
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--workdir", default=None, help="Where the temporary files go (default: the system's temp dir)."
    )
    ap.add_argument("--keep", action="store_true", help="Keep the generated files.")
    ap.add_argument(
        "--no-load-rows",
        dest="load_rows",
        action="store_false",
        help="Skip reading the full-size snapshot's rows back after the ingest (reported apart).",
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--module", help=argparse.SUPPRESS)
    ap.add_argument("--child-load-rows", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    out = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    head = ("impl", "file MB", "rows", "kept", "seconds", "rows/s", "MB/s", "peak RSS MB", "snapshot")
    print("\n" + "".join(f"{h:>{w}}" for h, w in zip(head, (4, 9, 12, 12, 9, 10, 7, 13, 18))))
    for r in out["runs"]:
        snapshot = r.get("snapshot_id", f"exit {r['exit_code']}")
        print(
            f"{r['impl']:>4}{r['file_mb']:>9.0f}{r.get('rows', 0):>12,}{r.get('kept', 0):>12,}"
            f"{r.get('seconds', 0):>9.1f}{r.get('rows_per_s', 0):>10,}{r.get('mb_per_s', 0):>7.2f}"
            f"{r['peak_rss_ingest_mb']:>13,.0f}{snapshot:>18}"
        )
    full = out["runs"][-1]
    if "peak_rss_with_rows_mb" in full:
        print(
            f"\nreading all {full['loaded_rows']:,} rows of that snapshot back (Snapshot.rows): "
            f"{full['load_rows_seconds']:.1f} s, peak RSS {full['peak_rss_with_rows_mb']:,.0f} MB"
        )
    print(
        f"\nold and new snapshot ids match: {out['snapshot_ids_match']}; "
        f"peak RSS < 2 GB on >= 1 GB: {'met' if out['target']['met'] else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
