"""The answer cache with its spend ledger, and the one ``openai`` client: concurrency, retries, spend cap."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from kdops.api_teacher.config import ApiTeacherConfig, ApiTeacherError, SpendCapReached

log = logging.getLogger(__name__)


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
