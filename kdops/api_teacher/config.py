"""An OpenAI-compatible teacher's configuration and errors: hashable, and free of secrets."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Sequence

from kdops.errors import UserError

METHODS = ("auto", "echo", "top_logprobs", "votes")
DEFAULT_PROMPT = "Classify the text as one of: {labels}.\nText: {text}\nAnswer:"


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
