"""Drift-detection bench on the four-domain sentiment corpus (movie, tweets, amazon, nyt).

Per trial and reference domain: shuffle the domain, take disjoint slices for (a) the stand-in champion
(a TF-IDF logistic regression for probabilities, TF-IDF+SVD for embeddings; or ``--student DIR``: the real
student's ``predict_proba``/``embed``), (b) the reference (what the champion was "distilled on", scored
out-of-sample), (c) the held-out pool that null windows are drawn from. Then:

- null: one window of ``--window`` texts from (c): any alarm is a false alarm;
- drift: for every other domain, windows of the new domain until the checks flag one (detection) and
  until the default trigger (k of n, cool-down) acts;
- timing: ``run_checks`` on 10,000 reference vs 10,000 current texts (all domains mixed; the current side
  is resampled with replacement from the texts not in the reference, since the corpus has 19k).

Usage: ``.venv/bin/python bench/drift.py --out bench/results/drift.json [--trials 10] [--null-trials 60] [--student DIR]``
(the command and figures of record: bench/README.md)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from itertools import permutations

import numpy as np
import pandas as pd

from kdops import corpora
from monitoring import MonitorConfig, Trigger, TriggerConfig, profile_reference, run_checks, verdict

DOMAINS = tuple(corpora.SENTIMENT_DOMAINS)


class StandIn:
    """A champion stand-in fit on a slice of the reference domain: probabilities and 64-d embeddings."""

    def __init__(self, texts, labels, dims: int = 64, seed: int = 0):
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        self.vec = TfidfVectorizer(sublinear_tf=True, min_df=1).fit(texts)
        X = self.vec.transform(texts)
        self.svd = TruncatedSVD(n_components=min(dims, X.shape[1] - 1), random_state=seed).fit(X)
        self.clf = LogisticRegression(max_iter=500).fit(X, labels)

    def score(self, texts):
        X = self.vec.transform(texts)
        return self.clf.predict_proba(X), self.svd.transform(X)


class Student:
    """The real student: its own probabilities and sentence embeddings, cached per text."""

    def __init__(self, directory):
        from kdops.predict import Predictor

        self.p, self.cache = Predictor.from_dir(directory), {}

    def score(self, texts):
        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if todo:
            for t, p, e in zip(todo, self.p.predict_proba(todo), self.p.embed(todo)):
                self.cache[t] = (p, e)
        return np.stack([self.cache[t][0] for t in texts]), np.stack([self.cache[t][1] for t in texts])


def window_frame(texts, scorer) -> pd.DataFrame:
    probs, emb = scorer.score(list(texts))
    return pd.DataFrame({"text": list(texts), "probabilities": list(probs), "embedding": list(emb)})


def run(args) -> dict:
    rows = corpora.load("sentiment").rows
    by_domain = {d: rows[rows["domain"] == d].reset_index(drop=True) for d in DOMAINS}
    cfg, tcfg = MonitorConfig(window_size=args.window, seed=0), TriggerConfig()
    student = Student(args.student) if args.student else None
    null = {d: [] for d in DOMAINS}
    pairs = {f"{a}->{b}": {"flagged": [], "windows_to_detect": [], "windows_to_act": []}
             for a, b in permutations(DOMAINS, 2)}
    for trial in range(max(args.trials, args.null_trials)):
        switches = trial < args.trials  # later trials only add null windows: false alarms need many more samples
        rng = np.random.default_rng(1000 + trial)
        for ref_dom in DOMAINS:
            d = by_domain[ref_dom].iloc[rng.permutation(len(by_domain[ref_dom]))]
            champ, ref, pool = d.iloc[:args.champion], d.iloc[args.champion:args.champion + args.reference], \
                d.iloc[args.champion + args.reference:]
            scorer = student or StandIn(champ["text"].tolist(), champ["label"].tolist(), seed=trial)
            probs, emb = scorer.score(ref["text"].tolist())
            prof = profile_reference(ref["text"], cfg, probabilities=probs, embeddings=emb, label_names=("neg", "pos"))
            win = pool.iloc[rng.choice(len(pool), args.window, replace=False)]
            res = run_checks(prof, window_frame(win["text"], scorer), cfg)
            null[ref_dom].append({"fired": [r.name for r in res if r.fired], "decision": verdict(res).decision})
            for new_dom in DOMAINS:
                if new_dom == ref_dom or not switches:
                    continue
                src, trig, detect, act = by_domain[new_dom], Trigger(tcfg), None, None
                for w in range(1, args.max_windows + 1):  # traffic has switched: every window is the new domain
                    cur = src.iloc[rng.choice(len(src), args.window, replace=False)]
                    dec = verdict(run_checks(prof, window_frame(cur["text"], scorer), cfg)).decision
                    detect = detect or (w if dec != "ok" else None)
                    act = act or (w if trig.update(dec) != "ok" else None)
                    if act:
                        break
                p = pairs[f"{ref_dom}->{new_dom}"]
                p["flagged"].append(detect == 1)
                p["windows_to_detect"].append(detect)
                p["windows_to_act"].append(act)
        print(f"trial {trial + 1}/{max(args.trials, args.null_trials)} done", flush=True)

    # Timing: 10k vs 10k, all domains mixed.
    rng = np.random.default_rng(7)
    perm = rng.permutation(len(rows))
    ref_t = rows.iloc[perm[:10_000]]["text"].tolist()
    rest = rows.iloc[perm[10_000:]]["text"].to_numpy()
    cur_t = rest[rng.choice(len(rest), 10_000, replace=True)].tolist()
    all_rows = rows.iloc[perm[:2000]]
    scorer = student or StandIn(all_rows["text"].tolist(), all_rows["label"].tolist())
    big = MonitorConfig(window_size=10_000, max_reference=10_000)
    probs, emb = scorer.score(ref_t)
    t0 = time.perf_counter()
    prof = profile_reference(ref_t, big, probabilities=probs, embeddings=emb, label_names=("neg", "pos"))
    profile_s = time.perf_counter() - t0
    cur = window_frame(cur_t, scorer)
    t0 = time.perf_counter()
    run_checks(prof, cur, big)
    check_s = time.perf_counter() - t0

    n_null = sum(len(v) for v in null.values())
    false_alarms = sum(x["decision"] != "ok" for v in null.values() for x in v)
    detail = {k: {"detection_rate": float(np.mean(v["flagged"])),
                  "windows_to_detect_mean": float(np.mean([x or args.max_windows + 1 for x in v["windows_to_detect"]])),
                  "windows_to_act_mean": float(np.mean([x or args.max_windows + 1 for x in v["windows_to_act"]])),
                  "trials": len(v["flagged"])} for k, v in pairs.items()}
    return {
        "detection_rate": float(np.mean([x for v in pairs.values() for x in v["flagged"]])),
        "detection_rate_min_pair": min(v["detection_rate"] for v in detail.values()),
        "false_alarm_rate": false_alarms / n_null,
        "false_alarms": false_alarms, "null_windows": n_null,
        "false_alarm_rate_per_domain": {d: float(np.mean([x["decision"] != "ok" for x in v])) for d, v in null.items()},
        "null_fired_tests": sorted({n for v in null.values() for x in v for n in x["fired"]}),
        "windows_to_detect": max(v["windows_to_detect_mean"] for v in detail.values()),
        "windows_to_act": max(v["windows_to_act_mean"] for v in detail.values()),
        "check_seconds": check_s, "profile_seconds_10k": profile_s,
        "per_pair": detail,
        "setup": {"window": args.window, "reference": args.reference, "champion_slice": args.champion,
                  "trials": args.trials, "null_trials": max(args.trials, args.null_trials), "alpha_per_test": cfg.alpha, "n_tests": cfg.n_tests,
                  "false_alarm_budget": cfg.false_alarm_budget, "trigger": asdict(tcfg),
                  "embeddings": f"student {args.student}" if args.student else "stand-in: TF-IDF + TruncatedSVD(64)",
                  "probabilities": f"student {args.student}" if args.student else "stand-in: TF-IDF logistic regression",
                  "disagreement": "not run (no teacher in the bench; its alpha share stays reserved)"},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="Where to write the JSON results.")
    ap.add_argument("--trials", type=int, default=10, help="Trials per reference domain with switches to the 3 other domains.")
    ap.add_argument("--null-trials", type=int, default=60, help="Trials per reference domain for null windows (>= --trials).")
    ap.add_argument("--window", type=int, default=500, help="Texts per window.")
    ap.add_argument("--reference", type=int, default=1500, help="Reference texts per trial (nyt has 2,788 in all).")
    ap.add_argument("--champion", type=int, default=500, help="Texts the stand-in champion is fit on (disjoint).")
    ap.add_argument("--max-windows", type=int, default=4, help="Windows of the new domain drawn at most per switch.")
    ap.add_argument("--student", default=None, help="A saved student directory: use its probabilities and embeddings.")
    args = ap.parse_args()
    out = run(args)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\n{'pair':<16}{'detected':>10}{'win->detect':>13}{'win->act':>10}")
    for k, v in out["per_pair"].items():
        print(f"{k:<16}{v['detection_rate']:>10.2f}{v['windows_to_detect_mean']:>13.2f}{v['windows_to_act_mean']:>10.2f}")
    print(f"\ndetection_rate {out['detection_rate']:.3f}  false_alarm_rate {out['false_alarm_rate']:.4f} "
          f"({out['false_alarms']}/{out['null_windows']})  check_seconds(10k vs 10k) {out['check_seconds']:.2f}  "
          f"embeddings: {out['setup']['embeddings']}")


if __name__ == "__main__":
    main()
