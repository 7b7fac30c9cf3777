"""Stage 2b (LM): the teacher's top-k next-token distributions and greedy generations, computed once.

One SQLite file, two tables keyed by (teacher id, sha256 of the token-id sequence):
- ``topk``: for a sequence of L tokens, the teacher's top-k ids (L-1, k) int32 and log-probs (L-1, k)
  float32 for every next-token position. Top-k rather than full rows: 49,152 floats per token would be
  ~190 KB/token; k=32 keeps >95% of the mass on in-domain text at 256 bytes/token (the MiniLLM / GKD
  practice of sparse teacher targets).
- ``generations``: the teacher's greedy continuation of a prompt for a given ``max_new_tokens``, the targets of
  sequence-level KD (Kim & Rush 2016).
- ``scores``: what evaluation needs of the teacher on a held-out sequence: the summed negative log-likelihood
  of its tokens, their count, and the teacher's top-1 id at every position (perplexity and agreement), so
  each round's evaluation runs only the student on text the teacher has already scored.

The key is the token ids, not the text: the same text under another tokenizer or start token is another
sequence. A changed teacher has a new id and never mixes with the old one's rows.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from kdops.soft_labels import CacheStats, fill_missing

from kdops.lm.teacher import LMTeacher


def sequence_key(ids: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


# Hit/miss counting is the classifier cache's own; LM lookups count the same way.
LMCacheStats = CacheStats


class LMSoftLabelCache:
    """Top-k soft labels and generations of causal-LM teachers; the teacher runs only on unseen sequences."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stats = LMCacheStats()  # top-k lookups
        self.gen_stats = LMCacheStats()  # generation lookups
        self.score_stats = LMCacheStats()  # evaluation-score lookups
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # concurrent readers while one writer appends
            db.execute("CREATE TABLE IF NOT EXISTS topk (teacher_id TEXT NOT NULL, key TEXT NOT NULL, k INTEGER NOT NULL, "
                       "n INTEGER NOT NULL, ids BLOB NOT NULL, logprobs BLOB NOT NULL, PRIMARY KEY (teacher_id, key, k))")
            db.execute("CREATE TABLE IF NOT EXISTS generations (teacher_id TEXT NOT NULL, key TEXT NOT NULL, "
                       "max_new_tokens INTEGER NOT NULL, ids BLOB NOT NULL, "
                       "PRIMARY KEY (teacher_id, key, max_new_tokens))")
            db.execute("CREATE TABLE IF NOT EXISTS scores (teacher_id TEXT NOT NULL, key TEXT NOT NULL, nll REAL NOT NULL, "
                       "tokens INTEGER NOT NULL, top1 BLOB NOT NULL, PRIMARY KEY (teacher_id, key))")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    # -- top-k ---------------------------------------------------------------------------------

    def _select(self, sql: str, params: list, keys: Sequence[str]):
        """The rows of ``sql`` (ending ``AND key IN ({})``) for the unique ``keys``, queried in chunks under
        SQLite's bound-parameter limit."""
        uniq = list(dict.fromkeys(keys))
        with self._connect() as db:
            for s in range(0, len(uniq), 900):
                part = uniq[s:s + 900]
                yield from db.execute(sql.format(",".join("?" * len(part))), [*params, *part])

    def _lookup_topk(self, teacher_id: str, keys: list[str], k: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        sql = "SELECT key, n, ids, logprobs FROM topk WHERE teacher_id=? AND k=? AND key IN ({})"
        return {key: (np.frombuffer(ids, np.int32).reshape(n, k), np.frombuffer(lps, np.float32).reshape(n, k))
                for key, n, ids, lps in self._select(sql, [teacher_id, k], keys)}

    def get_or_compute_topk(self, teacher: LMTeacher, sequences: Sequence[Sequence[int]], k: int,
                            chunk: int = 64, progress: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sequence ``(ids (L-1, k) int32, logprobs (L-1, k) float32)``, in the order given."""
        keys = [sequence_key(s) for s in sequences]

        def compute(part: list[tuple[str, Sequence[int]]]) -> list[tuple[np.ndarray, np.ndarray]]:
            out = [(np.asarray(ids, np.int32), np.asarray(lps, np.float32))
                   for ids, lps in teacher.topk([list(seq) for _, seq in part], k)]
            with self._connect() as db:
                db.executemany("INSERT OR REPLACE INTO topk VALUES (?, ?, ?, ?, ?, ?)",
                               [(teacher.id, key, k, int(ids.shape[0]), np.ascontiguousarray(ids).tobytes(),
                                 np.ascontiguousarray(lps).tobytes()) for (key, _), (ids, lps) in zip(part, out)])
            return out

        found = fill_missing(keys, sequences, self._lookup_topk(teacher.id, list(dict.fromkeys(keys)), k), self.stats,
                             compute, chunk, "teacher top-k", "seq", progress)
        return [found[key] for key in keys]

    # -- evaluation scores ---------------------------------------------------------------------

    def get_or_compute_scores(self, teacher_id: str, sequences: Sequence[Sequence[int]],
                              compute: Callable[[list[list[int]]], list[tuple[float, int, np.ndarray]]],
                              chunk: int = 64) -> list[tuple[float, int, np.ndarray]]:
        """Per sequence ``(nll summed over its predicted tokens, their count, top-1 ids (L,) int32)``; ``compute``
        scores a list of sequences with the teacher (kdops.lm.evaluate.teacher_scores)."""
        keys = [sequence_key(s) for s in sequences]
        sql = "SELECT key, nll, tokens, top1 FROM scores WHERE teacher_id=? AND key IN ({})"
        found = {key: (float(nll), int(n), np.frombuffer(top1, np.int32))
                 for key, nll, n, top1 in self._select(sql, [teacher_id], keys)}

        def run(part: list[tuple[str, Sequence[int]]]) -> list[tuple[float, int, np.ndarray]]:
            out = [(float(nll), int(n), np.asarray(top1, np.int32)) for nll, n, top1 in compute([list(q) for _, q in part])]
            with self._connect() as db:
                db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?)",
                               [(teacher_id, key, nll, n, np.ascontiguousarray(top1).tobytes())
                                for (key, _), (nll, n, top1) in zip(part, out)])
            return out

        found = fill_missing(keys, sequences, found, self.score_stats, run, chunk, "teacher scores", "seq")
        return [found[key] for key in keys]

    # -- generations ---------------------------------------------------------------------------

    def get_or_generate(self, teacher: LMTeacher, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                        chunk: int = 32, progress: bool = False) -> list[list[int]]:
        """The teacher's greedy continuation (new tokens only) of every prompt, in the order given."""
        keys = [sequence_key(p) for p in prompts]
        sql = "SELECT key, ids FROM generations WHERE teacher_id=? AND max_new_tokens=? AND key IN ({})"
        found = {key: np.frombuffer(ids, np.int32).tolist()
                 for key, ids in self._select(sql, [teacher.id, max_new_tokens], keys)}

        def compute(part: list[tuple[str, Sequence[int]]]) -> list[list[int]]:
            gens = [list(g) for g in teacher.generate([list(p) for _, p in part], max_new_tokens)]
            with self._connect() as db:
                db.executemany("INSERT OR REPLACE INTO generations VALUES (?, ?, ?, ?)",
                               [(teacher.id, key, max_new_tokens, np.asarray(g, np.int32).tobytes())
                                for (key, _), g in zip(part, gens)])
            return gens

        found = fill_missing(keys, prompts, found, self.gen_stats, compute, chunk, "teacher generations", "seq", progress)
        return [found[key] for key in keys]

    # -- housekeeping --------------------------------------------------------------------------

    def count(self, teacher_id: str | None = None, table: str = "topk") -> int:
        if table not in ("topk", "generations"):
            raise ValueError("table must be 'topk' or 'generations'.")
        with self._connect() as db:
            if teacher_id is None:
                return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            return db.execute(f"SELECT COUNT(*) FROM {table} WHERE teacher_id=?", (teacher_id,)).fetchone()[0]

    def prune(self, keep_teacher_id: str) -> int:
        """Drop every other teacher's rows (after a teacher change); returns how many rows went."""
        with self._connect() as db:
            return sum(db.execute(f"DELETE FROM {t} WHERE teacher_id != ?", (keep_teacher_id,)).rowcount
                       for t in ("topk", "generations"))
