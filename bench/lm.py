"""Benchmark: distil SmolLM2-135M-Instruct into a layer-pruned student on movie-review sentences.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/lm.py --out bench/results/lm.json --threads 2   # recipe lm-full: about 1 h on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python bench/lm.py --recipe lm-quick --out out/lm_quick.json   # the quick recipe

Target (CPU): student <= 40% of the teacher's parameters, perplexity <= 1.15x the teacher's on held-out
movie-review sentences (the corpus' fixed test split), >= 2.5x the teacher's generation speed.
The command and figures of record: bench/README.md.
The student is trained on the corpus' movie *train* split (in-domain KD + CE); the teacher is the general
instruct model as shipped, so the comparison is "in-domain specialist student vs general teacher".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def with_overrides(args):
    """The named recipe with the fields given on the command line replaced (kdops/recipes.py holds the defaults)."""
    from dataclasses import replace

    from kdops.recipes import LMRecipe, recipe

    r = recipe(args.recipe)
    if not isinstance(r, LMRecipe):
        raise SystemExit(f"recipe {args.recipe!r} is not a causal-LM recipe")

    def given(**kw):
        return {k: v for k, v in kw.items() if v is not None}

    trim = given(trim_vocab=None if args.trim_vocab == -1 else args.trim_vocab) if args.trim_vocab is not None else {}
    return replace(
        r, max_length=args.max_length or r.max_length, train_sentences=args.train_sentences or r.train_sentences,
        distill=replace(r.distill, seed=args.seed, **given(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, alpha=args.alpha, kd_mode=args.kd_mode,
            topk=args.topk, kd_residual=args.kd_residual, seq_kd_weight=args.seq_kd_weight,
            freeze_embeddings=args.freeze_embeddings)),
        shape=replace(r.shape, **trim, **given(layers=args.layers, strategy=args.strategy, vocab_share=args.vocab_share,
                                               tail_rank=args.tail_rank, intermediate=args.intermediate)),
        tail=replace(r.tail, **given(rank=args.tail_rank, calibration_fraction=args.calibration_fraction,
                                     calibration_max=args.calibration_max, holdout=args.calibration_holdout,
                                     steps=args.tail_steps)))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="Where to write the JSON report.")
    ap.add_argument("--recipe", default="lm-full", help="Named recipe (kdops/recipes.py); the options below override its fields.")
    ap.add_argument("--layers", type=int, default=None, help="Teacher layers the student keeps (of 30).")
    ap.add_argument("--intermediate", type=int, default=None,
                    help="MLP neurons each kept layer keeps, the most active on the training text.")
    ap.add_argument("--strategy", default=None, choices=["influence", "first_last", "first", "even"],
                    help="Which teacher layers to keep (influence: the most influential on the training text).")
    ap.add_argument("--trim-vocab", type=int, default=None,
                    help="Trim the vocabulary to ids seen in training + the first N ids (-1: the full vocabulary).")
    ap.add_argument("--vocab-share", type=float, default=None,
                    help="Trimmed vocabulary: keep the ids of this share of the training text (the rest trains <other>).")
    ap.add_argument("--train-sentences", type=int, default=None, help="Movie train sentences (seeded sample; 8029 = all).")
    ap.add_argument("--eval-sentences", type=int, default=100, help="Held-out movie test sentences.")
    ap.add_argument("--monitor-sentences", type=int, default=200,
                    help="The movie test sentences after the scored ones whose perplexity is followed during training "
                         "(the JSON's round.heldout_curve; not trained on, not scored, not used for any choice).")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--alpha", type=float, default=None, help="CE weight (1 - alpha on token KD).")
    ap.add_argument("--kd-mode", default=None, choices=["forward", "reverse", "jsd"])
    ap.add_argument("--topk", type=int, default=None)
    ap.add_argument("--kd-residual", action=argparse.BooleanOptionalAction, default=None,
                    help="Token KD over the top-k plus a slot for the rest of the vocabulary (LMDistillConfig.kd_residual).")
    ap.add_argument("--seq-kd-weight", type=float, default=None)
    ap.add_argument("--tail-rank", type=int, default=None,
                    help="Rank of the context tail (kdops.lm.tail.TailHead) fitted on held-out text; 0: context-free tail only.")
    ap.add_argument("--calibration-fraction", type=float, default=None,
                    help="Share of the training sentences the context tail is fitted on.")
    ap.add_argument("--calibration-max", type=int, default=None,
                    help="At most this many sentences for the context tail.")
    ap.add_argument("--tail-steps", type=int, default=None, help="Adam steps fitting the context tail (TailConfig.steps).")
    ap.add_argument("--calibration-holdout", action=argparse.BooleanOptionalAction, default=None,
                    help="Hold those sentences out of distillation (and follow the student's perplexity on them).")
    # Trainable by default: trimmed (~23k rows) it is cheap; untrimmed, the tied 49,152 x 576 embedding's dense
    # gradient and AdamW update dominate a CPU step.
    ap.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction, default=None,
                    help="Keep the tied embedding/LM head fixed (cheaper steps).")
    ap.add_argument("--max-length", type=int, default=None, help="Token limit per sentence (start token included).")
    # One thread: on a shared 2-core machine two OpenMP threads spin-wait on each other under other load; raise
    # it on a machine of your own.
    ap.add_argument("--threads", type=int, default=1, help="torch threads for scoring and training.")
    ap.add_argument("--speed-threads", type=int, default=1, help="torch threads in the speed subprocesses.")
    ap.add_argument("--speed-rounds", type=int, default=3,
                    help="Passes over the prompts in the paired speed measurement (teacher and student alternate "
                         "prompt by prompt in one process; kdops.lm.evaluate.measure_generation_paired).")
    ap.add_argument("--student-dir", default=None,
                    help="Where the student goes (default: <KDOPS_HOME>/students/smollm2-movie-lm-<--out's file stem>, "
                         "so one run does not overwrite another's student).")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=13)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from kdops import corpora
    from kdops.lm.cache import LMSoftLabelCache
    from kdops.lm.evaluate import LMEvalConfig
    from kdops.lm.rounds import evaluate_lm, run_lm_round
    from kdops.lm.teacher import HFCausalLMTeacher, smollm2_dir
    from kdops.paths import home, subdir

    r = with_overrides(args)

    torch.set_num_threads(args.threads)
    t_start = time.time()
    tdir = smollm2_dir()
    teacher = HFCausalLMTeacher(tdir, device=args.device)
    train = corpora.load("sentiment", split="train", domains=("movie",)).rows.sample(
        n=r.train_sentences, random_state=args.seed)
    test_all = corpora.load("sentiment", split="test", domains=("movie",)).rows
    test = test_all.head(args.eval_sentences)
    monitor = test_all.iloc[args.eval_sentences:args.eval_sentences + args.monitor_sentences]
    cfg, shape = r.distill, r.shape
    # The same round and evaluation the LM flow runs (kdops.lm.rounds); only the data choice is the bench's.
    out_dir = Path(args.student_dir) if args.student_dir else subdir("students") / f"smollm2-movie-lm-{Path(args.out).stem}"
    round_ = run_lm_round(teacher, LMSoftLabelCache(home() / "lm_soft_labels.sqlite"), train["text"].tolist(), out_dir,
                          cfg, shape, r.max_length, device=args.device,
                          lineage={"train_sentences": len(train), "recipe": r.name}, tail=r.tail,
                          monitor_texts=monitor["text"].tolist())
    sdir, layers = round_.artifact, round_.info["layers"]
    report = evaluate_lm(sdir, teacher, {"movie": test["text"].tolist()}, r.max_length, speed=True,
                         eval_cfg=LMEvalConfig(threads=args.speed_threads, speed_rounds=args.speed_rounds),
                         device=args.device)
    summary = report.summary()
    summary["targets_met"] = {"params<=0.40": summary["param_ratio"] <= 0.40, "ppl_ratio<=1.15": summary["ppl_ratio"] <= 1.15,
                              "speedup>=2.5": summary["speedup"] >= 2.5}
    out = {**summary, "layers": layers, "args": vars(args), "recipe": r.to_dict(), "round": round_.info,
           "loss_first_last": [round_.history[0], round_.history[-1]], "report": report.to_dict(),
           "student_dir": str(sdir), "seconds": round(time.time() - t_start, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str))

    t, st = report.teacher, report.student
    rows = [("perplexity (movie test)", t["ppl"], st["ppl"], summary["ppl_ratio"]),
            ("generation tokens/s", t["tokens_per_s"], st["tokens_per_s"], summary["speedup"]),
            ("  each alone (own process)", t["tokens_per_s_alone"], st["tokens_per_s_alone"],
             st["tokens_per_s_alone"] / t["tokens_per_s_alone"]),
            ("parameters (M)", t["params"] / 1e6, st["params"] / 1e6, summary["param_ratio"]),
            ("peak memory (MB)", t["peak_mem_mb"], st["peak_mem_mb"], st["peak_mem_mb"] / max(t["peak_mem_mb"], 1e-9))]
    print(f"\n{'metric':<26}{'teacher':>12}{'student':>12}{'student/teacher':>18}")
    for name, t, s, r in rows:
        print(f"{name:<26}{t:>12.2f}{s:>12.2f}{r:>18.3f}")
    print(f"top-1 agreement {report.agreement_top1:.3f}; layers {layers}; targets {summary['targets_met']}; {out['seconds']:.0f} s")
    return out


if __name__ == "__main__":
    main()
