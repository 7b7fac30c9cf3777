"""The human-review queue: cases that need a person, kept in SQLite so they survive restarts.

Kinds: ``low_confidence`` and ``disagreement`` (a served text with payload ``{"text": ...}``),
``invalid_input`` (a request that failed validation), ``candidate`` (a model the gate sent to ``review``),
``drift`` (a monitoring window whose trigger asked for a person). A labelled text case flows back twice:
as a hard label into the next distillation round (``labelled_cases``) and into the golden evaluation set
(``golden_set``), which is frozen: a case that entered it never changes or leaves, so scores computed on
it stay comparable across champions.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

KINDS = ("low_confidence", "disagreement", "invalid_input", "candidate", "drift")
STATUSES = ("open", "approved", "rejected", "labelled")
DECISIONS = {"approve": "approved", "reject": "rejected", "label": "labelled"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    reason TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'open',
    decision TEXT,
    label TEXT,
    reviewer TEXT,
    created_at TEXT NOT NULL,
    decided_at TEXT
);
CREATE TABLE IF NOT EXISTS golden (
    case_id INTEGER PRIMARY KEY REFERENCES cases(id),
    text TEXT NOT NULL,
    label TEXT NOT NULL,
    added_at TEXT NOT NULL
);
-- Frozen means frozen: the database itself refuses to change or drop a golden row.
CREATE TRIGGER IF NOT EXISTS golden_no_update BEFORE UPDATE ON golden
BEGIN SELECT RAISE(ABORT, 'the golden set is frozen'); END;
CREATE TRIGGER IF NOT EXISTS golden_no_delete BEFORE DELETE ON golden
BEGIN SELECT RAISE(ABORT, 'the golden set is frozen'); END;
CREATE INDEX IF NOT EXISTS cases_status_kind ON cases(status, kind);
"""


class ReviewError(ValueError):
    """A review action that cannot be applied (unknown case, already decided, missing label)."""


def informative(student: np.ndarray, teacher: np.ndarray | None = None, teacher_rows: np.ndarray | None = None,
                k: int = 10, label_names=None) -> list[tuple[int, str, str]]:
    """The ``k`` rows of a window a person's label would teach the most, as ``(row, kind, reason)``, best first:
    rows where the teacher (on the rows it labelled, ``teacher_rows``) disagrees with the student, most confident
    teacher first; then the student's least confident rows."""
    student = np.asarray(student, float)
    out, taken = [], set()
    if teacher is not None and teacher_rows is not None and len(teacher_rows):
        s_lab, t_lab = student[teacher_rows].argmax(1), np.asarray(teacher).argmax(1)
        conf = np.asarray(teacher).max(1)
        name = (lambda i: label_names[i]) if label_names else str  # noqa: E731
        for j in np.argsort(-conf):
            if s_lab[j] != t_lab[j] and len(out) < k:
                out.append((int(teacher_rows[j]), "disagreement", f"teacher says {name(t_lab[j])} ({conf[j]:.2f}), "
                                                                  f"student served {name(s_lab[j])}"))
                taken.add(int(teacher_rows[j]))
    for i in np.argsort(student.max(1)):
        if len(out) >= k:
            break
        if int(i) not in taken:
            out.append((int(i), "low_confidence", f"student confidence {student[i].max():.2f}"))
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class ReviewQueue:
    """``ReviewQueue(path)``; every method opens its own short transaction, so several processes can share it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def add(self, kind: str, payload: dict, reason: str) -> int:
        """Queue a case; returns its id."""
        if kind not in KINDS:
            raise ReviewError(f"unknown kind {kind!r}; choose from {KINDS}.")
        with self._connect() as db:
            cur = db.execute("INSERT INTO cases (kind, payload, reason, created_at) VALUES (?, ?, ?, ?)",
                             (kind, json.dumps(payload, sort_keys=True), reason, _now()))
            return int(cur.lastrowid)

    @staticmethod
    def _row(r: sqlite3.Row) -> dict:
        d = dict(r)
        d["payload"] = json.loads(d["payload"])
        return d

    def get(self, case_id: int) -> dict:
        with self._connect() as db:
            r = db.execute("SELECT * FROM cases WHERE id = ?", (case_id,)).fetchone()
        if r is None:
            raise ReviewError(f"no case {case_id}.")
        return self._row(r)

    def list(self, status: str | None = None, kind: str | None = None, limit: int | None = None) -> list[dict]:
        """Cases, oldest first, optionally filtered by status and kind."""
        q, args = "SELECT * FROM cases WHERE 1=1", []
        if status is not None:
            q, args = q + " AND status = ?", args + [status]
        if kind is not None:
            q, args = q + " AND kind = ?", args + [kind]
        q += " ORDER BY id" + (f" LIMIT {int(limit)}" if limit else "")
        with self._connect() as db:
            return [self._row(r) for r in db.execute(q, args).fetchall()]

    def open(self, kind: str | None = None) -> list[dict]:
        """Open cases, oldest first."""
        return self.list("open", kind)

    def decide(self, case_id: int, decision: str, label: str | None = None, reviewer: str = "unknown",
               golden: bool = True) -> dict:
        """Close an open case: ``approve``, ``reject`` or ``label`` (needs ``label``).

        A labelled case with a text payload also enters the golden set unless ``golden=False``.
        """
        if decision not in DECISIONS:
            raise ReviewError(f"unknown decision {decision!r}; choose from {sorted(DECISIONS)}.")
        if decision == "label" and not label:
            raise ReviewError("a 'label' decision needs a label.")
        with self._connect() as db:
            r = db.execute("SELECT * FROM cases WHERE id = ?", (case_id,)).fetchone()
            if r is None:
                raise ReviewError(f"no case {case_id}.")
            if r["status"] != "open":
                # Decisions are final: re-deciding would silently rewrite training labels already used.
                raise ReviewError(f"case {case_id} is already {r['status']} (by {r['reviewer']}).")
            now = _now()
            db.execute("UPDATE cases SET status = ?, decision = ?, label = ?, reviewer = ?, decided_at = ? "
                       "WHERE id = ? AND status = 'open'", (DECISIONS[decision], decision, label, reviewer, now, case_id))
            text = json.loads(r["payload"]).get("text")
            if decision == "label" and golden and isinstance(text, str):
                db.execute("INSERT OR IGNORE INTO golden (case_id, text, label, added_at) VALUES (?, ?, ?, ?)",
                           (case_id, text, label, now))
        return self.get(case_id)

    def labelled_cases(self) -> pd.DataFrame:
        """Hard labels from people, for the next distillation round: columns id, text, label, kind, reviewer."""
        rows = [{"id": f"review-{c['id']}", "text": c["payload"].get("text"), "label": c["label"],
                 "kind": c["kind"], "reviewer": c["reviewer"]}
                for c in self.list("labelled") if isinstance(c["payload"].get("text"), str)]
        return pd.DataFrame(rows, columns=["id", "text", "label", "kind", "reviewer"])

    def golden_set(self) -> pd.DataFrame:
        """The frozen golden evaluation set: columns id, text, label, added_at (append-only)."""
        with self._connect() as db:
            rows = db.execute("SELECT case_id, text, label, added_at FROM golden ORDER BY case_id").fetchall()
        return pd.DataFrame([{"id": f"review-{r['case_id']}", "text": r["text"], "label": r["label"],
                              "added_at": r["added_at"]} for r in rows], columns=["id", "text", "label", "added_at"])

    def add_texts(self, picks: list[tuple[str, str, str]], per_day: int) -> list[int]:
        """Open ``(text, kind, reason)`` cases for people to label, within ``per_day`` text cases a UTC day; a text
        already in the queue (any status) is not asked again. Returns the new case ids."""
        day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        with self._connect() as db:
            used = db.execute("SELECT COUNT(*) FROM cases WHERE kind IN ('low_confidence', 'disagreement') "
                              "AND created_at >= ?", (day,)).fetchone()[0]
            known = {json.loads(r[0]).get("text") for r in db.execute(
                "SELECT payload FROM cases WHERE kind IN ('low_confidence', 'disagreement')")}
        ids = []
        for text, kind, reason in picks:
            if used + len(ids) >= per_day:
                break
            if text not in known:
                ids.append(self.add(kind, {"text": text}, reason))
                known.add(text)
        return ids

    def counts(self) -> dict[str, int]:
        with self._connect() as db:
            return {r[0]: r[1] for r in db.execute("SELECT status, COUNT(*) FROM cases GROUP BY status")}
