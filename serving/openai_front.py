"""An OpenAI-compatible HTTP front over Triton: clients switch from a teacher's API to the served student (or the
served teacher) by changing a base URL.

``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` (server-sent events with ``stream``), OpenAI's
schema plus vLLM's ``echo`` prompt log-probs and ``return_tokens_as_token_ids``. Two kinds of Triton model can
stand behind it, told apart by the config parameter ``kdops_kind``:

- a causal-LM student (serving/templates/lm_model.py, the stable name of serving.swap): prompt text in, text out;
  streaming over gRPC when it was exported with ``ExportConfig.streaming``. It has no log-probs: a request asking
  for them gets ``logprobs: null``. ``system_fingerprint`` is the MODEL_VERSION that answered.
- an LM teacher (``kdops_kind = "lm-teacher"``, serving.teacher.deploy_lm_teacher): the front tokenises with the
  tokenizer directory it is given. Greedy text is one GENERATED call; the log-probs of the returned tokens are a
  second, top-k call on prompt + generated. ``temperature > 0`` samples in the front from the teacher's top 50 at
  each step (HF ``generate``'s default top_k), one call per token.

Triton is called by model name without a version, so whichever version serves answers and a hot swap is invisible.
Errors are OpenAI's JSON (``{"error": {message, type, code, param}}``): 400 for a request that cannot be answered as
sent, 404 for an unknown model, 503 while Triton cannot be reached. Only serving/ talks to Triton; this module
reaches it through ``serving.client.ServingClient`` and ``serving.teacher.TritonLMTeacher``.
"""

# No `from __future__ import annotations`: FastAPI reads the route parameters' annotations (Request) at runtime.
import asyncio
import hmac
import json
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from serving.client import ServingClient, ServingError

log = logging.getLogger(__name__)

SAMPLE_TOP_K = 50  # the teacher backend samples from its top 50 at temperature > 0 (HF generate's default top_k)
MAX_LOGPROBS = 20  # the most alternatives per position a request may ask for (vLLM's default limit)


@dataclass(frozen=True)
class FrontConfig:
    triton_url: str = field(metadata={"help": "Triton's HTTP host:port."})
    model: str = field(metadata={"help": "The Triton model to serve (a causal-LM student's stable name, or an LM teacher)."})
    grpc_url: str = field(default="", metadata={"help": "Triton's gRPC host:port: needed to stream from a streaming (decoupled) student."})
    served_name: str = field(default="", metadata={"help": "The model id clients send and /v1/models lists (empty: the Triton name)."})
    tokenizer: str = field(default="", metadata={"help": "Tokenizer directory: required for an LM teacher; for a student it only counts prompt tokens in usage (else 0)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on."})
    port: int = field(default=0, metadata={"help": "Port to listen on (0: a free one)."})
    timeout_s: float = field(default=120.0, metadata={"help": "Longest wait for one Triton call or streamed piece."})
    max_n: int = field(default=16, metadata={"help": "The most answers per prompt (n) a request may ask for."})
    teacher_batch: int = field(default=16, metadata={"help": "LM teacher: sequences per Triton call."})
    api_key_env: str = field(default="", metadata={"help": "Environment variable holding the key clients must send as `Authorization: Bearer KEY` (empty: no key; the front is then as open as its address)."})
    threads: int = field(default=32, metadata={"help": "Threads that call Triton: the most requests in flight at once."})

    def __post_init__(self) -> None:
        if not self.triton_url or not self.model:
            raise ValueError("FrontConfig needs triton_url and model.")
        if not 0 <= self.port <= 65535 or self.timeout_s <= 0 or min(self.max_n, self.teacher_batch, self.threads) < 1:
            raise ValueError("port must be in [0, 65535], timeout_s > 0, and max_n, teacher_batch, threads >= 1.")

    @property
    def name(self) -> str:
        return self.served_name or self.model


class APIError(Exception):
    """An error answered to the client as OpenAI does."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or {400: "invalid_request_error", 404: "model_not_found",
                             503: "service_unavailable"}.get(status, "internal_error")

    def body(self) -> dict:
        kind = ("invalid_request_error" if self.status < 500
                else "service_unavailable" if self.status == 503 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


# -- the answers of a backend -------------------------------------------------------------------------------


@dataclass
class Scored:
    """One returned token: its id, its log-prob (None: the first prompt token) and the top alternatives."""

    id: int
    logprob: float | None
    top: list[tuple[int, float]] | None


@dataclass
class Answer:
    """One choice as a backend produced it, before it is written in either endpoint's schema."""

    text: str  # the completion (echo: prompt + completion)
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    version: str
    scored: list[Scored] | None = None  # per returned token, when log-probs were asked for and exist
    offsets: list[int] | None = None  # character offset of each scored token in ``text``
    pieces: list[str] | None = None  # teacher: the text each generated token adds (for streaming)


@dataclass(frozen=True)
class Ask:
    """What one request asks a backend for, validated."""

    prompts: list  # str, or list[int] token ids (LM teacher only); already repeated n times
    max_tokens: int
    temperature: float
    logprobs: int | None  # alternatives per token, None: no log-probs
    echo: bool = False
    seed: int | None = None


def _triton_failure(e: Exception, client: ServingClient) -> APIError:
    """ServingError / connection errors as the client sees them: 400 when Triton refused the request as sent,
    503 when it is down, 500 otherwise."""
    from tritonclient.utils import InferenceServerException

    cause = e.__cause__ if isinstance(e, ServingError) else e
    status = cause.status() if isinstance(cause, InferenceServerException) else None
    if status in ("400", "StatusCode.INVALID_ARGUMENT"):
        return bad(str(e))
    if isinstance(cause, OSError) or status in ("503", "StatusCode.UNAVAILABLE") or not client.live():
        return APIError(503, f"the model server is not reachable: {e}")
    if status is None and isinstance(e, ServingError) and "no streamed response" not in str(e):
        return bad(str(e))  # a streamed error response carries no code; the server is live, so the request was refused
    return APIError(500, f"the model server failed: {e}")


class StudentBackend:
    """A causal-LM student: PROMPT text in, COMPLETION / TOKENS / MODEL_VERSION out."""

    logprobs = False

    def __init__(self, client: ServingClient, model: str, decoupled: bool, tokenizer=None):
        self.client, self.model, self.decoupled, self.tokenizer = client, model, decoupled, tokenizer

    def _prompt_tokens(self, prompt: str) -> int:
        # the generator starts every sequence with one start token (kdops.lm.predict.LMGenerator.encode)
        return 1 + len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]) if self.tokenizer else 0

    def _check(self, ask: Ask) -> None:
        if any(not isinstance(p, str) for p in ask.prompts):
            raise bad("this model takes text prompts, not token ids", "prompt")

    def _answer(self, ask: Ask, prompt: str, text: str, tokens: int, version: str) -> Answer:
        done = "length" if ask.max_tokens and tokens >= ask.max_tokens else "stop"
        return Answer(prompt + text if ask.echo else text, self._prompt_tokens(prompt), tokens, done, version)

    def complete(self, ask: Ask) -> list[Answer]:
        self._check(ask)
        if self.decoupled and not self.client.grpc_url:
            raise APIError(500, f"{self.model} is a streaming (decoupled) model: the front needs Triton's gRPC URL "
                                "(--grpc-url) to read it")
        out = self.client.generate(self.model, list(ask.prompts), ask.max_tokens, ask.temperature)
        return [self._answer(ask, p, t, n, v) for p, t, n, v in zip(ask.prompts, out.texts, out.tokens, out.versions)]

    def stream(self, ask: Ask) -> Iterator[tuple | list[Answer]]:
        """``(row, text, scored, offsets)`` pieces as they come (no log-probs here: None), then the finished answers."""
        self._check(ask)
        if not (self.decoupled and self.client.grpc_url):  # a plain model: the whole answer as one piece
            answers = self.complete(ask)
            for row, a in enumerate(answers):
                yield row, a.text, None, None
            yield answers
            return
        texts, tokens, versions = [""] * len(ask.prompts), [0] * len(ask.prompts), [""] * len(ask.prompts)
        echoed = not ask.echo
        for piece in self.client.generate_stream(self.model, list(ask.prompts), ask.max_tokens, ask.temperature):
            if not echoed:  # after Triton's first answer: a request it refuses still gets its status code
                echoed = True
                yield from ((row, p, None, None) for row, p in enumerate(ask.prompts))
            texts[piece.row] += piece.text
            tokens[piece.row], versions[piece.row] = piece.tokens, piece.version
            if piece.text:
                yield piece.row, piece.text, None, None
        if not echoed:
            yield from ((row, p, None, None) for row, p in enumerate(ask.prompts))
        yield [self._answer(ask, p, t, n, v) for p, t, n, v in zip(ask.prompts, texts, tokens, versions)]


class TeacherBackend:
    """An LM teacher export (IDS in; TOPK_IDS / TOPK_LOGPROBS / GENERATED out), through TritonLMTeacher."""

    logprobs = True

    def __init__(self, cfg: FrontConfig):
        from serving.teacher import TritonLMTeacher

        if not cfg.tokenizer:
            raise ValueError(f"{cfg.model} is an LM teacher: the front needs its tokenizer directory "
                             "(--tokenizer DIR).")
        self.teacher = TritonLMTeacher(cfg.triton_url, cfg.model, tokenizer_dir=cfg.tokenizer,
                                       batch_size=cfg.teacher_batch, timeout_s=cfg.timeout_s)
        self.client, self.tokenizer = self.teacher.client, self.teacher.tokenizer
        self.version = self.teacher.id[:16]

    # -- tokens <-> text
    def sequence(self, prompt) -> tuple[list[int], str, bool]:
        """``(ids, text, synthetic_start)``: a text prompt gets the teacher's start token in front (as
        TritonLMTeacher.encode does); token ids are taken as sent."""
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            return [self.teacher.start_id, *ids], prompt, True
        if any(not 0 <= t < self.teacher.vocab_size for t in prompt):
            raise bad(f"token ids must lie in [0, {self.teacher.vocab_size})", "prompt")
        return list(prompt), self.decode(prompt), False

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def prefixes(self, ids: list[int]) -> list[str]:
        """The text of each prefix of ``ids`` (``len(ids) + 1`` of them): where a token starts (``text_offset``) and
        the text it adds (a streamed piece) are read off them."""
        return [self.decode(ids[:i]) for i in range(len(ids) + 1)]

    # -- Triton
    def _score(self, seqs: list[list[int]], first: list[int], k: int) -> list[list[Scored]]:
        """The log-prob and top ``k`` alternatives of every token ``seq[first:]`` (``first`` >= 1). The teacher
        reports each actual token's log-prob; from an export that does not, a token outside the top ``max(k, 1)``
        (a prompt token, usually) is looked up in a vocabulary-wide second call."""
        got = self.teacher.scored_topk(seqs, max(k, 1))
        rows, missing = [], []
        for r, (seq, (ids, lps, targets)) in enumerate(zip(seqs, got)):
            row = []
            for pos in range(first[r] - 1, len(seq) - 1):  # position pos predicts seq[pos + 1]
                hit = np.flatnonzero(ids[pos] == seq[pos + 1])
                lp = float(targets[pos]) if targets is not None else float(lps[pos, hit[0]]) if hit.size else None
                row.append(Scored(seq[pos + 1], lp, list(zip(ids[pos, :k].tolist(), lps[pos, :k].tolist()))))
                if lp is None:
                    missing.append(r)
            rows.append(row)
        todo = sorted(set(missing))
        if todo:
            full = self.teacher.topk([seqs[r] for r in todo], self.teacher.vocab_size)
            for r, (ids, lps) in zip(todo, full):
                for j, s in enumerate(rows[r]):
                    if s.logprob is None:
                        pos = first[r] - 1 + j
                        s.logprob = float(lps[pos, np.flatnonzero(ids[pos] == s.id)[0]])
        return rows

    def _sample(self, seqs: list[list[int]], ask: Ask) -> tuple[list[list[int]], list[list[Scored]]]:
        """Token by token: each step asks the top 50 of the next position and samples among them."""
        rng = np.random.default_rng(ask.seed)
        k = max(ask.logprobs or 0, 0)
        gens: list[list[int]] = [[] for _ in seqs]
        scored: list[list[Scored]] = [[] for _ in seqs]
        active = list(range(len(seqs)))
        for _ in range(ask.max_tokens):
            if not active:
                break
            pad = self.teacher.pad_id  # a dummy last token: its position's top-k is the next-token distribution
            got = self.teacher.topk([seqs[i] + gens[i] + [pad] for i in active], SAMPLE_TOP_K)
            for i, (ids, lps) in zip(list(active), got):
                ids, lps = ids[-1], lps[-1].astype(np.float64)
                p = np.exp((lps - lps.max()) / ask.temperature)
                j = int(rng.choice(len(p), p=p / p.sum()))
                tok = int(ids[j])
                gens[i].append(tok)
                scored[i].append(Scored(tok, float(lps[j]), list(zip(ids[:k].tolist(), lps[:k].tolist()))))
                if tok == self.teacher.eos_id:
                    active.remove(i)
        return gens, scored

    def complete(self, ask: Ask) -> list[Answer]:
        if not 0 <= ask.max_tokens <= 1024:  # the teacher export's own limit (lm_teacher_model.py)
            raise bad(f"max_tokens must be in [0, 1024] for this model; got {ask.max_tokens}", "max_tokens")
        parsed = [self.sequence(p) for p in ask.prompts]
        seqs = [s for s, _, _ in parsed]
        if any(not s for s in seqs):
            raise bad("a prompt of token ids must not be empty", "prompt")
        scored: list[list[Scored]] | None = None
        if ask.max_tokens == 0:
            gens = [[] for _ in seqs]
        elif ask.temperature > 0:
            gens, scored = self._sample(seqs, ask)
        else:
            gens = self.teacher.generate(seqs, ask.max_tokens)
        if ask.logprobs is not None and scored is None:
            scored = self._score([s + g for s, g in zip(seqs, gens)], [len(s) for s in seqs], ask.logprobs)
        if ask.logprobs is not None and ask.echo:  # prompt tokens first; the first has no log-prob (vLLM's echo)
            prompt_part = (self._score(seqs, [1] * len(seqs), ask.logprobs) if any(len(s) > 1 for s in seqs)
                           else [[] for _ in seqs])
            scored = [[Scored(s[0], None, None), *p, *g] for s, p, g in zip(seqs, prompt_part, scored)]
        answers = []
        for r, ((seq, text, synthetic), gen) in enumerate(zip(parsed, gens)):
            done_text = self.prefixes(gen)
            completion, pieces = done_text[-1], [b[len(a):] for a, b in zip(done_text, done_text[1:])]
            offsets = None
            if scored is not None:
                offsets = [(len(text) if ask.echo else 0) + len(t) for t in done_text[:-1]]
                if ask.echo:  # the synthetic start token is not in the prompt text: it sits at 0 and adds nothing
                    head = [len(t) for t in self.prefixes(seq[1:] if synthetic else seq)[:-1]]
                    offsets = ([0] if synthetic else []) + head + offsets
            done = "stop" if (gen and gen[-1] == self.teacher.eos_id) or len(gen) < ask.max_tokens else "length"
            answers.append(Answer(text + completion if ask.echo else completion, len(seq), len(gen), done,
                                  self.version, scored[r] if scored is not None else None, offsets, pieces))
        return answers

    def stream(self, ask: Ask):
        """The finished answers, sent token by token (the teacher model does not stream)."""
        answers = self.complete(ask)
        for row, a in enumerate(answers):
            head = len(a.scored) - a.completion_tokens if a.scored is not None else 0  # echoed prompt tokens
            if ask.echo:
                yield (row, a.text[: len(a.text) - len("".join(a.pieces or []))],
                       a.scored[:head] if a.scored is not None else None, a.offsets[:head] if a.offsets else None)
            for j, piece in enumerate(a.pieces or []):
                yield (row, piece, a.scored[head + j: head + j + 1] if a.scored is not None else None,
                       a.offsets[head + j: head + j + 1] if a.offsets is not None else None)
        yield answers


# -- requests and responses in OpenAI's schema -------------------------------------------------------------


def _integer(body: dict, key: str, default, lo: int, hi: int):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise bad(f"'{key}' must be an integer in [{lo}, {hi}]; got {v!r}", key)
    return v


def _flag(body: dict, key: str) -> bool:
    v = body.get(key)
    if v is not None and not isinstance(v, bool):
        raise bad(f"'{key}' must be true or false; got {v!r}", key)
    return bool(v)


def _common(body: dict, cfg: FrontConfig) -> dict:
    """The options both endpoints share: n, temperature, stream, seed, stop."""
    t = body.get("temperature")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 2):
        raise bad(f"'temperature' must be a number in [0, 2]; got {t!r}", "temperature")
    if body.get("stop") not in (None, "", []):
        raise bad("stop sequences are not supported by this server", "stop")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    return {"n": _integer(body, "n", 1, 1, cfg.max_n), "temperature": float(t or 0.0), "stream": _flag(body, "stream"),
            "include_usage": bool(so.get("include_usage")), "seed": _integer(body, "seed", None, -2**63, 2**64 - 1),
            "token_ids": _flag(body, "return_tokens_as_token_ids")}


def _prompts(value) -> list:
    """A completions ``prompt``: a string, strings, token ids, or lists of token ids."""
    def ids(x):
        return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(value, str):
        return [value]
    if ids(value):
        return [value]
    if isinstance(value, list) and value and all(isinstance(p, str) or ids(p) for p in value):
        return list(value)
    raise bad("'prompt' must be a string, a list of strings, or (lists of) token ids", "prompt")


def parse_completion(body: dict, cfg: FrontConfig, backend) -> tuple[Ask, dict]:
    opts = _common(body, cfg)
    prompts = _prompts(body.get("prompt"))
    lp = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    opts.update(logprobs=lp is not None, k=lp or 0)
    ask = Ask([p for p in prompts for _ in range(opts["n"])], _integer(body, "max_tokens", 16, 0, 1 << 20),
              opts["temperature"], lp if backend.logprobs else None, _flag(body, "echo"), opts["seed"])
    return ask, opts


def _content(message: dict, i: int) -> str:
    c = message.get("content")
    if c is None or isinstance(c, str):
        return c or ""
    if isinstance(c, list) and all(isinstance(p, dict) for p in c):
        if any(p.get("type") not in ("text", None) for p in c):
            raise bad(f"messages[{i}]: only text content is supported", "messages")
        return "".join(str(p.get("text", "")) for p in c)
    raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")


def chat_prompt(messages: list[dict], tokenizer=None) -> str:
    """The prompt a chat becomes: the tokenizer's chat template when it has one, else ``role: content`` lines and
    ``assistant:``."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"


def parse_chat(body: dict, cfg: FrontConfig, backend) -> tuple[Ask, dict]:
    opts = _common(body, cfg)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise bad("'messages' must be a non-empty list of messages", "messages")
    for i, m in enumerate(msgs):
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise bad(f"messages[{i}].role must be a string", "messages")
    messages = [{"role": m["role"], "content": _content(m, i)} for i, m in enumerate(msgs)]
    want = _flag(body, "logprobs")
    k = _integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if k is not None and not want:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    opts.update(logprobs=want, k=k or 0)
    limit = _integer(body, "max_completion_tokens", None, 0, 1 << 20)
    limit = _integer(body, "max_tokens", 16, 0, 1 << 20) if limit is None else limit
    prompt = chat_prompt(messages, getattr(backend, "tokenizer", None) if isinstance(backend, TeacherBackend) else None)
    ask = Ask([prompt] * opts["n"], limit, opts["temperature"], (k or 0) if want and backend.logprobs else None,
              False, opts["seed"])
    return ask, opts


class Render:
    """Answers written as OpenAI's completion / chat.completion objects and stream chunks."""

    @staticmethod
    def token(backend, opts: dict, tid: int) -> str:
        return f"token_id:{tid}" if opts["token_ids"] else backend.tokenizer.decode([tid])

    def completion_logprobs(self, backend, opts, scored: list[Scored] | None, offsets: list[int] | None):
        if scored is None:
            return None
        name = lambda t: self.token(backend, opts, t)  # noqa: E731
        tops = []
        for s in scored:
            if s.top is None:
                tops.append(None)
                continue
            top = {name(i): lp for i, lp in s.top}
            top.setdefault(name(s.id), s.logprob)  # the returned token is always listed, as vLLM and OpenAI do
            tops.append(top)
        return {"tokens": [name(s.id) for s in scored], "token_logprobs": [s.logprob for s in scored],
                "top_logprobs": tops, "text_offset": list(offsets or [])}

    def chat_logprobs(self, backend, opts, scored: list[Scored] | None):
        if scored is None:
            return None

        def entry(tid: int, lp: float) -> dict:
            tok = self.token(backend, opts, tid)
            return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}

        return {"content": [{**entry(s.id, s.logprob), "top_logprobs": [entry(i, lp) for i, lp in (s.top or [])]}
                            for s in scored], "refusal": None}

    @staticmethod
    def usage(answers: list[Answer], n: int) -> dict:
        prompt = sum(a.prompt_tokens for a in answers[::n])  # a prompt sent n times is counted once
        done = sum(a.completion_tokens for a in answers)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def response(self, answers: list[Answer], meta: dict, chat: bool, opts: dict, backend) -> dict:
        choices = []
        for i, a in enumerate(answers):
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": a.text},
                                "logprobs": self.chat_logprobs(backend, opts, a.scored) if opts["logprobs"] else None,
                                "finish_reason": a.finish_reason})
            else:
                lp = self.completion_logprobs(backend, opts, a.scored, a.offsets) if opts["logprobs"] else None
                choices.append({"index": i, "text": a.text, "logprobs": lp, "finish_reason": a.finish_reason})
        return {**meta, "object": "chat.completion" if chat else "text_completion",
                "system_fingerprint": answers[0].version if answers else None, "choices": choices,
                "usage": self.usage(answers, opts["n"])}

    def events(self, first, pieces, meta: dict, chat: bool, opts: dict, backend, front: "Front", rows: int):
        """Server-sent events: ``data: {chunk}`` per piece, finish chunks, usage when asked, ``data: [DONE]``."""
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list, version=None, **extra) -> bytes:
            body = {**meta, "object": kind, "system_fingerprint": version, "choices": choices, **extra}
            return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"

        def piece(row: int, text: str, scored, offsets) -> bytes:
            if chat:
                lp = self.chat_logprobs(backend, opts, scored) if opts["logprobs"] and scored else None
                return chunk([{"index": row, "delta": {"content": text}, "logprobs": lp, "finish_reason": None}])
            lp = self.completion_logprobs(backend, opts, scored, offsets) if opts["logprobs"] and scored else None
            return chunk([{"index": row, "text": text, "logprobs": lp, "finish_reason": None}])

        try:
            if chat:
                for row in range(rows):
                    yield chunk([{"index": row, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
            item = first
            while True:
                if isinstance(item, list):  # the finished answers
                    for row, a in enumerate(item):
                        end = {"delta": {}} if chat else {"text": ""}
                        yield chunk([{"index": row, **end, "logprobs": None, "finish_reason": a.finish_reason}],
                                    a.version)
                    if opts["include_usage"]:
                        yield chunk([], item[0].version if item else None, usage=self.usage(item, opts["n"]))
                    break
                if item[1] or item[2]:
                    yield piece(*item)
                item = next(pieces)
        except Exception as e:  # headers are gone: the error travels as an event, as vLLM does
            if isinstance(e, APIError):
                err = e
            elif isinstance(e, (ServingError, OSError)):
                err = _triton_failure(e, front.client)
            else:
                log.exception("openai front: stream failed")
                err = APIError(500, f"internal error ({type(e).__name__})")
            yield b"data: " + json.dumps(err.body()).encode() + b"\n\n"
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()  # a client that went away: the Triton stream is cancelled
        yield b"data: [DONE]\n\n"


render = Render()


# -- the front ----------------------------------------------------------------------------------------------


class Front:
    """The state behind the HTTP app: config, Triton client and the backend (found on first use)."""

    def __init__(self, cfg: FrontConfig):
        self.cfg = cfg
        self.client = ServingClient(cfg.triton_url, grpc_url=cfg.grpc_url, timeout_s=cfg.timeout_s)
        self._backend = None
        self._lock = threading.Lock()
        # Long-lived threads of its own (not anyio's, which exit when idle): each keeps its Triton client (one per
        # thread, serving.client), and gevent's per-thread hub is not torn down and rebuilt between requests.
        self.pool = ThreadPoolExecutor(cfg.threads, thread_name_prefix="openai-front")

    async def call(self, fn, *args):
        """``fn(*args)`` on the front's threads, Triton's failures as API errors."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.run, fn, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def backend(self):
        """The backend for the served model, from its config (``kdops_kind``); 503 while Triton is unreachable."""
        if self._backend is not None:
            return self._backend
        with self._lock:
            if self._backend is None:
                try:
                    config = self.client.model_config(self.cfg.model)
                except Exception as e:  # Triton down, or the model not loaded (yet): both pass, both are 503
                    raise APIError(503, f"{self.cfg.model} is not available on the model server ({e})") from e
                kind = config.get("parameters", {}).get("kdops_kind", {}).get("string_value", "")
                if kind == "lm-teacher":
                    try:
                        self._backend = TeacherBackend(self.cfg)
                    except (ValueError, OSError) as e:  # no tokenizer given, or not a tokenizer directory
                        raise APIError(500, str(e)) from e
                elif {"PROMPT", "COMPLETION"} <= _tensor_names(config):
                    tok = None
                    if self.cfg.tokenizer:
                        from transformers import AutoTokenizer

                        tok = AutoTokenizer.from_pretrained(self.cfg.tokenizer)
                    decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled"))
                    self._backend = StudentBackend(self.client, self.cfg.model, decoupled, tok)
                else:
                    raise APIError(500, f"{self.cfg.model} is neither a causal-LM student nor an LM teacher "
                                        f"(kdops_kind={kind!r}); this front serves generation models only")
        return self._backend

    def check_model(self, body: dict) -> None:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise bad("'model' is required", "model")
        if name != self.cfg.name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.cfg.name}`.", "model")

    def run(self, fn, *args):
        """A backend call, Triton's failures as API errors."""
        try:
            return fn(*args)
        except APIError:
            raise
        except (ServingError, OSError) as e:
            raise _triton_failure(e, self.client) from e


def _tensor_names(config: dict) -> set[str]:
    return {t["name"] for t in config.get("input", []) + config.get("output", [])}


def _close_after(step, events) -> None:
    if step is not None:
        wait([step])
    events.close()


def create_app(front: Front):
    """The FastAPI app of ``front``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="kdops OpenAI-compatible front", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        err = APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):  # never a traceback to the client; the log keeps it
        log.exception("openai front: %s %s failed", request.method, request.url.path)
        return JSONResponse(APIError(500, f"internal error ({type(e).__name__})").body(), status_code=500)

    def ok(payload: dict) -> Response:
        return Response(json.dumps(payload, ensure_ascii=False), media_type="application/json")

    key = os.environ.get(front.cfg.api_key_env, "") if front.cfg.api_key_env else ""
    if front.cfg.api_key_env and not key:
        raise ValueError(f"${front.cfg.api_key_env} is empty: set the key the front's clients must send, or no api_key_env.")

    @app.middleware("http")
    async def _key(request: Request, call_next):  # inference behind a key, as hosted APIs are; /health stays open
        if key and request.url.path != "/health":
            sent = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(sent.encode(), key.encode()):
                err = APIError(401, "Incorrect API key provided.", code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    @app.get("/v1/models")
    async def models():
        model = {"id": front.cfg.name, "object": "model", "created": 0, "owned_by": "kdops"}
        return ok({"object": "list", "data": [model]})

    @app.get("/health")
    async def health():
        live = await front.call(front.client.model_ready, front.cfg.model)
        return JSONResponse({"ready": live}, status_code=200 if live else 503)

    async def read(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not JSON ({e})") from e
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        front.check_model(body)
        return body

    async def answer(request: Request, chat: bool):
        body = await read(request)
        backend = front._backend or await front.call(front.backend)  # found once; no thread hop after
        ask, opts = (parse_chat if chat else parse_completion)(body, front.cfg, backend)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        meta = {"id": rid, "created": int(time.time()), "model": front.cfg.name}
        if not opts["stream"]:
            answers = await front.call(backend.complete, ask)
            return ok(render.response(answers, meta, chat, opts, backend))
        pieces = backend.stream(ask)
        # the first piece before any byte is sent: a refused request still gets its status code
        first = await front.call(next, pieces)
        events = render.events(first, pieces, meta, chat, opts, backend, front, len(ask.prompts))

        async def send():
            step = None
            try:
                while True:
                    step = front.pool.submit(next, events, None)  # events never raise: errors become events
                    event = await asyncio.wrap_future(step)
                    if event is None:
                        return
                    yield event
            finally:  # the stream ended or its client went away: close it (and its Triton stream) once idle
                front.pool.submit(_close_after, step, events)

        return StreamingResponse(send(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, chat=True)

    return app


# -- running it ---------------------------------------------------------------------------------------------


class OpenAIFront:
    """The front in a background thread of this process: ``start()``, ``url`` (``http://host:port``), ``stop()``;
    a context manager. Flows start it with a ``FrontConfig``."""

    def __init__(self, cfg: FrontConfig):
        self.cfg = cfg
        self.front = Front(cfg)
        self._server = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self, timeout_s: float = 30.0) -> "OpenAIFront":
        import uvicorn

        if self._thread is not None:
            raise RuntimeError("the front is already running")
        sock, self.url = _bind(self.cfg)
        self._server = uvicorn.Server(_uvicorn_config(self.front, "warning"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="openai-front",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the OpenAI front did not start at {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        self._server = self._thread = None
        self.front.close()
        self.front = Front(self.cfg)  # a fresh one for a later start()

    def __enter__(self) -> "OpenAIFront":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _bind(cfg: FrontConfig) -> tuple[socket.socket, str]:
    """The listening socket, bound here so that port 0 becomes a free port without a race; and the base URL."""
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((cfg.host, cfg.port))
    sock.listen(2048)  # listening now: a client told the URL before uvicorn runs waits instead of being refused
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return sock, f"http://{host}:{sock.getsockname()[1]}"


def _uvicorn_config(front: Front, log_level: str):
    import uvicorn

    return uvicorn.Config(create_app(front), log_level=log_level, access_log=False, lifespan="off",
                          timeout_keep_alive=30)


def serve_forever(cfg: FrontConfig, announce=print) -> None:
    """Run the front in the foreground (``kdops serve openai``) until interrupted; ``announce(url)`` once it listens.
    A model that is not a generation model fails here; an unreachable Triton only warns (requests get 503 until it
    answers)."""
    import uvicorn

    front = Front(cfg)
    try:
        front.backend()
    except APIError as e:
        if e.status != 503:
            raise ValueError(e.message) from e
        log.warning("%s; serving anyway: requests get 503 until Triton answers", e.message)
    sock, url = _bind(cfg)
    announce(url)
    try:
        uvicorn.Server(_uvicorn_config(front, "info")).run(sockets=[sock])
    finally:
        front.close()
