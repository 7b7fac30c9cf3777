"""Stage 1: user data in, validated and content-addressed snapshot out.

Users bring CSV, JSONL or Parquet with a text column, an optional label column and optional ``id``,
``domain`` and ``timestamp`` columns. Every row either lands in the snapshot or in a quarantine file
with the reason: no row disappears silently, and a file that is entirely bad is an error.

Files of any size are read, validated and written ``CHUNK_ROWS`` rows at a time (CSV and JSONL line by
line, Parquet by record batches), so memory does not grow with the file: duplicates are found across the
whole file, and the snapshot of a file bigger than one chunk stays on disk until a caller reads ``rows``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kdops.errors import DataError  # noqa: F401  (re-exported: callers catch kdops.data.DataError)
from kdops.readers import CHUNK_ROWS, _chunks, _format, read_table  # noqa: F401  (read_table re-exported)

# Canonical column names inside kdops, whatever the user's file calls them.
COLUMNS = ("id", "text", "label", "domain", "timestamp")


@dataclass(frozen=True)
class DataSchema:
    """How to read a user's table. Column names are the user's; kdops renames them to ``COLUMNS``."""

    text_column: str = field(default="text", metadata={"help": "Column with the input text."})
    label_column: str | None = field(
        default="label", metadata={"help": "Column with the hard label; None for unlabelled data."}
    )
    id_column: str | None = field(
        default=None, metadata={"help": "Column with a unique row id; None derives ids from content."}
    )
    domain_column: str | None = field(default="domain", metadata={"help": "Optional slice column."})
    timestamp_column: str | None = field(default="timestamp", metadata={"help": "Optional time column."})
    labels: tuple[str, ...] | None = field(
        default=None, metadata={"help": "Allowed labels; rows with other labels are quarantined."}
    )
    max_chars: int = field(default=2000, metadata={"help": "Texts longer than this are quarantined."})
    require_labels: bool = field(default=False, metadata={"help": "Quarantine rows without a label."})

    def __post_init__(self) -> None:
        if not self.text_column:
            raise ValueError("text_column must be a non-empty column name.")
        if self.max_chars <= 0:
            raise ValueError("max_chars must be positive.")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be unique, got {self.labels}.")


class Snapshot:
    """A validated, immutable table of rows named by the hash of its content and schema.

    ``rows`` (columns ``COLUMNS``; label/domain/timestamp may be missing) is in memory when the snapshot was
    built from a DataFrame. A snapshot from ``Snapshot.load``, or ingested from a file bigger than one chunk,
    holds only its parquet ``path`` and reads the rows on first access to ``rows`` (``texts`` reads only
    the text column), so a multi-GB snapshot costs memory only when a caller asks for it.
    """

    def __init__(self, id: str, rows: pd.DataFrame | None = None, labels: tuple[str, ...] | None = None,
                 *, path: Path | None = None, length: int | None = None):
        if rows is None and path is None:
            raise ValueError("A Snapshot needs its rows or the path of its parquet file.")
        self.id, self.labels, self.path = id, labels, Path(path) if path is not None else None
        self._rows = rows
        self._length = length

    def __repr__(self) -> str:
        return f"Snapshot(id={self.id!r}, rows={len(self)}, labels={self.labels!r})"

    def __len__(self) -> int:
        if self._rows is not None:
            return len(self._rows)
        if self._length is None:
            import pyarrow.parquet as pq

            self._length = pq.ParquetFile(self.path).metadata.num_rows
        return self._length

    @property
    def rows(self) -> pd.DataFrame:
        if self._rows is None:
            self._rows = pd.read_parquet(self.path)
        return self._rows

    @rows.setter
    def rows(self, value: pd.DataFrame) -> None:
        self._rows, self._length = value, None

    @property
    def texts(self) -> list[str]:
        if self._rows is None:
            return pd.read_parquet(self.path, columns=["text"])["text"].tolist()
        return self._rows["text"].tolist()

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.id}.parquet"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            if self._rows is not None:
                self._rows.to_parquet(tmp, index=False)
            else:
                shutil.copyfile(self.path, tmp)
            (directory / f"{self.id}.json").write_text(json.dumps({"labels": self.labels, "rows": len(self)}))
            tmp.replace(path)  # atomic, and after the metadata: a snapshot under its id is always whole
        return path

    @classmethod
    def load(cls, directory: Path, snapshot_id: str) -> "Snapshot":
        path = directory / f"{snapshot_id}.parquet"
        if not path.exists():
            raise DataError(f"No snapshot {snapshot_id} in {directory}.")
        meta = json.loads((directory / f"{snapshot_id}.json").read_text())
        labels = tuple(meta["labels"]) if meta["labels"] is not None else None
        return cls(snapshot_id, labels=labels, path=path, length=meta.get("rows"))


@dataclass
class IngestReport:
    """What happened to a file: how many rows were kept and why the others were quarantined."""

    source: str
    snapshot_id: str
    kept: int
    quarantined: int
    reasons: dict[str, int]
    quarantine_path: str | None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items())) or "none"
        return (
            f"{self.source}: kept {self.kept} rows, quarantined {self.quarantined} ({why}); "
            f"snapshot {self.snapshot_id}"
        )


# ---------------------------------------------------------------------------------------------
# Validation


def _content_id(text: str, label: str | None, domain: str | None) -> str:
    return hashlib.sha256(json.dumps([text, label, domain]).encode()).hexdigest()[:16]


def _cell(v) -> str | None:
    return v if type(v) is str else (None if pd.isna(v) else str(v))  # str first: the common case, and fast


class _RowHash:
    """The snapshot id, fed a chunk of rows at a time: ``snapshot_id`` of all the rows fed, in order."""

    def __init__(self, labels: tuple[str, ...] | None):
        self.h = hashlib.sha256(json.dumps({"columns": list(COLUMNS), "labels": labels}).encode())

    def update(self, rows: pd.DataFrame) -> None:
        cols = [rows[c].tolist() for c in COLUMNS]
        self.h.update("".join(json.dumps([_cell(v) for v in row]) + "\n" for row in zip(*cols)).encode())

    def hexdigest(self) -> str:
        return self.h.hexdigest()[:16]


def snapshot_id(rows: pd.DataFrame, labels: tuple[str, ...] | None) -> str:
    """A content address: the same rows in the same order with the same label set get the same id."""
    h = _RowHash(labels)
    h.update(rows)
    return h.hexdigest()


class _SeenIds:
    """Ids met in earlier chunks, as sorted runs of uint64 (8 bytes an id, against ~100 for a set of str).
    A content id is 16 hex digits, so exact; a user's id is hashed to 64 bits (a false duplicate in n ids
    has a chance of about n² / 2^65: 1 in 160,000 at 15 million rows)."""

    def __init__(self, hashed: bool):
        self.hashed = hashed
        self.runs: list[np.ndarray] = []

    def keys(self, ids: list[str]) -> np.ndarray:
        if self.hashed:
            # A missing id (pandas 3 keeps NaN through astype(str)) hashes bytes no str encodes to: 0xff.
            return np.fromiter((int.from_bytes(hashlib.blake2b(i.encode() if isinstance(i, str) else b"\xff",
                                                               digest_size=8).digest(), "big") for i in ids),
                               dtype=np.uint64, count=len(ids))
        return np.fromiter((int(i, 16) for i in ids), dtype=np.uint64, count=len(ids))

    def seen_then_add(self, keys: np.ndarray) -> np.ndarray:
        seen = np.zeros(len(keys), dtype=bool)
        for run in self.runs:
            at = np.minimum(np.searchsorted(run, keys), len(run) - 1)
            seen |= run[at] == keys
        if len(keys):
            self.runs.append(np.unique(keys))
        # Merge while the last run is not much smaller than the one before: O(log n) runs and merges per id.
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            b, a = self.runs.pop(), self.runs.pop()
            self.runs.append(np.union1d(a, b))
        return seen


def _check_columns(columns, schema: DataSchema, source: str) -> None:
    missing = [c for c in (schema.text_column,) if c not in columns]
    if schema.require_labels and schema.label_column and schema.label_column not in columns:
        missing.append(schema.label_column)
    if schema.id_column and schema.id_column not in columns:
        missing.append(schema.id_column)
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing}; found {sorted(map(str, columns))}. "
            "Set the column names with --text-column / --label-column / --id-column."
        )


def validate(df: pd.DataFrame, schema: DataSchema, source: str = "<table>") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split raw rows into (kept rows in canonical columns, quarantined rows with a ``reason``).

    Raises DataError when the table cannot be used at all (a required column is missing).
    """
    _check_columns(df.columns, schema, source)
    kept, quarantined, _ = _split(df, schema)
    return kept, quarantined


def _missing_marks(present: tuple[bool, bool]) -> tuple[float | None, float | None]:
    """What a missing label and a missing domain are in a content id. pandas 3 (``future.infer_string``)
    stores None as NaN in a column that also holds strings, so the ids of a file with some labels (domains)
    hash NaN for a missing one, and those of a file with none hash null; kept so that a file ingested again,
    whole or in chunks, gets the same snapshot id as before."""
    nan = math.nan if pd.get_option("future.infer_string") else None
    return tuple(nan if p else None for p in present)


def _split(df: pd.DataFrame, schema: DataSchema, seen: _SeenIds | None = None, marks: tuple | None = None
           ) -> tuple[pd.DataFrame, pd.DataFrame, tuple[bool, bool]]:
    """``validate`` without the column check, plus whether any row has a label and any a domain. For the
    chunks of one file: ``seen`` carries the ids met so far, ``marks`` the file's ``_missing_marks``."""

    def col(name: str | None) -> pd.Series:
        if name and name in df.columns:
            return df[name]
        return pd.Series([None] * len(df), index=df.index, dtype=object)

    out = pd.DataFrame(
        {
            "text": col(schema.text_column),
            "label": col(schema.label_column),
            "domain": col(schema.domain_column),
            "timestamp": col(schema.timestamp_column),
        },
        index=df.index,
    )
    reasons = pd.Series([None] * len(df), index=df.index, dtype=object)

    def flag(mask: pd.Series, why: str) -> None:
        mask = mask & reasons.isna()
        reasons[mask] = why

    is_str = out["text"].map(lambda t: isinstance(t, str))
    flag(~is_str, "text is missing or not a string")
    text = out["text"].where(is_str, "")
    flag(text.str.strip() == "", "empty or whitespace text")
    flag(text.str.contains("\ufffd", regex=False), "undecodable bytes in text")
    flag(text.str.len() > schema.max_chars, f"text longer than {schema.max_chars} characters")

    label = out["label"].map(lambda v: None if v is None or (isinstance(v, float) and pd.isna(v)) or v == "" else str(v))
    out["label"] = label
    if schema.require_labels:
        flag(label.isna(), "missing label")
    if schema.labels is not None:
        flag(label.notna() & ~label.isin(schema.labels), f"label not in {list(schema.labels)}")
    for c in ("domain", "timestamp"):
        out[c] = out[c].map(lambda v: None if v is None or (isinstance(v, float) and pd.isna(v)) else str(v))
    present = (bool(label.notna().any()), bool(out["domain"].notna().any()))

    if schema.id_column:
        ids = df[schema.id_column].astype(str)
    else:
        marks = marks or _missing_marks(present)
        ids = pd.Series(
            [_content_id(t, lab if isinstance(lab, str) else marks[0], d if isinstance(d, str) else marks[1])
             for t, lab, d in zip(text.tolist(), label.tolist(), out["domain"].tolist())],
            index=df.index,
        )
    out.insert(0, "id", ids)
    dup = ids.duplicated(keep="first")
    if seen is not None:
        dup |= pd.Series(seen.seen_then_add(seen.keys(ids.tolist())), index=df.index)
    flag(dup, "duplicate id" if schema.id_column else "duplicate row")

    bad_mask = reasons.notna()
    quarantined = df[bad_mask].copy().astype(str)
    quarantined["reason"] = reasons[bad_mask]
    kept = out[~bad_mask].reset_index(drop=True)
    return kept, quarantined, present


def _reid(rows: pd.DataFrame, marks: tuple, which: np.ndarray) -> pd.DataFrame:
    """Content ids, under the file's ``marks``, for the kept rows where ``which`` is true."""
    if not which.any():
        return rows
    ids = rows["id"].tolist()
    for i in np.flatnonzero(which):
        lab, d = rows["label"].iat[i], rows["domain"].iat[i]
        ids[i] = _content_id(rows["text"].iat[i], lab if isinstance(lab, str) else marks[0],
                             d if isinstance(d, str) else marks[1])
    return rows.assign(id=ids)


# ---------------------------------------------------------------------------------------------
# Ingest: chunks in, one snapshot parquet and one quarantine JSONL out, both written as they go


class _Spool:
    """A file written under a temporary name in ``directory`` and renamed only when the ingest succeeds."""

    def __init__(self, directory: Path, suffix: str):
        self.directory, self.suffix, self.tmp = directory, suffix, None

    def open_tmp(self) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.tmp = self.directory / f".ingest-{os.getpid()}-{uuid.uuid4().hex[:8]}{self.suffix}.tmp"
        return self.tmp

    def discard(self) -> None:
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None


class _SnapshotWriter(_Spool):
    """Kept rows appended to one parquet file as row groups, as strings (None for a missing value)."""

    def __init__(self, directory: Path):
        super().__init__(directory, ".parquet")
        self.writer = None

    def write(self, rows: pd.DataFrame) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([(c, pa.string()) for c in COLUMNS])
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.open_tmp(), schema)
        table = pa.Table.from_pandas(rows[list(COLUMNS)], schema=schema, preserve_index=False)
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def commit(self, snapshot_id: str, labels: tuple[str, ...] | None, n_rows: int) -> Path:
        """Name the file by its snapshot id (the same id means the same rows: an existing file stays)."""
        self.close()
        path = self.directory / f"{snapshot_id}.parquet"
        if not path.exists():
            meta = {"labels": labels, "rows": n_rows}
            (self.directory / f"{snapshot_id}.json").write_text(json.dumps(meta))
            self.tmp.replace(path)
            self.tmp = None
        return path

    def discard(self) -> None:
        self.close()
        super().discard()


class _QuarantineWriter(_Spool):
    def __init__(self, directory: Path):
        super().__init__(directory, ".jsonl")
        self.fh = None
        self.reasons: dict[str, int] = {}
        self.count = 0

    def write(self, records: list[dict]) -> None:
        if records and self.fh is None:
            self.fh = open(self.open_tmp(), "w")
        for r in records:
            self.fh.write(json.dumps({k: (None if isinstance(v, float) and pd.isna(v) else v) for k, v in r.items()}, default=str) + "\n")
            self.reasons[r["reason"]] = self.reasons.get(r["reason"], 0) + 1
        self.count += len(records)

    def commit(self, path: Path) -> Path | None:
        if self.fh is None:
            return None
        self.fh.close()
        self.tmp.replace(path)
        self.tmp = None
        return path

    def discard(self) -> None:
        if self.fh is not None:
            self.fh.close()
        super().discard()


def ingest(path: str | Path, schema: DataSchema, store: Path,
           chunk_rows: int = CHUNK_ROWS) -> tuple[Snapshot, IngestReport]:
    """Read, validate and snapshot a file; quarantined rows go to ``store/quarantine/<snapshot>.jsonl``.

    The file is read ``chunk_rows`` rows at a time. A file of at most one chunk gives a snapshot with its rows
    in memory, as ``from_rows`` does; a bigger one is written to ``store/snapshots`` as it is read, and its
    snapshot reads the rows back from there when ``rows`` is first used. Either way the snapshot (id, rows,
    order, duplicates found across the whole file) is the one that validating the whole file at once gives.
    """
    path, source = Path(path), str(path)
    fixed_columns = _format(path) != "jsonl"  # a CSV header or a Parquet schema names every column up front
    rowhash, seen = _RowHash(schema.labels), _SeenIds(hashed=bool(schema.id_column))
    snapshots, quarantine = _SnapshotWriter(store / "snapshots"), _QuarantineWriter(store / "quarantine")
    columns: dict[str, None] = {}
    held: list[pd.DataFrame] | None = []  # kept rows while the file has read no more than one chunk of rows
    first: tuple[bool, bool] | None = None  # label / domain present in the first chunk: the marks assumed
    present = (False, False)
    derived: int | None = None  # the kept row whose missing user id became a content id (one at most)
    n_rows = n_kept = 0
    try:
        for df, lines, bad in _chunks(path, chunk_rows, schema.text_column, schema.max_chars):
            records = list(bad)
            if len(df):
                n_rows += len(df)
                columns.update(dict.fromkeys(map(str, df.columns)))
                if fixed_columns:
                    _check_columns(columns, schema, source)
                elif schema.id_column and schema.id_column not in df.columns:
                    df = df.assign(**{schema.id_column: np.nan})  # as in one frame of the whole file
                kept, quarantined, here = _split(df, schema, seen, _missing_marks(first) if first else None)
                first = first or here
                present = (present[0] or here[0], present[1] or here[1])
                if schema.id_column and kept["id"].isna().any():  # what from_rows does with a missing id
                    derived = n_kept + int(np.flatnonzero(kept["id"].isna())[0])
                    kept = _reid(kept, _missing_marks(first), kept["id"].isna().to_numpy())
                # The line number goes first, so a user column named "line" keeps its own value.
                records += [{"line": lines[i], **r}
                            for i, r in zip(quarantined.index, quarantined.to_dict("records"))]
                rowhash.update(kept)
                n_kept += len(kept)
                if held is not None:
                    held.append(kept)
                    if n_rows > chunk_rows:
                        for k in held:
                            snapshots.write(k)
                        held = None
                else:
                    snapshots.write(kept)
            records.sort(key=lambda r: r["line"])
            quarantine.write(records)
        if n_rows == 0 and quarantine.count == 0:
            raise DataError(f"{path}: the file has no rows.")
        if n_rows:
            _check_columns(columns, schema, source)
        if n_kept == 0:
            raise DataError(f"{path}: no usable rows; all {quarantine.count} were rejected ({quarantine.reasons}).")

        def reid(rows: pd.DataFrame, offset: int) -> pd.DataFrame:
            """A later chunk had the file's first labels (domains): ids that hashed a missing one, again."""
            if schema.id_column:
                which = np.arange(offset, offset + len(rows)) == (-1 if derived is None else derived)
            else:
                pairs = zip(rows["label"], rows["domain"])
                which = ~np.array([isinstance(lab, str) and isinstance(d, str) for lab, d in pairs], dtype=bool)
            return _reid(rows, _missing_marks(present), which)

        redo = reid if present != first and (derived is not None or not schema.id_column) else None
        if held is not None:
            rows = pd.concat(held, ignore_index=True) if len(held) > 1 else held[0]
            snap = from_rows(redo(rows, 0) if redo else rows, schema.labels)
            snap.save(store / "snapshots")
        else:
            if redo:
                snapshots, rowhash = _rewrite(snapshots, redo, schema.labels)
            sid = rowhash.hexdigest()
            path_ = snapshots.commit(sid, schema.labels, n_kept)
            snap = Snapshot(sid, labels=schema.labels, path=path_, length=n_kept)
        qpath = quarantine.commit(store / "quarantine" / f"{snap.id}.jsonl")
    finally:
        snapshots.discard()
        quarantine.discard()
    report = IngestReport(
        source=source,
        snapshot_id=snap.id,
        kept=len(snap),
        quarantined=quarantine.count,
        reasons=quarantine.reasons,
        quarantine_path=str(qpath) if qpath else None,
    )
    return snap, report


def _rewrite(written: _SnapshotWriter, redo, labels: tuple[str, ...] | None
             ) -> tuple[_SnapshotWriter, _RowHash]:
    """The kept rows once more, row group by row group, through ``redo(rows, offset)``: new file, new hash."""
    import pyarrow.parquet as pq

    written.close()
    out, rowhash, offset = _SnapshotWriter(written.directory), _RowHash(labels), 0
    try:
        pf = pq.ParquetFile(written.tmp)
        for i in range(pf.num_row_groups):
            rows = pf.read_row_group(i).to_pandas()
            rows = redo(rows, offset)
            offset += len(rows)
            rowhash.update(rows)
            out.write(rows)
    except BaseException:
        out.discard()
        raise
    finally:
        written.discard()
    return out, rowhash


def from_rows(rows: pd.DataFrame, labels: tuple[str, ...] | None = None) -> Snapshot:
    """Make a snapshot from rows already in canonical columns (missing optional columns become None)."""
    rows = rows.copy()
    for c in COLUMNS:
        if c not in rows.columns:
            rows[c] = None
    if rows["id"].isna().any():
        derived = [_content_id(t, lab, d) for t, lab, d in zip(rows["text"], rows["label"], rows["domain"])]
        rows["id"] = rows["id"].where(rows["id"].notna(), pd.Series(derived, index=rows.index))
    rows = rows[list(COLUMNS)].reset_index(drop=True)
    return Snapshot(id=snapshot_id(rows, labels), rows=rows, labels=labels)
