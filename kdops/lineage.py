"""Walking a model's lineage: what a champion learned from, through every round that led to it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from kdops.artifacts import Lineage
from kdops.data import DataError, Snapshot

log = logging.getLogger(__name__)


def lineage_chain(read: Callable[[int], Lineage | dict], version: int, limit: int = 100) -> list[tuple[int, Lineage]]:
    """``[(version, lineage), ...]`` from ``version`` back through its parents (``read(version)`` gives one
    version's lineage, e.g. ``lambda v: registry.lineage(model, v)``); stops at a first round or a cycle."""
    chain, seen, v = [], set(), version
    while v is not None and v not in seen and len(chain) < limit:
        seen.add(v)
        lin = read(v)
        lin = lin if isinstance(lin, Lineage) else Lineage.from_dict(lin)
        chain.append((v, lin))
        v = lin.parent_version
    return chain


def training_texts(chain: list[tuple[int, Lineage]], snapshots: Path, limit: int) -> list[str]:
    """The texts a model was distilled on: its train snapshot, then its parents' (an incremental round trains on
    new rows plus replay, so what it knows is the union), newest first, ``limit`` at most, no repeats."""
    texts: dict[str, None] = {}
    for v, lin in chain:
        sid = lin.snapshot_ids.get("train")
        if not sid:
            continue
        try:
            snap = Snapshot.load(snapshots, sid)
        except DataError:
            log.warning("v%s: train snapshot %s is not in %s; skipped", v, sid, snapshots)
            continue
        for t in snap.texts:
            if len(texts) >= limit:
                return list(texts)
            texts.setdefault(t, None)
    return list(texts)
