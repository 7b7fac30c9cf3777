"""The prediction log: every served prediction, where monitoring can read it.

Format: a directory of append-only JSON-lines shards, one shard per writer process (a Triton model
instance, a CLI run), named ``<source>-<pid>-<start ms>-<seq>.jsonl``. One record per line::

    {"ts": 1700000000.123, "text": "...", "probabilities": [0.1, 0.9], "label": "pos",
     "model": "student", "model_version": "3-1a2b3c4d"}

Why this shape:
- one writer per file, so concurrent instances never interleave bytes and need no lock;
- each batch is one ``write`` plus ``flush`` (no fsync: a server crash loses at most the batch in the
  OS page cache of a dead machine, not of a dead process); the hot-path cost is one syscall per batch;
- a shard rolls over past ``max_bytes`` so readers and retention work on closed files;
- a reader skips a torn last line (a writer killed mid-write), never fails on it;
- retention (``prune``) removes whole closed shards, oldest first, past an age or a total size; each writer prunes
  when it opens a shard, so the log stays bounded with no service of its own;
- ``redact``: texts are stored as their SHA-256 only (``text`` then holds ``sha256:<hex>``): nothing a user sent is
  kept, at the price of the text-based drift checks, which then have nothing to read.

This module imports only the standard library and pandas (lazily): ``model.py`` inside Triton and the
monitoring package both import it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

COLUMNS = ["time", "text", "probabilities", "label", "model", "model_version", "source"]


# A shard written to within this long may belong to a live writer: retention leaves it alone.
ACTIVE_S = 300.0


def prune(directory: str | Path, max_total_bytes: int | None = None, max_age_s: float | None = None,
          now: float | None = None) -> list[Path]:
    """Remove closed shards older than ``max_age_s``, then the oldest until the rest fit ``max_total_bytes``; a shard
    written to in the last ``ACTIVE_S`` seconds is kept whatever its size. Returns what was removed."""
    directory, now = Path(directory), time.time() if now is None else now
    shards = []
    for p in directory.glob("*.jsonl"):
        try:
            st = p.stat()
        except FileNotFoundError:  # another writer pruned it first
            continue
        shards.append((st.st_mtime, st.st_size, p))
    shards.sort()
    total, removed = sum(size for _, size, _ in shards), []
    for mtime, size, p in shards:
        if now - mtime < ACTIVE_S:
            break  # this one and every newer one may still be written
        if (max_age_s is not None and now - mtime > max_age_s) or (max_total_bytes is not None and total > max_total_bytes):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            total -= size
            removed.append(p)
    return removed


def redacted(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


class PredictionLogWriter:
    """Append-only writer for one process. Not thread-safe: one writer per thread or process.

    ``max_total_bytes`` / ``max_age_s``: the whole directory's retention, applied when a shard opens (None: keep all).
    ``redact``: store each text's SHA-256 instead of the text."""

    def __init__(self, directory: str | Path, source: str, max_bytes: int = 64 << 20,
                 max_total_bytes: int | None = None, max_age_s: float | None = None, redact: bool = False):
        if not source or "/" in source:
            raise ValueError(f"source must be a non-empty file-name-safe string, got {source!r}")
        self.directory, self.source, self.max_bytes = Path(directory), source, max_bytes
        self.max_total_bytes, self.max_age_s, self.redact = max_total_bytes, max_age_s, redact
        self._seq, self._fh = 0, None
        self._stamp = int(time.time() * 1000)

    def _open(self):
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.max_total_bytes is not None or self.max_age_s is not None:
            prune(self.directory, self.max_total_bytes, self.max_age_s)
        name = f"{self.source}-{os.getpid()}-{self._stamp}-{self._seq:05d}.jsonl"
        # Line-buffering is not enough under load (a line per syscall); we write whole batches ourselves.
        self._fh = open(self.directory / name, "a", encoding="utf-8")
        self._seq += 1

    def write_batch(self, texts: Sequence[str], probabilities, labels: Sequence[str], model: str,
                    model_version: str, ts: float | None = None) -> int:
        """Append one record per text and flush; returns the number of records written."""
        if not len(texts):
            return 0
        if not (len(texts) == len(probabilities) == len(labels)):
            raise ValueError("texts, probabilities and labels must have the same length")
        ts = time.time() if ts is None else ts
        lines = [
            json.dumps({"ts": ts, "text": redacted(t) if self.redact else t, "probabilities": [round(float(x), 6) for x in p], "label": lab,
                        "model": model, "model_version": model_version}, ensure_ascii=False)
            for t, p, lab in zip(texts, probabilities, labels)
        ]
        if self._fh is None or self._fh.tell() > self.max_bytes:
            self.close()
            self._open()
        self._fh.write("\n".join(lines) + "\n")
        self._fh.flush()
        return len(lines)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "PredictionLogWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _to_epoch(since) -> float | None:
    if since is None:
        return None
    if isinstance(since, (int, float)):
        return float(since)
    if isinstance(since, str):
        since = datetime.fromisoformat(since)
    if hasattr(since, "to_pydatetime"):  # pandas Timestamp
        since = since.to_pydatetime()
    if since.tzinfo is None:
        since = since.replace(tzinfo=timezone.utc)
    return since.timestamp()


def iter_records(directory: str | Path, since=None):
    """Yield raw records (dicts) from every shard, skipping torn or corrupt lines."""
    directory, cutoff = Path(directory), _to_epoch(since)
    if not directory.is_dir():
        return
    for shard in sorted(directory.glob("*.jsonl")):
        # A shard whose last write is older than the cutoff holds nothing newer: skip it unread.
        if cutoff is not None and shard.stat().st_mtime < cutoff:
            continue
        with open(shard, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break  # torn last line of a live or killed writer
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if cutoff is None or rec.get("ts", 0.0) >= cutoff:
                    rec["source"] = shard.name
                    yield rec


def read_predictions(directory: str | Path, since=None):
    """All logged predictions at or after ``since`` (epoch seconds, ISO string or datetime; naive = UTC).

    Returns a pandas DataFrame with columns ``time`` (UTC timestamps), ``text``, ``probabilities``
    (list of floats), ``label``, ``model``, ``model_version``, ``source`` (shard file), sorted by time.
    """
    import pandas as pd

    rows = list(iter_records(directory, since))
    if not rows:
        return pd.DataFrame({c: pd.Series(dtype="datetime64[ns, UTC]" if c == "time" else object) for c in COLUMNS})
    df = pd.DataFrame(rows)
    df["time"] = pd.to_datetime(df.pop("ts"), unit="s", utc=True)
    for c in COLUMNS:
        if c not in df:
            df[c] = None
    return df[COLUMNS].sort_values("time", kind="stable").reset_index(drop=True)
