"""A bounded replay reservoir of earlier training rows, so incremental rounds do not forget old domains.

Reservoir sampling (Vitter's Algorithm R) keeps a uniform sample of everything ever offered in O(capacity)
space; with ``per_domain=True`` each domain gets its own share of the capacity so a large new domain cannot
crowd out a small old one. The reservoir is a Parquet file plus a JSON state; only text, label and domain
are kept: the teacher logits come back from the soft-label cache as hits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd


class ReplayBuffer:
    def __init__(self, capacity: int = 4000, seed: int = 13, per_domain: bool = True):
        if capacity <= 0:
            raise ValueError("capacity must be positive.")
        self.capacity, self.per_domain = capacity, per_domain
        self.rng = np.random.default_rng(seed)
        self.rows = pd.DataFrame(columns=["id", "text", "label", "domain"])
        self.seen: dict[str, int] = {}  # rows offered so far, per domain ("*" when not per-domain)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: pd.DataFrame) -> None:
        rows = rows[["id", "text", "label", "domain"]]
        groups = rows.groupby(rows["domain"].fillna("*")) if self.per_domain else [("*", rows)]
        kept = [self.rows]
        for dom, g in groups:
            current = self.rows[self.rows["domain"].fillna("*") == dom] if self.per_domain else self.rows
            kept[0] = kept[0].drop(current.index)
            kept.append(self._reservoir(current.reset_index(drop=True), g.reset_index(drop=True), dom))
        self.rows = pd.concat(kept, ignore_index=True)
        if self.per_domain:
            self._rebalance()

    def _reservoir(self, current: pd.DataFrame, new: pd.DataFrame, key: str) -> pd.DataFrame:
        cap, seen = self.capacity, self.seen.get(key, 0)
        buf = current.to_dict("records")
        for row in new.to_dict("records"):
            seen += 1
            if len(buf) < cap:
                buf.append(row)
            else:
                j = int(self.rng.integers(0, seen))
                if j < cap:
                    buf[j] = row
        self.seen[key] = seen
        return pd.DataFrame(buf, columns=["id", "text", "label", "domain"])

    def _rebalance(self) -> None:
        # Equal share per domain: each domain's reservoir is a uniform sample of it, so a uniform
        # subsample of that reservoir still is.
        domains = self.rows["domain"].fillna("*")
        share = self.capacity // max(1, domains.nunique())
        parts = [g.sample(n=min(share, len(g)), random_state=int(self.rng.integers(1 << 31)))
                 for _, g in self.rows.groupby(domains)]
        self.rows = pd.concat(parts, ignore_index=True) if parts else self.rows

    def sample(self, n: int) -> pd.DataFrame:
        n = min(n, len(self.rows))
        return self.rows.sample(n=n, random_state=int(self.rng.integers(1 << 31))).reset_index(drop=True)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.rows.to_parquet(directory / "replay.parquet", index=False)
        (directory / "replay.json").write_text(json.dumps({"capacity": self.capacity, "seen": self.seen, "per_domain": self.per_domain}))

    @classmethod
    def load(cls, directory: Path, seed: int = 13) -> "ReplayBuffer":
        state = json.loads((directory / "replay.json").read_text())
        buf = cls(state["capacity"], seed=seed, per_domain=state["per_domain"])
        buf.rows, buf.seen = pd.read_parquet(directory / "replay.parquet"), state["seen"]
        return buf
