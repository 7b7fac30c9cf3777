"""Stage 1: user data in, validated and content-addressed snapshot out.

Users bring CSV, JSONL or Parquet with a text column, an optional label column and optional ``id``,
``domain`` and ``timestamp`` columns. Every row either lands in the snapshot or in a quarantine file
with the reason: no row disappears silently, and a file that is entirely bad is an error.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

# Canonical column names inside kdops, whatever the user's file calls them.
COLUMNS = ("id", "text", "label", "domain", "timestamp")


class DataError(ValueError):
    """Input data that cannot be used, with a message that says what to fix."""


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


@dataclass
class Snapshot:
    """A validated, immutable table of rows named by the hash of its content and schema."""

    id: str
    rows: pd.DataFrame  # columns: COLUMNS; label/domain/timestamp may be None
    labels: tuple[str, ...] | None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def texts(self) -> list[str]:
        return self.rows["text"].tolist()

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.id}.parquet"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            self.rows.to_parquet(tmp, index=False)
            tmp.replace(path)  # atomic: a crash never leaves half a snapshot under its id
            (directory / f"{self.id}.json").write_text(json.dumps({"labels": self.labels, "rows": len(self)}))
        return path

    @classmethod
    def load(cls, directory: Path, snapshot_id: str) -> "Snapshot":
        path = directory / f"{snapshot_id}.parquet"
        if not path.exists():
            raise DataError(f"No snapshot {snapshot_id} in {directory}.")
        meta = json.loads((directory / f"{snapshot_id}.json").read_text())
        labels = tuple(meta["labels"]) if meta["labels"] is not None else None
        return cls(id=snapshot_id, rows=pd.read_parquet(path), labels=labels)


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
# Reading: every format yields (DataFrame of raw rows, DataFrame of unreadable lines with reasons)


def _read_jsonl(path: Path) -> tuple[pd.DataFrame, list[dict]]:
    records, bad = [], []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.append({"line": lineno, "raw": raw.decode("utf-8", "replace"), "reason": f"undecodable bytes ({e.reason})"})
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append({"line": lineno, "raw": line.rstrip("\n"), "reason": f"malformed JSON ({e.msg})"})
                continue
            if not isinstance(obj, dict):
                bad.append({"line": lineno, "raw": line.rstrip("\n"), "reason": "JSON line is not an object"})
                continue
            obj["_line"] = lineno
            records.append(obj)
    return pd.DataFrame.from_records(records), bad


def _read_csv(path: Path) -> tuple[pd.DataFrame, list[dict]]:
    raw = path.read_bytes()
    bad: list[dict] = []
    lines = raw.split(b"\n")
    good_lines = []
    for lineno, line in enumerate(lines, start=1):
        try:
            good_lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            # The header must decode; a data line that does not is quarantined, not guessed at.
            if lineno == 1:
                raise DataError(f"{path}: the header line is not valid UTF-8 ({e.reason}).") from e
            bad.append({"line": lineno, "raw": line.decode("utf-8", "replace"), "reason": f"undecodable bytes ({e.reason})"})
    # csv.reader, not pandas: pandas turns surplus fields into an index instead of flagging the row.
    dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
    try:
        records = list(csv.reader(io.StringIO("\n".join(good_lines)), dialect=dialect))
    except csv.Error as e:
        raise DataError(f"{path}: not a readable CSV file ({e}).") from e
    records = [r for r in records if r]
    if not records:
        raise DataError(f"{path}: the file is empty.")
    header, rows = records[0], []
    for i, r in enumerate(records[1:], start=2):
        if len(r) != len(header):
            bad.append({"line": i, "raw": ",".join(r), "reason": f"malformed CSV row ({len(r)} fields, header has {len(header)})"})
        else:
            rows.append(r)
    return pd.DataFrame(rows, columns=header, dtype=object), bad


def read_table(path: str | Path) -> tuple[pd.DataFrame, list[dict]]:
    """Read a CSV, JSONL or Parquet file into raw rows plus the lines that could not be read."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file.")
    suffix = "".join(path.suffixes[-1:]).lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        df, bad = _read_jsonl(path)
    elif suffix in (".csv", ".tsv"):
        df, bad = _read_csv(path)
    elif suffix in (".parquet", ".pq"):
        try:
            df, bad = pd.read_parquet(path), []
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise DataError(f"{path}: not a readable Parquet file ({e}).") from e
    else:
        raise DataError(f"{path}: unsupported format {suffix!r}; use .csv, .jsonl or .parquet.")
    if df.empty and not bad:
        raise DataError(f"{path}: the file has no rows.")
    return df, bad


# ---------------------------------------------------------------------------------------------
# Validation


def _content_id(text: str, label: str | None, domain: str | None) -> str:
    return hashlib.sha256(json.dumps([text, label, domain]).encode()).hexdigest()[:16]


def snapshot_id(rows: pd.DataFrame, labels: tuple[str, ...] | None) -> str:
    """A content address: the same rows in the same order with the same label set get the same id."""
    h = hashlib.sha256()
    h.update(json.dumps({"columns": list(COLUMNS), "labels": labels}).encode())
    for row in rows[list(COLUMNS)].itertuples(index=False):
        h.update(json.dumps([None if pd.isna(v) else str(v) for v in row]).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def validate(df: pd.DataFrame, schema: DataSchema, source: str = "<table>") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split raw rows into (kept rows in canonical columns, quarantined rows with a ``reason``).

    Raises DataError when the table cannot be used at all (a required column is missing).
    """
    missing = [c for c in (schema.text_column,) if c not in df.columns]
    if schema.require_labels and schema.label_column and schema.label_column not in df.columns:
        missing.append(schema.label_column)
    if schema.id_column and schema.id_column not in df.columns:
        missing.append(schema.id_column)
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing}; found {sorted(map(str, df.columns))}. "
            "Set the column names with --text-column / --label-column / --id-column."
        )

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

    if schema.id_column:
        ids = df[schema.id_column].astype(str)
    else:
        ids = pd.Series(
            [_content_id(t, lab, d) for t, lab, d in zip(text, label, out["domain"])], index=df.index
        )
    out.insert(0, "id", ids)
    dup = ids.duplicated(keep="first") & reasons.isna()
    flag(dup, "duplicate id" if schema.id_column else "duplicate row")

    bad_mask = reasons.notna()
    quarantined = df[bad_mask].copy().astype(str)
    quarantined["reason"] = reasons[bad_mask]
    kept = out[~bad_mask].reset_index(drop=True)
    return kept, quarantined


def ingest(path: str | Path, schema: DataSchema, store: Path) -> tuple[Snapshot, IngestReport]:
    """Read, validate and snapshot a file; quarantined rows go to ``store/quarantine/<snapshot>.jsonl``."""
    path = Path(path)
    df, unreadable = read_table(path)
    if df.empty:
        kept, quarantined = pd.DataFrame(columns=list(COLUMNS)), pd.DataFrame(columns=["reason"])
    else:
        kept, quarantined = validate(df.drop(columns=["_line"], errors="ignore"), schema, source=str(path))
    bad_rows = quarantined.to_dict("records") + unreadable
    if kept.empty:
        reasons = _count_reasons(bad_rows)
        raise DataError(f"{path}: no usable rows; all {len(bad_rows)} were rejected ({reasons}).")
    snap = from_rows(kept, schema.labels)
    snap.save(store / "snapshots")
    qpath = None
    if bad_rows:
        qdir = store / "quarantine"
        qdir.mkdir(parents=True, exist_ok=True)
        qpath = qdir / f"{snap.id}.jsonl"
        with open(qpath, "w") as fh:
            for r in bad_rows:
                fh.write(json.dumps({k: (None if isinstance(v, float) and pd.isna(v) else v) for k, v in r.items()}, default=str) + "\n")
    report = IngestReport(
        source=str(path),
        snapshot_id=snap.id,
        kept=len(snap),
        quarantined=len(bad_rows),
        reasons=_count_reasons(bad_rows),
        quarantine_path=str(qpath) if qpath else None,
    )
    return snap, report


def _count_reasons(rows: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    return counts


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
