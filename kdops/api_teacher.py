"""Teachers behind an OpenAI-compatible API (vLLM, SGLang, llama.cpp's server, hosted models, ``kdops serve openai``).

The only module that imports ``openai``. Two teachers speak the kdops teacher protocols:

- ``ApiClassifierTeacher`` (``id``, ``label_names``, ``logits``): soft labels over the label words, by the first
  method the server supports (``ApiTeacherConfig.method = "auto"``):
  ``echo``: the log-likelihood of each label word after the prompt (completions with ``echo`` and ``logprobs``,
  as lm-evaluation-harness scores choices), exact for multi-token words;
  ``top_logprobs``: the first answer token's top log-probs, label words matched on their first token;
  ``votes``: k sampled answers counted per label (smoothed), for servers that return no log-probs.
- ``ApiLMTeacher`` (``kdops.lm.teacher.LMTeacher``): generations for sequence-level KD, and prompt top-k
  log-probs for token-level KD when the server returns them and its token ids match the local tokenizer's.

Every answer is cached per (base URL, model, prompt-template hash, input) in one SQLite file with the method that
produced it, so a re-run makes no call. Calls run ``concurrency`` at a time; 429, 5xx, timeouts and dropped
connections are retried with exponential backoff (``Retry-After`` honoured); each call's requests and tokens are
recorded for the round's tracking run, and a spend cap stops the round with what it paid for cached. The API key
is read from the environment variable the config names, and is never stored, logged or passed as a parameter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kdops.errors import UserError

log = logging.getLogger(__name__)

METHODS = ("auto", "echo", "top_logprobs", "votes")
DEFAULT_PROMPT = "Classify the text as one of: {labels}.\nText: {text}\nAnswer:"
_FLOOR = 1e-6  # the probability a label nobody voted for or outside the top log-probs keeps


class ApiTeacherError(UserError):
    """The teacher's API failed after its retries, or answered something kdops cannot read."""


class SpendCapReached(UserError):
    """The round spent its request or token budget; what it paid for stays cached."""


class NoLogprobs(Exception):
    """The server returned no log-probs for a method that needs them (internal: the next method is tried)."""


@dataclass(frozen=True)
class ApiTeacherConfig:
    """One OpenAI-compatible teacher. Hashable, and free of secrets: the key stays in ``api_key_env``."""

    base_url: str = field(metadata={"help": "The API's base URL, e.g. http://127.0.0.1:8000/v1."})
    model: str = field(metadata={"help": "The model name the server knows."})
    prompt: str = field(default=DEFAULT_PROMPT, metadata={"help": "Prompt template: {text}, and {labels} (the label words joined by ', ')."})
    endpoint: str = field(default="completions", metadata={"help": "completions or chat."})
    method: str = field(default="auto", metadata={"help": "auto, echo, top_logprobs or votes (see the module docstring)."})
    labels: tuple[str, ...] = field(default=(), metadata={"help": "Classification: the label set, in output order (empty: a causal LM)."})
    label_words: tuple[tuple[str, str], ...] = field(default=(), metadata={"help": "(label, the word the model answers for it); default: the label itself."})
    votes: int = field(default=8, metadata={"help": "Sampled answers per text when the server gives no log-probs."})
    top_logprobs: int = field(default=20, metadata={"help": "Alternatives per position asked for (top_logprobs, LM top-k)."})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "Environment variable holding the key (unset: no key)."})
    concurrency: int = field(default=4, metadata={"help": "Requests in flight at once."})
    timeout_s: float = field(default=30.0, metadata={"help": "Seconds before one request is abandoned (and retried)."})
    max_retries: int = field(default=4, metadata={"help": "Retries of one request on 429, 5xx, timeouts and dropped connections."})
    backoff_s: float = field(default=0.5, metadata={"help": "First retry's delay; doubled each retry (with jitter, at most 8 s)."})
    max_requests: int = field(default=0, metadata={"help": "Spend cap: requests one teacher object may make (0: none)."})
    max_tokens: int = field(default=0, metadata={"help": "Spend cap: prompt + completion tokens (0: none)."})
    cache: str = field(default="", metadata={"help": "Answer cache file (the home's api_answers.sqlite when empty)."})
    tokenizer: str = field(default="", metadata={"help": "Causal LM: the local tokenizer directory (the student's)."})

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")) or not self.model:
            raise UserError(f"an API teacher needs an http(s) base URL and a model name (got {self.base_url!r}, {self.model!r}).")
        if self.endpoint not in ("completions", "chat"):
            raise UserError(f"API teacher endpoint must be completions or chat, not {self.endpoint!r}.")
        if self.method not in METHODS:
            raise UserError(f"API teacher method must be one of {METHODS}, not {self.method!r}.")
        if self.method == "echo" and self.endpoint == "chat":
            raise UserError("the echo method scores prompts: it needs endpoint = \"completions\".")
        if min(self.votes, self.top_logprobs, self.concurrency) < 1 or self.timeout_s <= 0 or self.max_retries < 0:
            raise UserError("API teacher votes, top_logprobs and concurrency must be >= 1, timeout_s > 0, max_retries >= 0.")
        if "{text}" not in self.prompt:
            raise UserError(f"the API teacher's prompt template has no {{text}}: {self.prompt!r}.")

    @property
    def template_sha(self) -> str:
        return hashlib.sha256(self.prompt.encode()).hexdigest()[:16]

    def words(self, labels: Sequence[str]) -> list[str]:
        mapped = dict(self.label_words)
        return [mapped.get(label, label) for label in labels]

    def to_json(self) -> str:
        """The config as a flow parameter: no key in it, only the variable's name."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ApiTeacherConfig":
        d = json.loads(text)
        d["labels"] = tuple(d.get("labels") or ())
        d["label_words"] = tuple(tuple(p) for p in d.get("label_words") or ())
        return cls(**d)

    @classmethod
    def from_options(cls, base_url: str, model: str, options: dict, labels: Sequence[str] = (),
                     label_words: dict | None = None, cache: str = "") -> "ApiTeacherConfig":
        """From a project file's ``[teacher.api]`` table; UserError names an unknown option."""
        known = {f for f in cls.__dataclass_fields__} - {"base_url", "model", "labels", "label_words", "cache"}
        bad = sorted(set(options) - known)
        if bad:
            raise UserError(f"[teacher.api] unknown option(s) {bad}; known: {sorted(known)}.")
        unknown = sorted(set(label_words or {}) - set(labels))
        if unknown:
            raise UserError(f"[teacher.label_words] names {unknown}, which are not in [task] labels {list(labels)}.")
        return cls(base_url=base_url, model=model, labels=tuple(labels),
                   label_words=tuple(sorted((label_words or {}).items())), cache=cache, **options)


# ---------------------------------------------------------------------------------------------------------------
# The answer cache and the spend ledger


class AnswerCache:
    """SQLite: one row per (teacher id, input hash) with the method that produced it; one row per API call."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS answers (teacher_id TEXT NOT NULL, key TEXT NOT NULL, "
                       "method TEXT NOT NULL, answer TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (teacher_id, key))")
            db.execute("CREATE TABLE IF NOT EXISTS calls (ts REAL NOT NULL, teacher_id TEXT NOT NULL, requests INTEGER, "
                       "prompt_tokens INTEGER, completion_tokens INTEGER, retried INTEGER, failed INTEGER)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    def lookup(self, teacher_id: str, keys: Sequence[str]) -> dict[str, tuple[str, Any]]:
        found: dict[str, tuple[str, Any]] = {}
        keys = list(dict.fromkeys(keys))
        with self._connect() as db:
            for s in range(0, len(keys), 900):
                part = keys[s:s + 900]
                q = f"SELECT key, method, answer FROM answers WHERE teacher_id=? AND key IN ({','.join('?' * len(part))})"
                found.update((k, (m, json.loads(a))) for k, m, a in db.execute(q, [teacher_id, *part]))
        return found

    def store(self, teacher_id: str, rows: Sequence[tuple[str, str, Any]]) -> None:
        now = time.time()
        with self._connect() as db:
            db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)",
                           [(teacher_id, k, m, json.dumps(a), now) for k, m, a in rows])

    def methods(self, teacher_id: str) -> dict[str, int]:
        with self._connect() as db:
            return dict(db.execute("SELECT method, COUNT(*) FROM answers WHERE teacher_id=? GROUP BY method", (teacher_id,)))

    def record_call(self, teacher_id: str, usage: dict) -> None:
        with self._connect() as db:
            db.execute("INSERT INTO calls VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (time.time(), teacher_id, usage.get("requests", 0), usage.get("prompt_tokens", 0),
                        usage.get("completion_tokens", 0), usage.get("retried", 0), usage.get("failed", 0)))

    def usage_since(self, t0: float, teacher_id: str | None = None) -> dict[str, int]:
        q = ("SELECT COALESCE(SUM(requests),0), COALESCE(SUM(prompt_tokens),0), COALESCE(SUM(completion_tokens),0), "
             "COALESCE(SUM(retried),0), COALESCE(SUM(failed),0) FROM calls WHERE ts >= ?")
        args: list = [t0]
        if teacher_id:
            q, args = q + " AND teacher_id = ?", [t0, teacher_id]
        with self._connect() as db:
            r = db.execute(q, args).fetchone()
        return {"requests": r[0], "prompt_tokens": r[1], "completion_tokens": r[2], "tokens": r[1] + r[2],
                "retried_calls": r[3], "failed_calls": r[4]}


def input_key(value: Any) -> str:
    raw = value if isinstance(value, str) else json.dumps(value)
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Calls: concurrency, retries, spend


class ApiClient:
    """The ``openai`` client with kdops' retry policy, spend cap and call ledger (one per teacher object)."""

    def __init__(self, cfg: ApiTeacherConfig, teacher_id: str, cache: AnswerCache):
        import openai

        self.cfg, self.teacher_id, self.cache = cfg, teacher_id, cache
        self._openai = openai
        # The key is read here and lives only inside the client object; a local server needs none.
        self.client = openai.OpenAI(base_url=cfg.base_url, api_key=os.environ.get(cfg.api_key_env) or "unused",
                                    timeout=cfg.timeout_s, max_retries=0)
        self.lock = threading.Lock()
        self.spent = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "retried": 0, "failed": 0}

    def _check_cap(self) -> None:
        cfg, s = self.cfg, self.spent
        tokens = s["prompt_tokens"] + s["completion_tokens"]
        if (cfg.max_requests and s["requests"] >= cfg.max_requests) or (cfg.max_tokens and tokens >= cfg.max_tokens):
            raise SpendCapReached(
                f"API teacher {self.cfg.model}: spend cap reached ({s['requests']} requests, {tokens} tokens; caps "
                f"max_requests={cfg.max_requests}, max_tokens={cfg.max_tokens}); the answers paid for are cached: "
                "raise the cap or re-run later to continue.")

    def _retryable(self, e: Exception) -> bool:
        o = self._openai
        if isinstance(e, (o.APITimeoutError, o.APIConnectionError, o.RateLimitError, o.InternalServerError)):
            return True
        return isinstance(e, o.APIStatusError) and (e.status_code in (408, 409, 429) or e.status_code >= 500)

    @staticmethod
    def _retry_after(e: Exception) -> float | None:
        response = getattr(e, "response", None)
        value = response.headers.get("retry-after") if response is not None else None
        try:
            return min(float(value), 30.0) if value is not None else None
        except ValueError:
            return None

    def call(self, endpoint: str, **kwargs):
        """One request with retries; raises ApiTeacherError when they run out, SpendCapReached over budget."""
        api = self.client.completions if endpoint == "completions" else self.client.chat.completions
        attempt = 0
        while True:
            with self.lock:
                self._check_cap()
                self.spent["requests"] += 1
            try:
                response = api.create(model=self.cfg.model, **kwargs)
            except self._openai.BadRequestError:
                self.cache.record_call(self.teacher_id, {"requests": 1})
                raise  # a request this server cannot answer: the caller may try another method
            except Exception as e:
                retry = self._retryable(e) and attempt < self.cfg.max_retries
                with self.lock:
                    self.spent["retried" if retry else "failed"] += 1
                self.cache.record_call(self.teacher_id, {"requests": 1, "retried": int(retry), "failed": int(not retry)})
                if not retry:
                    what = getattr(e, "status_code", None) or type(e).__name__
                    raise ApiTeacherError(f"API teacher {self.cfg.model} at {self.cfg.base_url}: request failed after "
                                          f"{attempt + 1} attempt(s) ({what}: {_one_line(e)}); answers so far are "
                                          "cached, re-run to continue.") from e
                delay = self._retry_after(e)
                if delay is None:
                    delay = min(8.0, self.cfg.backoff_s * 2 ** attempt) * (0.5 + random.random())
                log.info("API teacher: %s, retry %d in %.2f s", type(e).__name__, attempt + 1, delay)
                time.sleep(delay)
                attempt += 1
                continue
            usage = getattr(response, "usage", None)
            spent = {"requests": 1, "prompt_tokens": int(getattr(usage, "prompt_tokens", 0) or 0),
                     "completion_tokens": int(getattr(usage, "completion_tokens", 0) or 0)}
            with self.lock:
                self.spent["prompt_tokens"] += spent["prompt_tokens"]
                self.spent["completion_tokens"] += spent["completion_tokens"]
            self.cache.record_call(self.teacher_id, spent)
            return response

    def map(self, fn, items: Sequence) -> list:
        """``fn`` over ``items``, ``concurrency`` at a time, results in order; the first error propagates."""
        if self.cfg.concurrency == 1 or len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            return list(pool.map(fn, items))


def _cache_path(cfg: ApiTeacherConfig, cache_path: str | Path) -> Path:
    if cfg.cache or cache_path:
        return Path(cfg.cache or cache_path)
    from kdops.paths import Home

    return Home.from_env().api_answers


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


def _norm(token: str) -> str:
    return token.replace("Ġ", " ").replace("▁", " ").strip().lower()


# ---------------------------------------------------------------------------------------------------------------
# Classification


class ApiClassifierTeacher:
    """``kdops.teacher.Teacher`` over an OpenAI-compatible API; ``logits`` are log-probabilities over the labels."""

    def __init__(self, cfg: ApiTeacherConfig, cache_path: str | Path = "", label_names: Sequence[str] | None = None):
        label_names = list(label_names or cfg.labels)
        if not label_names:
            raise UserError("an API teacher for classification needs the label set: set [task] labels in kdops.toml.")
        self.cfg, self.label_names = cfg, list(label_names)
        self.words = cfg.words(self.label_names)
        ident = [cfg.base_url.rstrip("/"), cfg.model, cfg.endpoint, cfg.template_sha, self.label_names, self.words]
        self.id = "openai:" + hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]
        self.answers = AnswerCache(_cache_path(cfg, cache_path))
        self.api = ApiClient(cfg, self.id, self.answers)
        self._method = None if cfg.method == "auto" else cfg.method

    def num_parameters(self) -> None:
        return None

    def prompt(self, text: str) -> str:
        return self.cfg.prompt.replace("{labels}", ", ".join(self.words)).replace("{text}", text)

    def usage_since(self, t0: float) -> dict[str, int]:
        return self.answers.usage_since(t0, self.id)

    def probabilities(self, texts: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """(N, labels) probabilities and the method behind each row; only uncached texts reach the API."""
        keys = [input_key(t) for t in texts]
        found = self.answers.lookup(self.id, keys)
        todo = list(dict.fromkeys(k for k in keys if k not in found))
        if todo:
            by_key = dict(zip(keys, texts))

            def one(k):  # stored as it comes: a round stopped by a fault or the spend cap keeps what it paid for
                method, probs = self._answer(by_key[k])
                self.answers.store(self.id, [(k, method, probs)])
                return method, probs

            if self._method is None:  # find the server's method on one text before fanning out
                found[todo[0]] = one(todo[0])
                todo = todo[1:]
            found.update(zip(todo, self.api.map(one, todo)))
        probs = np.array([found[k][1] for k in keys], np.float64).reshape(len(keys), len(self.label_names))
        return probs, [found[k][0] for k in keys]

    def logits(self, texts: list[str]) -> np.ndarray:
        probs, _ = self.probabilities(texts)
        return np.log(np.clip(probs, _FLOOR, 1.0)).astype(np.float32)

    # one text -> (method, probabilities)
    def _answer(self, text: str) -> tuple[str, list[float]]:
        order = [self._method] if self._method else (
            ["echo", "top_logprobs", "votes"] if self.cfg.endpoint == "completions" else ["top_logprobs", "votes"])
        for method in order:
            try:
                probs = getattr(self, f"_by_{method}")(self.prompt(text))
            except NoLogprobs as e:
                if self.cfg.method != "auto":  # the config asked for this method: say so rather than switch silently
                    raise ApiTeacherError(f"API teacher {self.cfg.model}: {e}; set [teacher] method = \"auto\" or \"votes\".") from None
                log.info("API teacher %s: %s; trying the next method", self.cfg.model, e)
                continue
            if self._method is None:
                self._method = method
                log.info("API teacher %s: soft labels by %s", self.cfg.model, method)
            return method, probs
        raise ApiTeacherError(f"API teacher {self.cfg.model}: no method worked.")

    def _create(self, **kwargs):
        try:
            return self.api.call(self.cfg.endpoint, **kwargs)
        except self.api._openai.BadRequestError as e:
            raise NoLogprobs(f"the server refused the request ({_one_line(e)})") from None

    @staticmethod
    def _normalise(scores: Sequence[float]) -> list[float]:
        s = np.asarray(scores, np.float64)
        p = np.exp(s - s.max())
        return (p / p.sum()).tolist()

    def _by_echo(self, prompt: str) -> list[float]:
        """Log-likelihood of each label word after the prompt: one request, one prompt per label."""
        prompts = [prompt + " " + w for w in self.words]
        res = self._create(prompt=prompts, max_tokens=0, echo=True, logprobs=1, temperature=0)
        choices = sorted(res.choices, key=lambda c: c.index)
        if len(choices) != len(prompts):
            raise NoLogprobs(f"echo returned {len(choices)} choices for {len(prompts)} prompts")
        scores = []
        for c in choices:
            lp = c.logprobs
            if lp is None or not lp.token_logprobs or lp.text_offset is None:
                raise NoLogprobs("no prompt log-probs in the echo answer")
            picked = [v for off, v in zip(lp.text_offset, lp.token_logprobs) if off >= len(prompt) and v is not None]
            if not picked:
                raise NoLogprobs("the echo answer has no tokens after the prompt")
            scores.append(sum(picked))
        return self._normalise(scores)

    def _by_top_logprobs(self, prompt: str) -> list[float]:
        """The first answer token's alternatives; a label word is matched on its first token."""
        k = min(self.cfg.top_logprobs, 20)
        if self.cfg.endpoint == "completions":
            res = self._create(prompt=prompt, max_tokens=1, logprobs=k, temperature=0)
            lp = res.choices[0].logprobs
            top = lp.top_logprobs[0] if lp is not None and lp.top_logprobs else None
            pairs = list(top.items()) if top else []
        else:
            res = self._create(messages=[{"role": "user", "content": prompt}], max_tokens=1, logprobs=True,
                               top_logprobs=k, temperature=0)
            lp = res.choices[0].logprobs
            content = lp.content if lp is not None else None
            pairs = [(t.token, t.logprob) for t in content[0].top_logprobs] if content else []
        if not pairs:
            raise NoLogprobs("no top log-probs in the answer")
        best: dict[int, float] = {}
        for token, value in pairs:
            t = _norm(token)
            for i, w in enumerate(self.words):
                if t and _norm(w).startswith(t) and value > best.get(i, -np.inf):
                    best[i] = value
        if not best:
            raise NoLogprobs(f"none of the label words {self.words} is among the top {k} answer tokens")
        floor = min(v for _, v in pairs) - np.log(2.0)  # unlisted: below everything listed
        return self._normalise([best.get(i, floor) for i in range(len(self.words))])

    def _by_votes(self, prompt: str) -> list[float]:
        """``votes`` sampled answers, each counted for the label word it starts with (smoothed by half a vote)."""
        counts = np.zeros(len(self.words))
        got = 0
        while got < self.cfg.votes:
            n = self.cfg.votes - got
            if self.cfg.endpoint == "completions":
                res = self._create(prompt=prompt, max_tokens=4, n=n, temperature=1.0)
                texts = [c.text for c in res.choices]
            else:
                res = self._create(messages=[{"role": "user", "content": prompt}], max_tokens=4, n=n, temperature=1.0)
                texts = [c.message.content or "" for c in res.choices]
            if not texts:
                raise ApiTeacherError(f"API teacher {self.cfg.model}: an answer with no choices.")
            for t in texts[:n]:
                i = self._label_of(t)
                if i is not None:
                    counts[i] += 1
            got += len(texts[:n])
        return ((counts + 0.5) / (counts.sum() + 0.5 * len(counts))).tolist()

    def _label_of(self, answer: str) -> int | None:
        words = re.findall(r"[\w'-]+", answer.lower())
        if not words:
            return None
        for i, w in enumerate(self.words):
            if _norm(w).split()[:1] == words[:1]:
                return i
        return None


# ---------------------------------------------------------------------------------------------------------------
# Causal LM


class TokenizerMismatch(Exception):
    """The server's token ids differ from the local tokenizer's: token-level KD is off, sequence-level stays."""


class ApiLMTeacher:
    """``kdops.lm.teacher.LMTeacher`` over an OpenAI-compatible completions API and a local tokenizer.

    ``generate`` asks for greedy continuations of the decoded prompts (sequence-level KD) and re-encodes them;
    ``topk`` sends token ids with ``echo`` and vLLM's ``return_tokens_as_token_ids``, and refuses
    (``TokenizerMismatch``) when the server's ids are not the ones sent."""

    def __init__(self, cfg: ApiTeacherConfig, cache_path: str | Path = ""):
        if not cfg.tokenizer:
            raise UserError("an API teacher for a causal LM needs [teacher] tokenizer: the local tokenizer directory.")
        from transformers import AutoTokenizer

        from kdops.lm.teacher import start_token_id

        self.cfg = cfg
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
        except (OSError, ValueError) as e:
            raise UserError(f"[teacher] tokenizer {cfg.tokenizer}: not a tokenizer directory ({_one_line(e)}).") from e
        self.vocab_size = len(self.tokenizer)
        self.start_id = start_token_id(None, self.tokenizer)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.start_id
        vocab = hashlib.sha256(json.dumps(sorted(self.tokenizer.get_vocab().items())).encode()).hexdigest()[:16]
        ident = [cfg.base_url.rstrip("/"), cfg.model, cfg.template_sha, vocab]
        self.id = "openai-lm:" + hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]
        self.answers = AnswerCache(_cache_path(cfg, cache_path))
        self.api = ApiClient(cfg, self.id, self.answers)
        self.token_level: bool | None = None  # None: not known until the first top-k answer

    def num_parameters(self) -> None:
        return None

    @property
    def max_topk(self) -> int:
        return min(self.cfg.top_logprobs, 20)  # vLLM's and OpenAI's limit on alternatives per position

    def usage_since(self, t0: float) -> dict[str, int]:
        return self.answers.usage_since(t0, self.id)

    def token_level_for(self, sequences) -> bool:
        """Whether the server returns top-k log-probs over the same token ids as the local tokenizer (tried on
        ``sequences``, which are then cached)."""
        try:
            self.topk(sequences, self.max_topk)
        except TokenizerMismatch:
            return False
        return True

    def new_student(self, layers: int, seed: int = 0):
        """A first student with no local teacher weights: the architecture in the tokenizer directory's
        ``config.json`` with ``layers`` layers, randomly initialised."""
        from transformers import AutoConfig

        from kdops.lm.student import from_config

        if not (Path(self.cfg.tokenizer) / "config.json").is_file():
            raise UserError(f"a first causal-LM round with an API teacher builds its student from a model config: put "
                            f"one (config.json) beside the tokenizer in {self.cfg.tokenizer}, or continue a champion.")
        config = AutoConfig.from_pretrained(self.cfg.tokenizer)
        config.num_hidden_layers = layers
        return from_config(config, self.vocab_size, seed=seed)

    def scores(self, sequences) -> list[tuple[float, int, np.ndarray]]:
        """Per sequence (summed NLL of its predicted tokens, their count, top-1 id at each position), from the
        server's prompt log-probs (echo) plus one generated token for the last position's top-1."""
        def one(seq):
            res = self.api.call("completions", prompt=seq, max_tokens=1, echo=True, logprobs=1, temperature=0,
                                extra_body={"return_tokens_as_token_ids": True})
            lp = res.choices[0].logprobs
            if lp is None or not lp.token_logprobs or not lp.top_logprobs:
                raise ApiTeacherError(f"API teacher {self.cfg.model}: no prompt log-probs (echo) to score text with.")
            nll = -sum(v for v in lp.token_logprobs[1:len(seq)] if v is not None)
            top1 = [max(t.items(), key=lambda x: x[1])[0] if t else "token_id:0" for t in lp.top_logprobs[1:len(seq) + 1]]
            return [nll, len(seq) - 1, [_token_id(t) for t in top1]]

        rows = self._cached("scores", [list(map(int, s)) for s in sequences], one)
        return [(float(n), int(c), np.asarray(t, np.int32)) for n, c, t in rows]

    def encode(self, texts: Sequence[str], max_length: int = 64) -> list[list[int]]:
        from kdops.lm.teacher import encode_texts

        return encode_texts(self.tokenizer, self.start_id, texts, max_length)

    def _cached(self, method: str, inputs: list, compute) -> list:
        keys = [input_key([method, x]) for x in inputs]
        found = {k: a for k, (m, a) in self.answers.lookup(self.id, keys).items()}
        todo = list(dict.fromkeys(k for k in keys if k not in found))
        by_key = dict(zip(keys, inputs))

        def one(k):
            answer = compute(by_key[k])
            self.answers.store(self.id, [(k, method, answer)])
            return answer

        found.update(zip(todo, self.api.map(one, todo)))
        return [found[k] for k in keys]

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        def one(x):
            ids, new = x
            text = self.tokenizer.decode([t for t in ids if t != self.start_id])
            res = self.api.call("completions", prompt=text, max_tokens=new, temperature=0)
            return res.choices[0].text

        texts = self._cached("generate", [[list(map(int, p)), int(max_new_tokens)] for p in prompts], one)
        out = []
        for t in texts:
            ids = self.tokenizer(t, add_special_tokens=False)["input_ids"][:max_new_tokens]
            out.append(ids)
        return out

    def topk(self, sequences, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sequence, the teacher's top-k next-token (ids, log-probs) at each position but the last."""
        seqs = [self.encode([s])[0] if isinstance(s, str) else list(map(int, s)) for s in sequences]
        k = min(k, self.cfg.top_logprobs)

        def one(seq):
            try:
                res = self.api.call("completions", prompt=seq, max_tokens=0, echo=True, logprobs=k, temperature=0,
                                    extra_body={"return_tokens_as_token_ids": True})
            except self.api._openai.BadRequestError as e:
                raise TokenizerMismatch(f"the server refused a token-id prompt with echo ({_one_line(e)})") from None
            lp = res.choices[0].logprobs
            if lp is None or not lp.top_logprobs:
                raise TokenizerMismatch("the server returned no prompt log-probs")
            got = [_token_id(t) for t in lp.tokens]
            if got != seq:
                raise TokenizerMismatch("the server's token ids differ from the local tokenizer's")
            rows = []
            for top in lp.top_logprobs[1:]:
                pairs = sorted(((_token_id(t), v) for t, v in (top or {}).items()), key=lambda p: -p[1])[:k]
                pairs += [(0, -1e4)] * (k - len(pairs))  # pad: a server may list fewer than asked
                rows.append(pairs)
            return rows

        try:
            rows = self._cached(f"topk{k}", seqs, one)
        except TokenizerMismatch as e:
            self.token_level = False
            log.warning("API teacher %s: token-level KD off (%s); sequence-level KD only", self.cfg.model, e)
            raise
        self.token_level = True
        out = []
        for r in rows:
            ids = np.array([[p[0] for p in row] for row in r], np.int64).reshape(len(r), k)
            lps = np.array([[p[1] for p in row] for row in r], np.float32).reshape(len(r), k)
            out.append((ids, lps))
        return out


def _token_id(token: str) -> int:
    if not token.startswith("token_id:"):
        raise TokenizerMismatch(f"the server does not return token ids ({token!r})")
    return int(token.split(":", 1)[1])
