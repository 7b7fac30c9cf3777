#!/usr/bin/env python3
"""A small OpenAI-compatible server that answers 429, 500, slow or dropped responses on a schedule.

For tests and ``bench/api_teacher.py``: a real process on a real port, so the client's retries, timeouts and spend
cap meet real HTTP. Standard library only. It either answers itself (deterministic log-probs from a hash of the
text; answers drawn from ``--answers``) or forwards each request to ``--upstream`` (an OpenAI-compatible server,
e.g. ``kdops serve openai``) and injects its faults in front of it.

    python scripts/openai_fault_server.py --port 0 --answers neg,pos --schedule 429,500,slow,ok
    python scripts/openai_fault_server.py --port 0 --upstream http://127.0.0.1:8001 --fault-rate 0.1 --seed 0

The first stdout line is ``listening on PORT``. ``GET /stats`` returns the requests seen and the faults served.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("429", "500", "slow", "drop")


def score(prefix: str, token: str) -> float:
    """A deterministic log-probability for ``token`` after ``prefix``."""
    h = int(hashlib.sha256(f"{prefix}\x00{token}".encode()).hexdigest()[:8], 16)
    return -(h % 1000) / 250.0 - 0.05


def tokens_of(text: str) -> list[str]:
    return re.findall(r"\s*\S+", text) or [text]


class State:
    def __init__(self, args):
        self.args, self.lock = args, threading.Lock()
        self.schedule = [s.strip() for s in args.schedule.split(",") if s.strip()] if args.schedule else []
        self.rng = random.Random(args.seed)
        self.stats = {"requests": 0, "answered": 0, **{f: 0 for f in FAULTS}}

    def next_fault(self) -> str:
        with self.lock:
            self.stats["requests"] += 1
            if self.schedule:
                fault = self.schedule.pop(0)
            elif self.args.fault_rate and self.rng.random() < self.args.fault_rate:
                fault = self.rng.choice(("429", "500", "slow"))
            else:
                fault = "ok"
            if fault in self.stats:
                self.stats[fault] += 1
            return fault


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Answerer:
    """What the server says by itself."""

    def __init__(self, args):
        self.answers = [a for a in args.answers.split(",") if a]
        self.logprobs = not args.no_logprobs

    def pick(self, prompt: str, i: int, sampled: bool) -> str:
        scores = [score(prompt, " " + a) for a in self.answers]
        if not sampled:
            return self.answers[max(range(len(scores)), key=scores.__getitem__)]
        rng = random.Random(f"{prompt}\x00{i}")
        weights = [math.exp(s) for s in scores]
        return rng.choices(self.answers, weights)[0]

    def top(self, prompt: str) -> dict[str, float]:
        scores = {" " + a: score(prompt, " " + a) for a in self.answers}
        z = math.log(sum(math.exp(v) for v in scores.values()))
        return {t: v - z for t, v in scores.items()}

    def completions(self, body: dict) -> dict:
        prompts = body.get("prompt", "")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n, max_tokens = int(body.get("n") or 1), int(body.get("max_tokens", 16))
        sampled = float(body.get("temperature") or 0) > 0
        want_lp = body.get("logprobs") is not None and self.logprobs
        choices, used_in, used_out = [], 0, 0
        for p in prompts:
            toks = tokens_of(p)
            used_in += len(toks)
            for j in range(n):
                lp = None
                if body.get("echo") and max_tokens == 0:
                    text = p
                    if want_lp:
                        offsets, pos = [], 0
                        for t in toks:
                            offsets.append(pos)
                            pos += len(t)
                        values = [None] + [score(p[:offsets[i]], toks[i]) for i in range(1, len(toks))]
                        lp = {"tokens": toks, "token_logprobs": values, "text_offset": offsets,
                              "top_logprobs": [None] + [{t: v} for t, v in zip(toks[1:], values[1:])]}
                else:
                    word = " " + self.pick(p, j, sampled) if max_tokens > 0 else ""
                    text = word
                    used_out += 1 if word else 0
                    if want_lp and word:
                        top = self.top(p)
                        lp = {"tokens": [word], "token_logprobs": [top[word]], "text_offset": [len(p)],
                              "top_logprobs": [top]}
                choices.append({"index": len(choices), "text": text, "logprobs": lp, "finish_reason": "length"})
        return {"id": "cmpl-fault", "object": "text_completion", "created": int(time.time()),
                "model": body.get("model", ""), "choices": choices, "usage": _usage(used_in, used_out)}

    def chat(self, body: dict) -> dict:
        prompt = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
        n = int(body.get("n") or 1)
        sampled = float(body.get("temperature") or 0) > 0
        choices = []
        for j in range(n):
            word = self.pick(prompt, j, sampled)
            lp = None
            if body.get("logprobs") and self.logprobs:
                top = self.top(prompt)
                lp = {"content": [{"token": word, "logprob": top[" " + word], "bytes": None,
                                   "top_logprobs": [{"token": t.strip(), "logprob": v, "bytes": None}
                                                    for t, v in sorted(top.items(), key=lambda x: -x[1])]}]}
            choices.append({"index": j, "message": {"role": "assistant", "content": word}, "logprobs": lp,
                            "finish_reason": "stop"})
        return {"id": "chatcmpl-fault", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", ""), "choices": choices, "usage": _usage(len(tokens_of(prompt)), n)}


def make_handler(state: State, answerer: Answerer):
    args = state.args

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):  # quiet: the tests read /stats, not the log
            pass

        def _send(self, status: int, payload: dict | bytes, headers: dict | None = None) -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # a client that timed out on a slow answer
                self.close_connection = True

        def do_GET(self):
            if self.path.rstrip("/") == "/stats":
                with state.lock:
                    return self._send(200, dict(state.stats))
            if self.path.rstrip("/").endswith("/models"):
                return self._send(200, {"object": "list", "data": [{"id": args.model, "object": "model", "owned_by": "faults"}]})
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found", "code": 404}})

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            bearer = (self.headers.get("authorization") or "").removeprefix("Bearer ")
            with state.lock:  # a digest of the key the client sent, so a test can see it arrived
                state.stats["auth"] = hashlib.sha256(bearer.encode()).hexdigest()[:12]
            fault = state.next_fault()
            if fault == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault == "429":
                extra = {"retry-after": str(args.retry_after)} if args.retry_after is not None else {}
                return self._send(429, {"error": {"message": "rate limited (injected)", "type": "rate_limit", "code": 429}}, extra)
            if fault == "500":
                return self._send(500, {"error": {"message": "server error (injected)", "type": "server_error", "code": 500}})
            if fault == "slow":
                time.sleep(args.slow_s)
            if args.upstream:
                req = urllib.request.Request(args.upstream.rstrip("/") + self.path, data=raw, method="POST",
                                             headers={"content-type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=600) as r:
                        status, data = r.status, r.read()
                except urllib.error.HTTPError as e:
                    status, data = e.code, e.read()
                with state.lock:
                    state.stats["answered"] += 1
                return self._send(status, data)
            try:
                body = json.loads(raw or b"{}")
            except json.JSONDecodeError:
                return self._send(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error", "code": 400}})
            path = self.path.rstrip("/")
            if path.endswith("/chat/completions"):
                out = answerer.chat(body)
            elif path.endswith("/completions"):
                out = answerer.completions(body)
            else:
                return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found", "code": 404}})
            with state.lock:
                state.stats["answered"] += 1
            self._send(200, out)

    return Handler


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0, help="0: any free port (printed on the first line)")
    ap.add_argument("--upstream", default="", help="forward answered requests to this OpenAI-compatible server")
    ap.add_argument("--schedule", default="", help="comma list of ok|429|500|slow|drop, one per request, then --fault-rate")
    ap.add_argument("--fault-rate", type=float, default=0.0, help="share of requests (after the schedule) that fault")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slow-s", type=float, default=2.0, help="how long a slow answer takes")
    ap.add_argument("--retry-after", type=float, default=None, help="Retry-After header on 429s (seconds)")
    ap.add_argument("--answers", default="neg,pos", help="words the server answers with by itself")
    ap.add_argument("--no-logprobs", action="store_true", help="never return log-probs (as many servers do)")
    ap.add_argument("--model", default="fault-model")
    args = ap.parse_args(argv)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(State(args), Answerer(args)))
    print(f"listening on {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
