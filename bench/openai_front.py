"""Bench: the latency the OpenAI-compatible front (serving/openai_front.py) adds over calling Triton directly.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/openai_front.py --out bench/results/openai_front.json [--requests 300]

Starts its own tritonserver with a tiny random causal-LM student (tests/conftest.py's builders), then sends the same
prompt with the same ``max_tokens``, greedy, one request at a time, alternating: ``ServingClient.generate`` straight to
Triton, and ``POST /v1/completions`` to the front (a keep-alive HTTP client, so the figure is the front's own cost, not
a client library's; the official ``openai`` client is timed too). ``openai_front_overhead_ms_p50`` = p50(front) -
p50(direct). Target: <= 2 ms. ``measure_overhead`` is the function bench/api_teacher.py imports.
"""

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "this movie was really good and the actor was great"


def _pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(xs) * 1e3, q)), 3)


def measure_overhead(triton_url: str, model: str, front_url: str = "", grpc_url: str = "", prompt: str = PROMPT,
                     max_tokens: int = 1, requests: int = 300, warmup: int = 20,
                     with_openai_client: bool = True) -> dict:
    """Latency of the same greedy completion straight from Triton and through the front, sequential and alternating.
    ``front_url`` empty: a front is started in this process for the measurement. Times in ms."""
    import http.client
    from urllib.parse import urlsplit

    from serving.client import ServingClient
    from serving.openai_front import FrontConfig, OpenAIFront

    front = None
    if not front_url:
        front = OpenAIFront(FrontConfig(triton_url, model, grpc_url=grpc_url)).start()
        front_url = front.url
    direct = ServingClient(triton_url, grpc_url=grpc_url)
    where = urlsplit(front_url)
    http = http.client.HTTPConnection(where.hostname, where.port, timeout=60)  # keep-alive, the lightest client
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    payload, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
    client = None
    if with_openai_client:
        import openai

        client = openai.OpenAI(base_url=front_url + "/v1", api_key="x", max_retries=0)
    times: dict[str, list[float]] = {"direct": [], "front": [], "openai_client": []}
    texts = set()
    try:
        def one(kind: str):
            t0 = time.perf_counter()
            if kind == "direct":
                text = direct.generate(model, [prompt], max_tokens, 0.0).texts[0]
            elif kind == "front":
                http.request("POST", "/v1/completions", payload, headers)
                r = http.getresponse()
                answer = json.loads(r.read())
                if r.status != 200:
                    raise RuntimeError(f"the front answered {r.status}: {answer}")
                text = answer["choices"][0]["text"]
            else:
                text = client.completions.create(**body).choices[0].text
            return time.perf_counter() - t0, text

        kinds = ["direct", "front"] + (["openai_client"] if client else [])
        for _ in range(warmup):
            for k in kinds:
                one(k)
        for i in range(requests):
            for k in kinds[i % len(kinds):] + kinds[: i % len(kinds)]:  # rotate the order: no kind always goes first
                dt, text = one(k)
                times[k].append(dt)
                texts.add(text)
    finally:
        http.close()
        if front is not None:
            front.stop()
    out = {"requests": requests, "max_tokens": max_tokens, "prompt_chars": len(prompt), "same_answer": len(texts) == 1}
    for k, xs in times.items():
        if xs:
            out[f"{k}_ms_p50"], out[f"{k}_ms_p90"] = _pct(xs, 50), _pct(xs, 90)
            out[f"{k}_ms_mean"] = round(statistics.fmean(xs) * 1e3, 3)
    out["openai_front_overhead_ms_p50"] = round(out["front_ms_p50"] - out["direct_ms_p50"], 3)
    # each front request beside the direct one sent next to it: robust to the machine's load drifting during a run
    out["paired_overhead_ms_p50"] = _pct([f - d for f, d in zip(times["front"], times["direct"])], 50)
    out["openai_front_overhead_ms_p90"] = round(out["front_ms_p90"] - out["direct_ms_p90"], 3)
    if client:
        out["openai_client_overhead_ms_p50"] = round(out["openai_client_ms_p50"] - out["direct_ms_p50"], 3)
    return out


@contextmanager
def front_process(triton_url: str, model: str, grpc_url: str = ""):
    """``kdops serve openai`` as its own process (how it is deployed); yields its base URL (``http://host:port``)."""
    cmd = [str(Path(sys.executable).parent / "kdops"), "serve", "openai", "--url", triton_url, "--model", model,
           "--port", "0"] + (["--grpc-url", grpc_url] if grpc_url else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"kdops serve openai exited with {proc.wait()}")
        yield json.loads(line)["base_url"].removesuffix("/v1")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def tiny_student(root: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import make_lm_tokenizer, save_tiny_lm_student

    return save_tiny_lm_student(root / "student", make_lm_tokenizer(root / "tok"))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="Where to write the JSON report.")
    ap.add_argument("--requests", type=int, default=300, help="Timed requests per kind.")
    ap.add_argument("--max-tokens", type=int, default=1,
                    help="New tokens per request: few, so that Triton's own time (and its noise) stays small "
                         "beside the front's.")
    ap.add_argument("--repeats", type=int, default=3, help="Whole measurements, for the spread.")
    args = ap.parse_args(argv)

    from serving.export import ExportConfig
    from serving.server import ServerConfig, TritonServer
    from serving.swap import SwapConfig, deploy

    root = Path(tempfile.mkdtemp(prefix="kdops-bench-openai-"))
    student = tiny_student(root)
    with TritonServer(ServerConfig(repository=str(root / "repo"))) as server:
        deploy(server, "student", student, cfg=SwapConfig(export=ExportConfig(max_new_tokens=64)))
        with front_process(server.url, "student") as url:
            runs = [measure_overhead(server.url, "student", url, requests=args.requests, max_tokens=args.max_tokens)
                    for _ in range(args.repeats)]
        in_thread = measure_overhead(server.url, "student", requests=args.requests, max_tokens=args.max_tokens,
                                     with_openai_client=False)
    mid = sorted(runs, key=lambda r: r["openai_front_overhead_ms_p50"])[len(runs) // 2]  # the median run's figures
    report = {**mid, "runs": runs, "front": "kdops serve openai, its own process",
              "in_thread_front_overhead_ms_p50": in_thread["openai_front_overhead_ms_p50"], "in_thread": in_thread,
              "overhead_ms_p50_each_run": [r["openai_front_overhead_ms_p50"] for r in runs],
              "model": "tiny random Llama student (2 layers, hidden 32), Python backend, CPU",
              "client": "sequential, one request at a time, direct and front alternating"}
    print(f"{'path':<28}{'p50 ms':>10}{'p90 ms':>10}")
    for k, name in (("direct", "Triton direct (HTTP)"), ("front", "front (/v1/completions)"),
                    ("openai_client", "front via openai client")):
        print(f"{name:<28}{report[f'{k}_ms_p50']:>10.3f}{report[f'{k}_ms_p90']:>10.3f}")
    print(f"openai_front_overhead_ms_p50 = {report['openai_front_overhead_ms_p50']:.3f} "
          f"(runs: {report['overhead_ms_p50_each_run']}; target <= 2 ms); front in the client's process: "
          f"{report['in_thread_front_overhead_ms_p50']:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
