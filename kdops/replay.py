"""The replay scheme of every task kind: a bounded reservoir of earlier rows, so rounds do not forget old domains.

Reservoir sampling (Vitter's Algorithm R) keeps a uniform sample of everything ever offered in O(capacity)
space; with ``per_domain=True`` each domain gets its own share of the capacity so a large new domain cannot
crowd out a small old one. Rows are text, label and domain (a causal LM's rows have no label); the teacher's
outputs for them come back from the kind's cache as hits. The reservoir is a Parquet file plus a JSON state.

A round draws ``draw(n_new, share)``: ``share`` reservoir rows per new row. How the drawn rows meet the new ones
is the kind's config, the two mixes of the one reservoir:

- classifier, ``DistillConfig.replay_share``: the drawn rows join the round's rows and every epoch shuffles them in
  (a batch holds share / (1 + share) replayed rows on average);
- causal LM, ``LMDistillConfig.replay_fraction`` f: every batch holds round(f * batch size) replayed rows, and the
  round draws ``fraction_to_share(f)`` = f / (1 - f) rows per new row, the same proportion over the round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from kdops.paths import atomic_write


COLUMNS = ["id", "text", "label", "domain"]


def fraction_to_share(fraction: float) -> float:
    """Rows to draw per new row so that ``fraction`` of all the round's rows are replayed: f / (1 - f)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError("a replay fraction must be in [0, 1).")
    return fraction / (1.0 - fraction)


class ReplayBuffer:
    """A per-domain reservoir of earlier rows (``id, text, label, domain``) that rounds of every kind replay from."""

    def __init__(self, capacity: int = 4000, seed: int = 13, per_domain: bool = True):
        if capacity <= 0:
            raise ValueError("capacity must be positive.")
        self.capacity, self.per_domain = capacity, per_domain
        self.rng = np.random.default_rng(seed)
        self.rows = pd.DataFrame(columns=COLUMNS)
        self.seen: dict[str, int] = {}  # rows offered so far, per domain ("*" when not per-domain)

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def of(cls, frames: Iterable[pd.DataFrame], capacity: int = 4000, seed: int = 13,
           per_domain: bool = True) -> "ReplayBuffer":
        """A reservoir offered ``frames`` in order (earlier snapshots' rows, say)."""
        buf = cls(capacity, seed=seed, per_domain=per_domain)
        for rows in frames:
            buf.add(rows)
        return buf

    def add(self, rows: pd.DataFrame) -> None:
        """Offer ``rows`` (text and domain; id and label may be absent, as in a causal LM's text rows)."""
        rows = rows.reindex(columns=COLUMNS)
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
        return pd.DataFrame(buf, columns=COLUMNS)

    def _rebalance(self) -> None:
        # Equal share per domain: each domain's reservoir is a uniform sample of it, so a uniform
        # subsample of that reservoir still is.
        domains = self.rows["domain"].fillna("*")
        share = self.capacity // max(1, domains.nunique())
        parts = [g.sample(n=min(share, len(g)), random_state=int(self.rng.integers(1 << 31)))
                 for _, g in self.rows.groupby(domains)]
        self.rows = pd.concat(parts, ignore_index=True) if parts else self.rows

    def draw(self, n_new: int, share: float) -> pd.DataFrame:
        """What a round of ``n_new`` new rows replays: ``round(share * n_new)`` rows sampled from the reservoir."""
        return self.sample(int(round(share * n_new))) if share > 0 else self.rows.iloc[:0]

    def sample(self, n: int) -> pd.DataFrame:
        n = min(n, len(self.rows))
        return self.rows.sample(n=n, random_state=int(self.rng.integers(1 << 31))).reset_index(drop=True)

    def save(self, directory: Path) -> None:
        atomic_write(directory / "replay.parquet", self.rows.to_parquet(index=False))
        atomic_write(directory / "replay.json", {"capacity": self.capacity, "seen": self.seen, "per_domain": self.per_domain})

    @classmethod
    def load(cls, directory: Path, seed: int = 13) -> "ReplayBuffer":
        state = json.loads((directory / "replay.json").read_text())
        buf = cls(state["capacity"], seed=seed, per_domain=state["per_domain"])
        buf.rows, buf.seen = pd.read_parquet(directory / "replay.parquet"), state["seen"]
        return buf
