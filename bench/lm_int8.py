"""Benchmark (#23, LM student): torch dynamic INT8 on a causal-LM student's linear layers, against fp32, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/lm_int8.py --student STUDENT_DIR [--out bench/results/lm_int8.json]

The student is a saved kdops causal-LM artifact (``kdops.lm.student.load_lm_student``). A copy gets torch's
``quantize_dynamic(..., dtype=qint8)`` on every ``nn.Linear`` (``--keep-fp32`` exempts some by name): int8
weights, activations quantised per call, no calibration. Both models are measured in this one process:

- perplexity per domain and overall on the same held-out sentences (the corpus' fixed test split, the first
  ``--eval-sentences`` of each domain), tokenised as a round tokenises them (``kdops.lm.teacher.encode_texts``)
  and scored by ``kdops.lm.evaluate.perplexity`` over the full vocabulary;
- greedy generation tokens/s at batch 1 with the served decoding loop (``kdops.lm.decode``), prompts made as
  ``kdops.lm.rounds.evaluate_lm`` makes them, exactly ``--max-new-tokens`` per prompt (no EOS): ``--repeats``
  passes, fp32 and INT8 alternating prompt by prompt (who goes first alternates too); per pass each model's
  figure is its median per-prompt rate, and the pass's speedup is INT8 / fp32 of those;
- forward (scoring) tokens/s at batch ``--forward-batch``, alternating the same way.

Decision: keep INT8 only if no domain's perplexity (nor the overall one) rises by more than the LM gate's
champion tolerance (``LMGateThresholds.max_domain_ppl_increase`` of ``--recipe``; a miss is a drop, there is no
review band here), the generation speedup's median over the passes exceeds ``--min-speedup`` and every pass is
above 1. Speed is a ratio from one run: this VM's absolute speed moves between minutes (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DOMAINS = ("movie", "tweets", "amazon", "nyt")
MODELS = ("fp32", "int8")


def log(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:6.1f} s] {msg}", flush=True)


def quantize(student, keep_fp32: list[str], per_channel: bool):
    """An INT8 copy of ``student``: every ``nn.Linear`` whose name contains none of ``keep_fp32`` becomes a
    dynamic int8 linear (weights per tensor, or per output channel with ``per_channel``); the rest stays fp32."""
    import torch
    from torch import nn
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    spec = {n: qconfig for n, m in student.named_modules()
            if isinstance(m, nn.Linear) and not any(k in n for k in keep_fp32)}
    # a dict of module names selects exactly those; quantize_dynamic deep-copies first (inplace=False)
    return torch.ao.quantization.quantize_dynamic(student, spec, dtype=torch.qint8)


def linear_weight_mb(model) -> float:
    """MB held by the weights of the model's linear layers, float or dynamic-quantised (int8 + scales)."""
    import torch
    from torch import nn
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    total = 0
    for m in model.modules():
        if isinstance(m, QLinear):
            w = m.weight()
            scales = w.q_per_channel_scales().numel() if w.qscheme() == torch.per_channel_affine else 1
            total += w.numel() * w.element_size() + 8 * scales
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total / 2**20


def generator(student, max_new_tokens: int):
    """``gen(prompt ids) -> new ids (1, n)``: greedy, no EOS, ``<other>`` suppressed, as kdops.lm.evaluate times it."""
    import torch

    from kdops.lm.decode import decode

    def gen(p):
        ids = student.map_ids(torch.tensor([p]))
        return decode(student.model, ids, None, max_new_tokens, suppress_id=student.other_id)
    return gen


def timed(fn, *a) -> tuple[object, float]:
    t = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - t


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def order(k: int) -> tuple[str, str]:
    """Who goes first alternates, so a slow phase of the machine does not always land on the same model."""
    return MODELS if k % 2 == 0 else MODELS[::-1]


def score(models: dict, seqs: dict[str, list[list[int]]], pad_id: int, batch_size: int, t0: float) -> tuple[dict, dict]:
    """``(per domain {fp32, int8, ratio, tokens, sentences, seconds}, overall {fp32, int8})`` perplexities."""
    from kdops.lm.evaluate import perplexity

    by_domain, nll = {}, {name: 0.0 for name in MODELS}
    for d, s in seqs.items():
        row, secs = {}, {}
        for name in MODELS:
            row[name], secs[name] = timed(perplexity, models[name], s, pad_id, batch_size)
            nll[name] += row[name]["nll"] * row[name]["tokens"]
        n = row["fp32"]["tokens"]
        by_domain[d] = {"fp32": row["fp32"]["ppl"], "int8": row["int8"]["ppl"],
                        "ratio": row["int8"]["ppl"] / row["fp32"]["ppl"], "tokens": n, "sentences": len(s),
                        "seconds": {k: round(v, 1) for k, v in secs.items()}}
        log(f"perplexity {d}: fp32 {row['fp32']['ppl']:.3f}, int8 {row['int8']['ppl']:.3f} ({len(s)} sentences, "
            f"{n} tokens; {secs['fp32']:.1f} s / {secs['int8']:.1f} s)", t0)
    tokens = sum(v["tokens"] for v in by_domain.values())
    return by_domain, {name: math.exp(nll[name] / tokens) for name in MODELS} | {"tokens": tokens}


def speed(models: dict, prompts: list[list[int]], max_new_tokens: int, fwd: tuple | None, repeats: int,
          fwd_iters: int, t0: float) -> dict:
    """Generation (and forward) tokens/s per pass for both models, alternating; greedy outputs of the first pass."""
    import torch

    gens = {name: generator(models[name], max_new_tokens) for name in MODELS}
    gen_runs, fwd_runs = {n: [] for n in MODELS}, {n: [] for n in MODELS}
    outputs: dict[str, list[list[int]]] = {n: [] for n in MODELS}
    with torch.inference_mode():
        for name in MODELS:  # warm-up: first-call allocations and lazy initialisation are not speed
            gens[name](prompts[0])
            if fwd:
                models[name](*fwd)
        for r in range(repeats):
            rates = {n: [] for n in MODELS}
            for i, p in enumerate(prompts):
                for name in order(r + i):
                    new, dt = timed(gens[name], p)
                    rates[name].append(new.shape[1] / dt)
                    if r == 0:
                        outputs[name].append(new[0].tolist())
            for name in MODELS:
                gen_runs[name].append(statistics.median(rates[name]))
            msg = f"speed pass {r + 1}/{repeats}: generation fp32 {gen_runs['fp32'][-1]:.1f}, " \
                  f"int8 {gen_runs['int8'][-1]:.1f} tokens/s"
            if fwd:
                real, frates = int(fwd[1].sum()), {n: [] for n in MODELS}
                for it in range(fwd_iters):
                    for name in order(r + it):
                        frates[name].append(real / timed(models[name], *fwd)[1])
                for name in MODELS:
                    fwd_runs[name].append(statistics.median(frates[name]))
                msg += f"; forward fp32 {fwd_runs['fp32'][-1]:.0f}, int8 {fwd_runs['int8'][-1]:.0f} tokens/s"
            log(msg, t0)
    return {"gen": gen_runs, "fwd": fwd_runs if fwd else None, "outputs": outputs}


def main(argv: list[str] | None = None) -> dict:
    from kdops.lm.evaluate import LMEvalConfig

    ev = LMEvalConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True, help="A saved kdops causal-LM student directory (kdops.json inside).")
    ap.add_argument("--out", default="bench/results/lm_int8.json", help="Where to write the JSON report.")
    ap.add_argument("--domains", default=",".join(DOMAINS),
                    help="Comma-separated sentiment-corpus domains to score (test split).")
    ap.add_argument("--eval-sentences", type=int, default=100,
                    help="Held-out test sentences per domain (the first N).")
    ap.add_argument("--max-length", type=int, default=None,
                    help="Token limit per sentence, start token included (default: the artifact's max_length).")
    ap.add_argument("--batch-size", type=int, default=ev.batch_size, help="Sequences per forward pass when scoring.")
    ap.add_argument("--gen-prompts", type=int, default=ev.gen_prompts,
                    help="Prompts for the generation speed test (batch 1, one after another).")
    ap.add_argument("--gen-prompt-tokens", type=int, default=ev.gen_prompt_tokens,
                    help="Prompt length in tokens (start token included).")
    ap.add_argument("--max-new-tokens", type=int, default=ev.max_new_tokens,
                    help="New tokens per prompt (no EOS stop, so both models do equal work).")
    ap.add_argument("--repeats", type=int, default=ev.speed_rounds,
                    help="Speed passes; fp32 and INT8 alternate prompt by prompt within each pass.")
    ap.add_argument("--forward-batch", type=int, default=8,
                    help="Batch size of the forward-throughput test (0: skip it).")
    ap.add_argument("--forward-iters", type=int, default=3, help="Forward passes per model per speed pass.")
    # One thread: two OpenMP threads on a shared 2-core VM spin-wait on each other under other load.
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads for everything (scoring and speed).")
    ap.add_argument("--keep-fp32", default="",
                    help="Comma-separated substrings of linear-layer names to leave in fp32 (e.g. "
                         "'lm_head,down_proj'); default: none, every nn.Linear is quantised (the LM head included).")
    ap.add_argument("--per-channel", action="store_true",
                    help="Int8 weight scales per output channel instead of one per tensor "
                         "(torch's per_channel_dynamic_qconfig).")
    ap.add_argument("--recipe", default="lm-quick",
                    help="Named recipe whose LM gate supplies the perplexity tolerance (max_domain_ppl_increase).")
    ap.add_argument("--max-ppl-increase", type=float, default=None,
                    help="Largest relative perplexity rise allowed on any domain and overall "
                         "(default: the recipe's gate).")
    ap.add_argument("--min-speedup", type=float, default=1.1,
                    help="Median generation speedup INT8 / fp32 must exceed this (and every pass must exceed 1).")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()

    import torch

    from kdops import corpora
    from kdops.lm.student import load_lm_student
    from kdops.lm.teacher import encode_texts, pad_batch, start_token_id
    from kdops.recipes import recipe

    torch.set_num_threads(args.threads)
    tol = args.max_ppl_increase
    if tol is None:
        tol = recipe(args.recipe).gate.max_domain_ppl_increase
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    keep_fp32 = [k.strip() for k in args.keep_fp32.split(",") if k.strip()]

    log(f"loading {args.student}", t0)
    fp32, tok, art = load_lm_student(args.student)
    models = {"fp32": fp32, "int8": quantize(fp32, keep_fp32, args.per_channel).eval()}
    n_q = sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in models["int8"].modules())
    n_lin = sum(isinstance(m, torch.nn.Linear) for m in fp32.modules())
    mb = {name: linear_weight_mb(m) for name, m in models.items()}
    log(f"quantised {n_q} of {n_lin} linear layers (engine {torch.backends.quantized.engine}); "
        f"linear weights {mb['fp32']:.1f} MB -> {mb['int8']:.1f} MB", t0)

    max_length = args.max_length or art.max_length or 48
    start_id = start_token_id(fp32.config, tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else start_id
    test = corpora.load("sentiment", split="test", domains=tuple(domains)).rows
    seqs = {d: encode_texts(tok, start_id, test[test["domain"] == d]["text"].head(args.eval_sentences).tolist(),
                            max_length) for d in domains}
    by_domain, overall = score(models, seqs, pad_id, args.batch_size, t0)

    # prompts as evaluate_lm makes them: the first sequences, cut to the prompt length
    all_seqs = [s for d in domains for s in seqs[d]]
    prompts = [s[: args.gen_prompt_tokens] for s in all_seqs[: args.gen_prompts]]
    fwd = pad_batch(all_seqs[: args.forward_batch], pad_id) if args.forward_batch else None
    sp = speed(models, prompts, args.max_new_tokens, fwd, args.repeats, args.forward_iters, t0)

    speedups = [i / f for i, f in zip(sp["gen"]["int8"], sp["gen"]["fp32"])]
    outs = sp["outputs"]
    same = sum(a == b for x, y in zip(outs["fp32"], outs["int8"]) for a, b in zip(x, y))
    identical = sum(x == y for x, y in zip(outs["fp32"], outs["int8"]))

    ppl_ratio = overall["int8"] / overall["fp32"]
    worst_dom = max(by_domain, key=lambda d: by_domain[d]["ratio"])
    ppl_ok = max(ppl_ratio, by_domain[worst_dom]["ratio"]) <= 1 + tol
    speed_ok = statistics.median(speedups) > args.min_speedup and min(speedups) > 1.0
    reasons = [
        f"perplexity int8/fp32 overall {ppl_ratio:.4f}, worst domain {worst_dom} {by_domain[worst_dom]['ratio']:.4f} "
        f"(limit <= {1 + tol:.4f}, {args.recipe}'s gate max_domain_ppl_increase {tol}): "
        f"{'ok' if ppl_ok else 'missed'}",
        f"generation speedup median {statistics.median(speedups):.3f} over {len(speedups)} passes "
        f"(min {min(speedups):.3f}, max {max(speedups):.3f}; limit median > {args.min_speedup} and every pass > 1.0): "
        f"{'ok' if speed_ok else 'missed'}",
    ]
    decision = "keep" if ppl_ok and speed_ok else "drop"

    fwd_speedups = [i / f for i, f in zip(sp["fwd"]["int8"], sp["fwd"]["fp32"])] if fwd else []
    out = {
        "decision": decision, "reason": "; ".join(reasons),
        "fp32_ppl": overall["fp32"], "int8_ppl": overall["int8"], "ppl_ratio": ppl_ratio, "ppl_by_domain": by_domain,
        "fp32_tokens_per_s": statistics.median(sp["gen"]["fp32"]),
        "int8_tokens_per_s": statistics.median(sp["gen"]["int8"]),
        "speedup_median": statistics.median(speedups), "speedup_runs": speedups,
        "generation": {"fp32_tokens_per_s": spread(sp["gen"]["fp32"]), "int8_tokens_per_s": spread(sp["gen"]["int8"]),
                       "speedup": spread(speedups), "prompts": len(prompts), "prompt_tokens": args.gen_prompt_tokens,
                       "max_new_tokens": args.max_new_tokens, "batch": 1,
                       "greedy_token_match": same / max(1, sum(len(x) for x in outs["fp32"])),
                       "greedy_identical_prompts": identical},
        "forward": {"batch": args.forward_batch, "tokens": int(fwd[1].sum()),
                    "fp32_tokens_per_s": spread(sp["fwd"]["fp32"]), "int8_tokens_per_s": spread(sp["fwd"]["int8"]),
                    "speedup": spread(fwd_speedups)} if fwd else None,
        "gate": {"max_ppl_increase": tol, "min_speedup_median": args.min_speedup, "every_pass_above": 1.0,
                 "source": "--max-ppl-increase" if args.max_ppl_increase is not None
                 else f"recipe {args.recipe!r} gate.max_domain_ppl_increase"},
        "quantized": {"linear_layers": n_q, "linear_layers_fp32": n_lin - n_q, "keep_fp32": keep_fp32,
                      "weights": "per_channel" if args.per_channel else "per_tensor",
                      "activations": "dynamic per tensor (quint8)", "engine": torch.backends.quantized.engine,
                      "linear_weight_mb": mb},
        "threads": args.threads, "rows": {d: len(seqs[d]) for d in domains}, "tokens": overall["tokens"],
        "max_length": max_length, "artifact": str(Path(args.student).resolve()),
        "num_parameters": fp32.num_parameters(),
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python "
                   + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
        "args": vars(args), "torch": torch.__version__,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "seconds": round(time.time() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print_table(out, domains)
    return out


def print_table(out: dict, domains: list[str]) -> None:
    def row(name, a, b, r, fmt):
        print(f"{name:<34}{a:>12{fmt}}{b:>12{fmt}}{r:>12.3f}")

    print(f"\n{'metric':<34}{'fp32':>12}{'int8':>12}{'int8/fp32':>12}")
    for d in domains:
        v = out["ppl_by_domain"][d]
        row(f"perplexity {d}", v["fp32"], v["int8"], v["ratio"], ".2f")
    row("perplexity overall", out["fp32_ppl"], out["int8_ppl"], out["ppl_ratio"], ".2f")
    row("generation tokens/s (b1)", out["fp32_tokens_per_s"], out["int8_tokens_per_s"], out["speedup_median"], ".1f")
    print(f"{'  speedup per pass':<34}{'':>24}  " + ", ".join(f"{s:.2f}" for s in out["speedup_runs"]))
    if out["forward"]:
        f = out["forward"]
        row(f"forward tokens/s (b{f['batch']})", f["fp32_tokens_per_s"]["median"], f["int8_tokens_per_s"]["median"],
            f["speedup"]["median"], ".0f")
        print(f"{'  speedup per pass':<34}{'':>24}  " + ", ".join(f"{s:.2f}" for s in f["speedup"]["runs"]))
    mb = out["quantized"]["linear_weight_mb"]
    row("linear weights (MB)", mb["fp32"], mb["int8"], mb["int8"] / mb["fp32"], ".1f")
    g = out["generation"]
    print(f"greedy tokens identical to fp32 (first pass): {g['greedy_token_match']:.3f} "
          f"({g['greedy_identical_prompts']}/{g['prompts']} prompts identical)")
    print(f"decision: {out['decision'].upper()}: {out['reason']}")
    print(f"threads {out['threads']}; {out['seconds']:.0f} s")


if __name__ == "__main__":
    main()
