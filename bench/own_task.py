"""Bring your own labelled task: teacher fine-tuned on your labels, student distilled from it, both scored (on demand).

    python bench/own_task.py --data my.csv --text-column body --label-column y --out out/my.json
    python bench/own_task.py --corpus questions --out bench/results/own_task/questions.json
    python bench/own_task.py --corpus sentiment:movie --out bench/results/own_task/movie.json
    python bench/own_task.py --corpus questions --limit 600 --out out/smoke.json     # a smoke run

On any labelled table: a seeded 80/20 split; the shipped MiniLM fine-tuned on the 80 % (``train_teacher``, early
stopping on a seeded 10 % of it); teacher soft labels cached; a student distilled with a named recipe
(``kdops.rounds.run_round``); both scored on the held-out 20 %; CPU speed of both measured in this run,
alternating. Everything lives in a fresh KDOPS_HOME (a temporary directory unless ``--home``). Prints a table and
writes JSON with each target's value and met / not met.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

TARGETS = {"retention": 0.97, "param_ratio": 0.25, "cpu_speedup_batch1": 4.0, "cpu_speedup_batch32": 4.0,
           "total_seconds": 1200.0}


def load_rows(args) -> tuple[pd.DataFrame, list[str], int]:
    """(rows with text, label, domain; label names; quarantined row count) from --data or --corpus."""
    from kdops import corpora
    from kdops.data import DataError, DataSchema, read_table, validate

    if args.corpus:
        name, _, domain = args.corpus.partition(":")
        snap = corpora.load(name, domains=(domain,) if domain else None)
        rows, labels, bad = snap.rows, list(snap.labels), 0
    else:
        df, unreadable = read_table(args.data)
        schema = DataSchema(text_column=args.text_column, label_column=args.label_column, domain_column=None,
                            timestamp_column=None, require_labels=True)
        rows, quarantined = validate(df.drop(columns=["_line"], errors="ignore"), schema, source=str(args.data))
        bad = len(quarantined) + len(unreadable)
        labels = sorted(rows["label"].unique())
    if args.limit and args.limit < len(rows):
        rows = rows.sample(n=args.limit, random_state=args.seed)
    rows = rows.reset_index(drop=True)
    if rows["label"].nunique() < 2:
        raise DataError(f"{args.data or args.corpus}: fewer than 2 labels among {len(rows)} usable rows.")
    return rows[["id", "text", "label", "domain"]].assign(domain=rows["domain"].fillna("all")), labels, bad


def split(rows: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Seeded (train, val, test): test is 20 % of the rows, val 10 % of the remaining 80 %."""
    perm = np.random.default_rng(seed).permutation(len(rows))
    n_test = round(0.2 * len(rows))
    rest = perm[n_test:]
    n_val = round(0.1 * len(rest))
    return rows.iloc[rest[n_val:]], rows.iloc[rest[:n_val]], rows.iloc[perm[:n_test]]


def cpu_speed(teacher, student, sample: list[str], repeats: int) -> dict:
    """Median latency at batch 1 and throughput at batch 32 of teacher and student (tokenise + forward, same
    harness), ``repeats`` times with the order flipped each repeat, so load on the box hits both."""
    from kdops.evaluate import measure_speed

    fns = {"teacher": lambda x: teacher.logits(x), "student": None}
    out: dict = {}
    for b in (1, 32):
        fns["student"] = lambda x, b=b: student.predict_proba(x, batch_size=b)
        runs: dict = {"teacher": [], "student": []}
        for r in range(repeats):
            for name in ("teacher", "student") if r % 2 == 0 else ("student", "teacher"):
                runs[name].append(measure_speed(fns[name], sample, b, max_seconds=6))
        for name, rs in runs.items():
            out[f"{name}_p50_ms_batch{b}"] = float(np.median([x["p50_ms"] for x in rs]))
            out[f"{name}_throughput_batch{b}"] = float(np.median([x["throughput"] for x in rs]))
            out[f"{name}_throughput_batch{b}_repeats"] = [round(x["throughput"], 1) for x in rs]
    out["cpu_speedup_batch1"] = out["teacher_p50_ms_batch1"] / out["student_p50_ms_batch1"]
    out["cpu_speedup_batch32"] = out["student_throughput_batch32"] / out["teacher_throughput_batch32"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="A labelled CSV / JSONL / Parquet file.")
    src.add_argument("--corpus", help="A built-in corpus instead: 'questions' or 'sentiment:DOMAIN'.")
    ap.add_argument("--text-column", default="text", help="Column with the text (--data).")
    ap.add_argument("--label-column", default="label", help="Column with the label (--data).")
    ap.add_argument("--out", type=Path, required=True, help="Where to write the JSON results.")
    ap.add_argument("--limit", type=int, default=None, help="Seeded subsample of this many rows (smoke runs).")
    ap.add_argument("--home", type=Path, default=None, help="KDOPS_HOME to use (kept); default a temporary one (removed).")
    ap.add_argument("--recipe", default="classifier-own", help="Named recipe of the distillation (kdops/recipes.py).")
    ap.add_argument("--teacher-epochs", type=float, default=4, help="Most epochs of teacher fine-tuning (early stopping).")
    ap.add_argument("--teacher-lr", type=float, default=1e-4, help="Peak learning rate of teacher fine-tuning.")
    ap.add_argument("--teacher-patience", type=int, default=1, help="Teacher checks without a gain before stopping.")
    ap.add_argument("--epochs", type=int, default=None, help="Student epochs (default: the recipe's).")
    ap.add_argument("--seed", type=int, default=13, help="Seed of the split, the subsample and training.")
    ap.add_argument("--speed-repeats", type=int, default=3, help="Alternating repeats of each speed measurement (median).")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the speed measurement (default: the machine's cores).")
    ap.add_argument("--train-threads", type=int, default=None,
                    help="torch threads while training and labelling (default: --threads; 1 is faster on an oversubscribed box).")
    args = ap.parse_args()
    torch.set_num_threads(args.train_threads or args.threads)
    temp_home = args.home is None
    root = Path(tempfile.mkdtemp(prefix="kdops-own-task-")) if temp_home else args.home.resolve()
    os.environ["KDOPS_HOME"] = str(root)  # before any kdops call reads it: nothing leaks into another home
    try:
        res = run(args, root)
    finally:
        if temp_home:
            shutil.rmtree(root, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, default=float))
    print_table(res)
    print(f"\nwrote {args.out}")


def run(args, root: Path) -> dict:
    from dataclasses import asdict, replace

    from kdops.evaluate import evaluate
    from kdops.predict import Predictor
    from kdops.recipes import recipe
    from kdops.rounds import run_round
    from kdops.soft_labels import SoftLabelCache
    from kdops.teacher import HFTeacher, TeacherTrainConfig, train_teacher

    t_all = time.perf_counter()
    res: dict = {"source": str(args.data or f"corpus:{args.corpus}"), "command": " ".join(sys.argv),
                 "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "train_threads": torch.get_num_threads(),
                             "python": sys.version.split()[0], "load_average_start": os.getloadavg()}}
    seconds: dict = {}
    rows, labels, quarantined = load_rows(args)
    train, val, test = split(rows, args.seed)
    res["labels"] = labels
    res["rows"] = {"usable": len(rows), "quarantined": quarantined, "train": len(train), "val": len(val), "test": len(test),
                   "per_label": {k: int(v) for k, v in rows["label"].value_counts().sort_index().items()}}
    print(f"{res['source']}: {len(rows)} rows, labels {labels}; train {len(train)}, val {len(val)}, test {len(test)}")

    t0 = time.perf_counter()
    tcfg = TeacherTrainConfig(epochs=args.teacher_epochs, lr=args.teacher_lr, patience=args.teacher_patience,
                              seed=args.seed, limit_per_domain=None)
    tres = train_teacher(root / "teachers" / "own-task", train, labels, tcfg, val_rows=val)
    seconds["teacher"] = time.perf_counter() - t0
    res["teacher_train"] = {"config": asdict(tcfg), "history": tres.history, "best_val_accuracy": tres.best_val_accuracy,
                            "seconds": tres.seconds, "cached": tres.cached}

    t0 = time.perf_counter()
    teacher = HFTeacher(tres.path)
    cache = SoftLabelCache(root / "soft_labels.sqlite")
    t_test = cache.get_or_compute(teacher, test["text"].tolist(), progress=True)
    cache.get_or_compute(teacher, pd.concat([train, val])["text"].tolist(), progress=True)
    seconds["soft_labels"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rec = recipe(args.recipe)
    cfg = replace(rec.distill, seed=args.seed, compile="no", **({"epochs": args.epochs} if args.epochs else {}))
    rr = run_round(teacher, cache, train, root / "students" / "own-task", cfg, val_rows=val, shape=rec.shape)
    seconds["distill"] = time.perf_counter() - t0
    res["recipe"] = rec.name
    res["recipe_config"] = rec.to_dict() | {"distill": cfg.to_dict()}
    res["student_history"] = rr.result.history

    t0 = time.perf_counter()
    student = Predictor.from_dir(rr.artifact)
    rep = evaluate(student, test, t_test, labels, speed=False, robustness=False, teacher_params=teacher.num_parameters())
    seconds["evaluate"] = time.perf_counter() - t0
    res.update(teacher_accuracy=rep.teacher["accuracy"], student_accuracy=rep.overall["accuracy"], retention=rep.retention,
               macro_f1_teacher=rep.teacher["macro_f1"], macro_f1_student=rep.overall["macro_f1"], agreement=rep.agreement,
               teacher_params=rep.params["teacher"], student_params=rep.params["student"], param_ratio=rep.params["ratio"])
    seconds["pipeline_total"] = time.perf_counter() - t_all

    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    res["machine"]["speed_threads"] = torch.get_num_threads()
    res.update(cpu_speed(teacher, student, test["text"].tolist()[:256], args.speed_repeats))
    seconds["speed"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_all
    res["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    res["machine"]["load_average_end"] = os.getloadavg()
    res["targets"] = {
        "retention >= 0.97": [res["retention"], res["retention"] >= TARGETS["retention"]],
        "param_ratio <= 0.25": [res["param_ratio"], res["param_ratio"] <= TARGETS["param_ratio"]],
        "cpu_speedup_batch1 >= 4": [res["cpu_speedup_batch1"], res["cpu_speedup_batch1"] >= TARGETS["cpu_speedup_batch1"]],
        "cpu_speedup_batch32 >= 4": [res["cpu_speedup_batch32"], res["cpu_speedup_batch32"] >= TARGETS["cpu_speedup_batch32"]],
        "total seconds <= 1200": [res["seconds"]["total"], res["seconds"]["total"] <= TARGETS["total_seconds"]],
    }
    return res


def print_table(res: dict) -> None:
    s = res["seconds"]
    rows = [("source", res["source"]), ("rows (train / val / test)", f"{res['rows']['train']} / {res['rows']['val']} / {res['rows']['test']}"),
            ("labels", ", ".join(res["labels"])), ("recipe", res["recipe"]),
            ("teacher accuracy / macro-F1", f"{res['teacher_accuracy']:.4f} / {res['macro_f1_teacher']:.4f}"),
            ("student accuracy / macro-F1", f"{res['student_accuracy']:.4f} / {res['macro_f1_student']:.4f}"),
            ("retention", f"{res['retention']:.4f}"),
            ("params student / teacher", f"{res['student_params']:,} / {res['teacher_params']:,} = {res['param_ratio']:.3f}"),
            ("cpu speedup batch 1 (p50 latency)", f"{res['cpu_speedup_batch1']:.2f}x ({res['teacher_p50_ms_batch1']:.1f} -> {res['student_p50_ms_batch1']:.1f} ms)"),
            ("cpu speedup batch 32 (throughput)", f"{res['cpu_speedup_batch32']:.2f}x ({res['teacher_throughput_batch32']:.0f} -> {res['student_throughput_batch32']:.0f} texts/s)"),
            ("seconds teacher / soft labels / distill / evaluate", f"{s['teacher']:.0f} / {s['soft_labels']:.0f} / {s['distill']:.0f} / {s['evaluate']:.0f}"),
            ("seconds speed / total", f"{s['speed']:.0f} / {s['total']:.0f}"),
            ("load average start / end", f"{res['machine']['load_average_start'][0]:.1f} / {res['machine']['load_average_end'][0]:.1f}")]
    w = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows))
    print("\ntargets:")
    for k, (v, ok) in res["targets"].items():
        print(f"  {'MET ' if ok else 'MISS'}  {k}: {v:.4f}")


if __name__ == "__main__":
    main()
