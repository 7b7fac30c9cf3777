"""OpenAI's schema for the front (serving/openai_front.py): requests parsed into an ``Ask``, a backend's
``Answer``s rendered as responses or server-sent events, and errors as OpenAI answers them."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from serving.client import ServingClient, ServingError

if TYPE_CHECKING:
    from serving.openai_front import Front, FrontConfig
log = logging.getLogger(__name__)

MAX_LOGPROBS = 20  # the most alternatives per position a request may ask for (vLLM's default limit)


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
    prompt = chat_prompt(messages, backend.chat_tokenizer)
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
