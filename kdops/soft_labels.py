"""Stage 2b: teacher soft labels, computed once per (teacher id, input content) and reused forever.

The cache is one SQLite file: a row per (teacher id, sha256 of the text) holding the teacher's logits as
float32 bytes. A changed teacher has a new id, so its entries never mix with the old one's; the old rows
stay until ``prune`` removes them. SQLite gives atomic writes and safe concurrent readers for free.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from kdops.teacher import Teacher


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    teacher_seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def to_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "hit_rate": round(self.hit_rate, 4),
                "teacher_seconds": round(self.teacher_seconds, 3)}


def fill_missing(keys: Sequence[str], inputs: Sequence, found: dict, stats: CacheStats,
                 compute: Callable[[list[tuple[str, Any]]], Sequence], chunk: int, desc: str, unit: str,
                 progress: bool = False) -> dict:
    """Complete ``found`` (key -> cached value) for every key: the unique missing (key, input) pairs go to
    ``compute`` in chunks of ``chunk``; ``compute(part)`` runs the teacher, stores the part (committed per chunk:
    a killed run keeps what it paid for) and returns one value per pair. Hits, misses and teacher seconds go to
    ``stats``. Every teacher-output cache in kdops (logits, LM top-k, LM generations) fills through here."""
    todo: dict[str, Any] = {}
    for key, x in zip(keys, inputs):
        if key not in found:
            todo.setdefault(key, x)
    stats.hits += sum(1 for key in keys if key in found)
    stats.misses += len(todo)
    if todo:
        t0 = time.perf_counter()
        items = list(todo.items())
        bar = tqdm(total=len(items), desc=desc, unit=unit, disable=not progress)
        for s in range(0, len(items), chunk):
            part = items[s:s + chunk]
            found.update((key, v) for (key, _), v in zip(part, compute(part)))
            bar.update(len(part))
        bar.close()
        stats.teacher_seconds += time.perf_counter() - t0
    return found


class SoftLabelCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stats = CacheStats()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS soft_labels (teacher_id TEXT NOT NULL, key TEXT NOT NULL, "
                "dim INTEGER NOT NULL, logits BLOB NOT NULL, PRIMARY KEY (teacher_id, key))"
            )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    def key(self, teacher_id: str, texts: list[str]) -> str:
        """One id for 'these texts under this teacher': what lineage records as the soft-label cache key."""
        h = hashlib.sha256(teacher_id.encode())
        for t in texts:
            h.update(text_key(t).encode())
        return h.hexdigest()[:16]

    def lookup(self, teacher_id: str, texts: list[str]) -> dict[str, np.ndarray]:
        keys = list(dict.fromkeys(text_key(t) for t in texts))
        found: dict[str, np.ndarray] = {}
        with self._connect() as db:
            for s in range(0, len(keys), 900):  # SQLite's bound-parameter limit
                chunk = keys[s:s + 900]
                q = f"SELECT key, dim, logits FROM soft_labels WHERE teacher_id=? AND key IN ({','.join('?' * len(chunk))})"
                for k, dim, blob in db.execute(q, [teacher_id, *chunk]):
                    found[k] = np.frombuffer(blob, np.float32).reshape(dim)
        return found

    def store(self, teacher_id: str, texts: list[str], logits: np.ndarray) -> None:
        rows = [(teacher_id, text_key(t), int(v.shape[0]), np.ascontiguousarray(v, np.float32).tobytes())
                for t, v in zip(texts, logits)]
        with self._connect() as db:
            db.executemany("INSERT OR REPLACE INTO soft_labels VALUES (?, ?, ?, ?)", rows)

    def get_or_compute(self, teacher: Teacher, texts: list[str], chunk: int = 256, progress: bool = False) -> np.ndarray:
        """Logits for every text; the teacher runs only on texts this cache has not seen for it."""
        def compute(part: list[tuple[str, str]]) -> np.ndarray:
            batch = [t for _, t in part]
            out = np.asarray(teacher.logits(batch), np.float32)
            self.store(teacher.id, batch, out)
            return out

        keys = [text_key(t) for t in texts]
        found = fill_missing(keys, texts, self.lookup(teacher.id, texts), self.stats, compute, chunk,
                             "teacher soft labels", "text", progress)
        return np.stack([found[k] for k in keys]) if texts else np.zeros((0, len(teacher.label_names)), np.float32)

    def count(self, teacher_id: str | None = None) -> int:
        with self._connect() as db:
            if teacher_id is None:
                return db.execute("SELECT COUNT(*) FROM soft_labels").fetchone()[0]
            return db.execute("SELECT COUNT(*) FROM soft_labels WHERE teacher_id=?", (teacher_id,)).fetchone()[0]

    def prune(self, keep_teacher_id: str) -> int:
        """Drop entries of every other teacher (after a teacher change); returns how many rows went."""
        with self._connect() as db:
            return db.execute("DELETE FROM soft_labels WHERE teacher_id != ?", (keep_teacher_id,)).rowcount
