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
- a reader skips a torn last line (a writer killed mid-write), never fails on it.

This module imports only the standard library and pandas (lazily): ``model.py`` inside Triton and the
monitoring package both import it.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

COLUMNS = ["time", "text", "probabilities", "label", "model", "model_version", "source"]


class PredictionLogWriter:
    """Append-only writer for one process. Not thread-safe: one writer per thread or process."""

    def __init__(self, directory: str | Path, source: str, max_bytes: int = 64 << 20):
        if not source or "/" in source:
            raise ValueError(f"source must be a non-empty file-name-safe string, got {source!r}")
        self.directory, self.source, self.max_bytes = Path(directory), source, max_bytes
        self._seq, self._fh = 0, None
        self._stamp = int(time.time() * 1000)

    def _open(self):
        self.directory.mkdir(parents=True, exist_ok=True)
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
            json.dumps({"ts": ts, "text": t, "probabilities": [round(float(x), 6) for x in p], "label": lab,
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
