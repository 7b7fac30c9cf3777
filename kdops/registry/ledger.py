"""The promotion ledger: one JSON entry per decision, kept as registered-model tags ``kdops.ledger.<time_ns>.<rand>``.

A fresh key per entry (never an overwrite) is what makes it append-only; tags travel with the model in any MLflow
backend and need no extra table. Keys sort by time, so reading them in key order reads the history.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone

from kdops.registry.store import actor, numeric_leaves

PREFIX = "kdops.ledger."
ACTIONS = ("promote", "rollback", "reject", "review")
MAX_SUMMARY_CHARS = 8000  # keep an entry readable: a larger summary keeps its numbers only


def entry(action: str, version: int | None, previous: int | None, reason: str, report_summary: dict | None,
          who: str | None) -> tuple[str, dict]:
    """``(tag key, entry)`` for one decision."""
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}.")
    summary = report_summary or {}
    if len(json.dumps(summary, default=str)) > MAX_SUMMARY_CHARS:
        summary = numeric_leaves(summary)
    e = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "actor": actor(who),
         "action": action, "version": version, "previous_champion": previous, "reason": reason,
         "report_summary": summary}
    return f"{PREFIX}{time.time_ns():020d}.{uuid.uuid4().hex[:6]}", e


def read(tags: dict[str, str]) -> list[dict]:
    """The entries among a registered model's tags, oldest first."""
    return [json.loads(tags[k]) for k in sorted(k for k in tags if k.startswith(PREFIX))]


def promoted_summary(entries: list[dict], version: int) -> dict | None:
    """The report summary recorded by the latest promotion of ``version`` (a rollback back to it records none)."""
    made = [e for e in entries if e.get("action") == "promote" and e.get("version") == int(version)]
    return (made[-1].get("report_summary") or None) if made else None


def best_slices(entries: list[dict], eval_id: str) -> dict[str, float]:
    """Each slice's best accuracy among the promotions evaluated on snapshot ``eval_id`` (others are not comparable)."""
    best: dict[str, float] = {}
    for e in entries:
        s = e.get("report_summary") or {}
        if e.get("action") != "promote" or s.get("eval_id") != eval_id:
            continue
        for dom, m in (s.get("per_domain") or {}).items():
            if isinstance(m, dict) and isinstance(m.get("accuracy"), (int, float)):
                best[dom] = max(best.get(dom, 0.0), float(m["accuracy"]))
    return best


def replaced_by(entries: list[dict], version: int) -> int | None:
    """The champion that the latest promotion of ``version`` replaced (where a rollback goes), or None."""
    made = [e for e in entries if e.get("action") == "promote" and e.get("version") == int(version)]
    return made[-1]["previous_champion"] if made else None
