"""Bench: a teacher behind an OpenAI-compatible API (kdops/api_teacher.py), end to end on real processes.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/api_teacher.py --out bench/results/api_teacher.json [--texts 200]

The shipped SmolLM2-135M-Instruct is served by tritonserver as an LM teacher, behind `kdops serve openai` (the
OpenAI front), behind scripts/openai_fault_server.py forwarding every request and answering a seeded 10 % of them
with 429, 500 or a slow response (over the client's timeout). The API teacher labels sentiment test texts (label
words " negative" / " positive") twice, each pass with a fresh teacher object, as a re-run would:

- ``calls_first_pass`` / ``calls_second_pass``: requests the server saw (retries included); target second = 0;
- ``retried_calls`` / ``failed_calls``: with the injected faults; target failed = 0;
- ``teacher_tokens``, ``seconds``;
- ``js_divergence_vs_local``: Jensen-Shannon divergence (nats) between the API's soft labels and the same label-word
  log-likelihoods computed in this process on the same weights; target mean <= 1e-3;
- ``openai_front_overhead_ms_p50``: the front's added latency over calling Triton directly
  (bench/openai_front.py's ``measure_overhead`` on a tiny student in the same server); target <= 2 ms.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "Review: {text}\nIs this review positive or negative? Answer:"
WORDS = (("neg", "negative"), ("pos", "positive"))


def fault_server(upstream: str, rate: float, seed: int, slow_s: float):
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "openai_fault_server.py"), "--port", "0",
                             "--upstream", upstream, "--fault-rate", str(rate), "--seed", str(seed),
                             "--slow-s", str(slow_s)], stdout=subprocess.PIPE, text=True)
    return proc, f"http://127.0.0.1:{int(proc.stdout.readline().split()[-1])}"


def stats(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url + "/stats", timeout=10) as r:
        return json.load(r)


def local_soft_labels(teacher_dir: Path, prompts: list[str], words: list[str]) -> np.ndarray:
    """log p(word | prompt) summed over the word's tokens, start token first (as the front sends it), softmaxed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdops.lm.teacher import start_token_id

    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    start = start_token_id(model.config, tok)
    out = []
    for p in prompts:
        scores = []
        for w in words:
            full = p + " " + w
            enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
            ids = [start] + enc["input_ids"]
            with torch.inference_mode():
                lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            picked = [lp[i, ids[i + 1]].item() for i, (a, _) in enumerate(enc["offset_mapping"]) if a >= len(p)]
            scores.append(sum(picked))
        s = np.asarray(scores)
        out.append(np.exp(s - s.max()) / np.exp(s - s.max()).sum())
    return np.stack(out)


def js(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    m = (p + q) / 2
    return 0.5 * (p * np.log(p / m)).sum(1) + 0.5 * (q * np.log(q / m)).sum(1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="Where to write the JSON report.")
    ap.add_argument("--texts", type=int, default=200, help="Sentiment test texts labelled (balanced over domains).")
    ap.add_argument("--fault-rate", type=float, default=0.1, help="Share of requests answered 429, 500 or slowly.")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--overhead-requests", type=int, default=200)
    args = ap.parse_args(argv)

    from bench.openai_front import measure_overhead, tiny_student
    from kdops import corpora
    from kdops.api_teacher import ApiClassifierTeacher, ApiTeacherConfig
    from kdops.lm.teacher import smollm2_dir
    from serving.export import ExportConfig
    from serving.openai_front import FrontConfig, OpenAIFront
    from serving.server import ServerConfig, TritonServer
    from serving.swap import SwapConfig, deploy
    from serving.teacher import deploy_lm_teacher

    rows = corpora.load("sentiment", split="test", limit_per_domain=max(1, args.texts // 4)).rows.head(args.texts)
    texts = [t[:400] for t in rows["text"]]
    teacher_dir = smollm2_dir()
    root = Path(tempfile.mkdtemp(prefix="kdops-bench-api-"))
    report: dict = {"texts": len(texts), "teacher": "SmolLM2-135M-Instruct on tritonserver (CPU) behind kdops serve openai",
                    "fault_rate": args.fault_rate, "prompt": PROMPT, "label_words": dict(WORDS)}
    with TritonServer(ServerConfig(repository=str(root / "repo"), startup_timeout_s=120)) as server:
        deploy_lm_teacher(server, teacher_dir, "smollm2")
        deploy(server, "student", tiny_student(root), cfg=SwapConfig(export=ExportConfig(max_new_tokens=64)))
        with OpenAIFront(FrontConfig(server.url, "smollm2", tokenizer=str(teacher_dir))) as front:
            proxy, url = fault_server(front.url, args.fault_rate, 0, slow_s=8.0)
            try:
                cfg = ApiTeacherConfig(base_url=url + "/v1", model="smollm2", prompt=PROMPT, labels=("neg", "pos"),
                                       label_words=WORDS, concurrency=args.concurrency, timeout_s=4.0, backoff_s=0.2,
                                       cache=str(root / "answers.sqlite"))
                t0 = time.perf_counter()
                first = ApiClassifierTeacher(cfg)
                probs, methods = first.probabilities(texts)
                seconds = time.perf_counter() - t0
                s1 = stats(url)
                usage = first.usage_since(0)
                second = ApiClassifierTeacher(cfg)
                t1 = time.perf_counter()
                again, _ = second.probabilities(texts)
                s2 = stats(url)
                report.update(
                    calls_first_pass=s1["requests"], calls_second_pass=s2["requests"] - s1["requests"],
                    teacher_tokens=usage["tokens"], seconds=round(seconds, 2),
                    seconds_second_pass=round(time.perf_counter() - t1, 3), retried_calls=usage["retried_calls"],
                    failed_calls=usage["failed_calls"], faults_injected={k: s1[k] for k in ("429", "500", "slow")},
                    methods=sorted(set(methods)), second_pass_identical=bool(np.array_equal(probs, again)))
            finally:
                proxy.kill()
        local = local_soft_labels(teacher_dir, [first.prompt(t) for t in texts], [w for _, w in WORDS])
        d = js(np.clip(probs, 1e-12, 1), np.clip(local, 1e-12, 1))
        gold = rows["label"].map({"neg": 0, "pos": 1}).to_numpy()
        report.update(js_divergence_vs_local=float(d.mean()), js_divergence_vs_local_max=float(d.max()),
                      max_abs_prob_diff_vs_local=float(np.abs(probs - local).max()),
                      teacher_accuracy=float((probs.argmax(1) == gold).mean()))
        overhead = measure_overhead(server.url, "student", requests=args.overhead_requests, with_openai_client=False)
        report.update(openai_front_overhead_ms_p50=overhead["openai_front_overhead_ms_p50"], front_overhead=overhead)
    targets = {"calls_second_pass": (report["calls_second_pass"] == 0, "0"),
               "failed_calls": (report["failed_calls"] == 0, f"0 with {args.fault_rate:.0%} faults"),
               "js_divergence_vs_local": (report["js_divergence_vs_local"] <= 1e-3, "<= 1e-3 (mean)"),
               "openai_front_overhead_ms_p50": (report["openai_front_overhead_ms_p50"] <= 2.0, "<= 2 ms")}
    report["targets_met"] = {k: bool(v[0]) for k, v in targets.items()}
    print(f"{'field':<32}{'value':>16}  target")
    for k in ("calls_first_pass", "calls_second_pass", "teacher_tokens", "seconds", "retried_calls", "failed_calls",
              "js_divergence_vs_local", "teacher_accuracy", "openai_front_overhead_ms_p50"):
        v = report[k]
        t = targets.get(k)
        print(f"{k:<32}{(f'{v:.3g}' if isinstance(v, float) else str(v)):>16}  "
              f"{(t[1] + (' met' if t[0] else ' NOT met')) if t else ''}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
