"""New data the way users retrain: a watched directory feeds a queue of snapshots that scheduled rounds drain.

``scan_watch_dir``: each new CSV / JSONL / Parquet file under the watched directory is ingested once (validated,
bad rows quarantined, snapshotted) and its snapshot queued. A file is known by its content (SHA-256): re-saved
unchanged or copied elsewhere it is not ingested again. A file that is entirely bad is recorded as failed with its
reason and not retried until its content changes. Files still being written (modified in the last ``settle_s``
seconds, dotfiles, ``*.partial`` / ``*.tmp``) wait for the next scan. The flows that run it on a schedule and drain
the queue are ``flows/sources.py``.

State: ``Home.sources / "queue.json"`` (a ``DataQueue``), read-modified-written under ``queue.lock``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from kdops.data import DataSchema
from kdops.paths import Home, atomic_write, file_sha256, read_json

log = logging.getLogger("kdops.sources")

SUFFIXES = frozenset({".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".parquet", ".pq"})
IN_PROGRESS = (".partial", ".tmp", ".part", ".crdownload", ".swp", "~")  # names writers use before the final rename
ROUNDS_KEPT = 50


# -- the queue on disk ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class QueuedSnapshot:
    """One ingested file waiting for the next scheduled round."""

    snapshot: str
    rows: int
    quarantined: int
    source: str
    sha256: str
    at: float


@dataclass(frozen=True)
class SeenFile:
    """A watched path as last scanned: size and mtime spare re-hashing an unchanged file."""

    size: int
    mtime_ns: int
    sha256: str


@dataclass(frozen=True)
class Content:
    """What became of one file content (by SHA-256), under whichever path it arrived."""

    status: str  # "ingested" | "failed"
    source: str
    at: float
    snapshot: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class RoundRecord:
    """One scheduled round: when, on which snapshots, and what came of it."""

    at: float
    status: str  # "finished" | "failed"
    snapshots: tuple[str, ...]
    rows: int
    train_id: str | None = None
    eval_id: str | None = None
    recipe: str | None = None
    version: int | None = None
    decision: str | None = None
    seconds: float | None = None
    error: str | None = None


@dataclass
class DataQueue:
    """The watched files seen, the snapshots queued in arrival order, and the scheduled rounds run (last 50)."""

    files: dict[str, SeenFile] = field(default_factory=dict)
    contents: dict[str, Content] = field(default_factory=dict)
    queued: list[QueuedSnapshot] = field(default_factory=list)
    rounds: list[RoundRecord] = field(default_factory=list)

    @property
    def last_round(self) -> RoundRecord | None:
        return self.rounds[-1] if self.rounds else None

    @staticmethod
    def file(home: Home) -> Path:
        return home.sources / "queue.json"

    @classmethod
    def load(cls, home: Home) -> "DataQueue":
        d = read_json(cls.file(home), {})
        return cls(files={p: SeenFile(**v) for p, v in d.get("files", {}).items()},
                   contents={h: Content(**v) for h, v in d.get("contents", {}).items()},
                   queued=[QueuedSnapshot(**q) for q in d.get("queued", [])],
                   rounds=[RoundRecord(**{**r, "snapshots": tuple(r["snapshots"])}) for r in d.get("rounds", [])])

    def save(self, home: Home) -> None:
        atomic_write(self.file(home), asdict(self))

    @classmethod
    @contextmanager
    def update(cls, home: Home) -> Iterator["DataQueue"]:
        """Load, change, save under an exclusive lock: a scan and a draining round never lose each other's
        changes. Nothing is saved if the block raises."""
        home.sources.mkdir(parents=True, exist_ok=True)
        with open(home.sources / "queue.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                queue = cls.load(home)
                yield queue
                queue.save(home)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


# -- scanning the watched directory ---------------------------------------------------------------------

@dataclass(frozen=True)
class ScanResult:
    """What one scan did with one file."""

    path: str
    status: str  # "ingested" | "failed" | "skipped" (content seen before) | "writing" (wait for the next scan)
    snapshot: str | None = None
    rows: int = 0
    quarantined: int = 0
    reason: str | None = None
    quarantine_path: str | None = None

    def summary(self) -> str:
        if self.status == "ingested":
            q = f", quarantined {self.quarantined} ({self.quarantine_path})" if self.quarantined else ""
            return f"{self.path}: queued snapshot {self.snapshot} ({self.rows} rows{q})"
        return f"{self.path}: {self.status}" + (f" ({self.reason})" if self.reason else "")


def _candidates(watch: Path) -> list[Path]:
    """Data files under ``watch`` in arrival order (mtime, then name); hidden and in-progress names left out."""
    out = []
    for p in watch.rglob("*"):
        rel = p.relative_to(watch).parts
        if any(part.startswith(".") for part in rel) or p.name.lower().endswith(IN_PROGRESS):
            continue
        if p.suffix.lower() in SUFFIXES and p.is_file():
            out.append(p)
    return sorted(out, key=lambda p: (_mtime(p), str(p)))


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def one_line(e: BaseException) -> str:
    """An error as one line: a user error's message, else its type and first line."""
    from kdops.errors import UserError

    text = (str(e).strip().splitlines() or [""])[0]
    return text if isinstance(e, UserError) and text else f"{type(e).__name__}: {text}"


def _with_label_set(schema: DataSchema, labels, label_map) -> DataSchema:
    """Rows whose label is neither the teacher's nor mapped onto one are quarantined row by row."""
    if not labels or schema.labels is not None:
        return schema
    extra = tuple(k for k in (label_map or {}) if k not in labels)
    return dataclasses.replace(schema, labels=tuple(labels) + extra)


def _ingest_one(home: Home, path: Path, schema: DataSchema, labels, label_map) -> ScanResult:
    from kdops.data import from_rows, ingest
    from kdops.labels import align_labels

    try:
        snap, report = ingest(path, schema, home.root)
        if labels:  # the snapshot speaks the teacher's labels, whatever the file called them
            snap = from_rows(align_labels(snap.rows, labels, label_map, source=str(path)), tuple(labels))
            snap.save(home.snapshots)
    except Exception as e:  # DataError, LabelMismatch, a corrupt Parquet...: recorded, and the scan goes on
        return ScanResult(str(path), "failed", reason=one_line(e))
    return ScanResult(str(path), "ingested", snap.id, len(snap), report.quarantined, quarantine_path=report.quarantine_path)


def scan_watch_dir(home: Home, watch_dir: str | Path, schema: DataSchema, labels: list[str] | tuple[str, ...] | None = None,
                   label_map: dict[str, str] | None = None, settle_s: float = 5.0) -> list[ScanResult]:
    """Ingest each new file under ``watch_dir`` once and queue its snapshot; returns what was done per file
    (files unchanged since an earlier scan are not listed). ``labels``: the teacher's label set, with
    ``label_map`` sending the data's names onto it (rows with other labels are quarantined)."""
    watch = Path(watch_dir).expanduser().resolve()
    if not watch.is_dir():
        log.warning("watched directory %s does not exist (yet); nothing to ingest", watch)
        return []
    schema = _with_label_set(schema, labels, label_map)
    results: list[ScanResult] = []
    with DataQueue.update(home) as queue:
        known_snapshots = {c.snapshot: c.source for c in queue.contents.values() if c.snapshot}
        for path in _candidates(watch):
            key = str(path)
            try:
                st = path.stat()
                if time.time() - st.st_mtime < settle_s:
                    results.append(ScanResult(key, "writing", reason=f"modified less than {settle_s:g} s ago"))
                    continue
                seen = queue.files.get(key)
                if seen and (seen.size, seen.mtime_ns) == (st.st_size, st.st_mtime_ns):
                    continue
                sha = file_sha256(path)
            except OSError as e:  # vanished or unreadable between listing and reading: the next scan tries again
                log.warning("%s: %s; trying again next scan", key, e)
                continue
            queue.files[key] = SeenFile(st.st_size, st.st_mtime_ns, sha)
            if sha in queue.contents:
                if seen is None or seen.sha256 != sha:
                    c = queue.contents[sha]
                    results.append(ScanResult(key, "skipped", c.snapshot, reason=f"same content as {c.source} ({c.status})"))
                continue
            res = _ingest_one(home, path, schema, labels, label_map)
            now = time.time()
            if res.status == "ingested" and res.snapshot in known_snapshots:
                res = dataclasses.replace(res, status="skipped", reason=f"same rows as {known_snapshots[res.snapshot]}")
                queue.contents[sha] = Content("ingested", key, now, res.snapshot)
            elif res.status == "ingested":
                queue.contents[sha] = Content("ingested", key, now, res.snapshot)
                queue.queued.append(QueuedSnapshot(res.snapshot, res.rows, res.quarantined, key, sha, now))
                known_snapshots[res.snapshot] = key
            else:
                queue.contents[sha] = Content("failed", key, now, reason=res.reason)
            results.append(res)
    return results
