"""Reading user files in bounded chunks: CSV, JSONL and Parquet, each yielding (raw rows, their line numbers,
unreadable lines with reasons), so ingest memory does not grow with the file. A CSV field longer than Python's
field limit, or a record that cannot be parsed, becomes a quarantined line with its reason, not a failed file.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Iterator

import pandas as pd

from kdops.errors import DataError

CHUNK_ROWS = 50_000  # rows read, validated and written at a time: bounds ingest memory whatever the file size
RAW_CHARS = 1_000  # how much of a CSV record too long to parse its quarantine record keeps

# ---------------------------------------------------------------------------------------------
# Reading: every format yields chunks of (raw rows, their line numbers, unreadable lines with reasons).
# A line number is the file line a record starts on (header = line 1); for Parquet, the 1-based row.

Chunk = tuple[pd.DataFrame, list[int], list[dict]]


def _jsonl_chunks(path: Path, chunk_rows: int) -> Iterator[Chunk]:
    records, lines, bad = [], [], []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.append({"line": lineno, "raw": raw.decode("utf-8", "replace"), "reason": f"undecodable bytes ({e.reason})"})
            else:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    bad.append({"line": lineno, "raw": line.rstrip("\n"), "reason": f"malformed JSON ({e.msg})"})
                else:
                    if isinstance(obj, dict):
                        records.append(obj)
                        lines.append(lineno)
                    else:
                        bad.append({"line": lineno, "raw": line.rstrip("\n"), "reason": "JSON line is not an object"})
            if len(records) >= chunk_rows or len(bad) >= chunk_rows:
                # dtype=object: the same values whatever else the chunk holds (inferring per chunk would turn
                # the ints of a column with gaps into floats in one chunk and not in the next).
                yield pd.DataFrame(records, dtype=object), lines, bad
                records, lines, bad = [], [], []
    if records or bad:
        yield pd.DataFrame(records, dtype=object), lines, bad


class _Lines:
    """The decoded lines of a CSV file, fed to ``csv.reader`` one at a time. Lines that are not UTF-8 are set
    aside in ``bad``; ``first`` is the line number the current record starts on, ``record`` its lines."""

    def __init__(self, fh, path: Path):
        self.fh, self.path, self.lineno, self.first = fh, path, 0, 0
        self.record: list[str] | None = []
        self.bad: list[dict] = []

    def begin(self) -> None:
        self.first, self.record = 0, []

    def __iter__(self) -> "_Lines":
        return self

    def __next__(self) -> str:
        for raw in self.fh:
            self.lineno += 1
            try:
                # utf-8-sig on line 1: a spreadsheet's byte-order mark is not part of the first column's name.
                line = raw.decode("utf-8-sig" if self.lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                # The header must decode; a data line that does not is quarantined, not guessed at.
                if self.lineno == 1:
                    raise DataError(f"{self.path}: the header line is not valid UTF-8 ({e.reason}).") from e
                self.bad.append({"line": self.lineno, "raw": raw.decode("utf-8", "replace"),
                                 "reason": f"undecodable bytes ({e.reason})"})
                continue
            if not self.first:
                self.first = self.lineno
            if self.record is not None:
                self.record.append(line)
            return line
        raise StopIteration


_START, _FIELD, _QUOTED, _QUOTE = range(4)


class _RecordScan:
    """Re-reads one CSV record in Python after ``csv.Error``: where it ends (a quoted field may span lines,
    and the C reader, restarted, would read its rest as new rows) and which field first ran over ``limit``.
    Follows the states of csv's excel dialects: ``"`` opens a field, ``""`` escapes, ``strict=False``."""

    def __init__(self, delimiter: str, limit: int):
        self.special = re.compile(f"[{re.escape(delimiter)}\r\n]")
        self.delimiter, self.limit = delimiter, limit
        self.state, self.field, self.length = _START, 0, 0
        self.too_long: int | None = None
        self.ended = False

    def _grow(self, n: int) -> None:
        self.length += n
        if self.too_long is None and self.length > self.limit:
            self.too_long = self.field

    def feed(self, line: str) -> None:
        i, n = 0, len(line)
        while i < n and not self.ended:
            if self.state == _QUOTED:
                j = line.find('"', i)
                if j < 0:
                    self._grow(n - i)
                    return
                self._grow(j - i)
                self.state, i = _QUOTE, j + 1
                continue
            c = line[i]
            if self.state == _QUOTE:
                if c == '"':
                    self._grow(1)
                    self.state, i = _QUOTED, i + 1
                    continue
                self.state = _FIELD  # the quote closed the field; what follows it joins the field
            elif self.state == _START and c == '"':
                self.state, i = _QUOTED, i + 1
                continue
            if c == self.delimiter:
                self.state, self.field, self.length, i = _START, self.field + 1, 0, i + 1
            elif c in "\r\n":
                self.ended = True
            else:
                m = self.special.search(line, i)
                j = m.start() if m else n
                self._grow(j - i)
                self.state, i = _FIELD, j


def _csv_chunks(path: Path, chunk_rows: int, text_column: str | None = None,
                field_limit: int = 0) -> Iterator[Chunk]:
    # csv.reader, not pandas: pandas turns surplus fields into an index instead of flagging the row.
    dialect = csv.get_dialect("excel-tab" if path.suffix.lower() == ".tsv" else "excel")
    if field_limit > csv.field_size_limit():
        csv.field_size_limit(field_limit)  # process-wide; raising it only lets longer fields parse
    limit = csv.field_size_limit()
    with open(path, "rb") as fh:
        lines = _Lines(fh, path)
        reader = csv.reader(lines, dialect)
        header: list[str] | None = None
        rows: list[list[str]] = []
        nums: list[int] = []
        while True:
            lines.begin()
            try:
                r = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                if header is None:
                    raise DataError(f"{path}: the header line cannot be parsed as CSV ({e}).") from e
                lines.bad.append(_skip_record(lines, dialect.delimiter, limit, header, text_column, e))
                continue
            if not r:
                continue
            if header is None:
                header = r
            elif len(r) != len(header):
                lines.bad.append({"line": lines.first, "raw": ",".join(r),
                                  "reason": f"malformed CSV row ({len(r)} fields, header has {len(header)})"})
            else:
                rows.append(r)
                nums.append(lines.first)
            if len(rows) >= chunk_rows or len(lines.bad) >= chunk_rows:
                yield pd.DataFrame(rows, columns=header, dtype=object), nums, lines.bad
                rows, nums, lines.bad = [], [], []
        if header is None:
            raise DataError(f"{path}: the file is empty.")
        if rows or lines.bad:
            yield pd.DataFrame(rows, columns=header, dtype=object), nums, lines.bad


def _skip_record(lines: _Lines, delimiter: str, limit: int, header: list[str], text_column: str | None,
                 error: csv.Error) -> dict:
    """Step over the record ``csv.reader`` gave up on and say why, naming the column that is too long."""
    scan = _RecordScan(delimiter, limit)
    record, lines.record = lines.record or [], None  # stop keeping lines: the rest of this record may be huge
    for line in record:
        scan.feed(line)
    raw = "".join(record)[: RAW_CHARS + 2].rstrip("\r\n")
    raw = raw[:RAW_CHARS] + ("…" if len(raw) > RAW_CHARS else "")
    while not scan.ended:
        line = next(lines, None)
        if line is None:
            break
        scan.feed(line)
    where = {"line": lines.first, "end_line": lines.lineno}  # an unclosed quote can swallow many lines
    if "field larger than field limit" not in str(error):
        return where | {"raw": raw, "reason": f"malformed CSV row ({error})"}
    column = header[scan.too_long] if scan.too_long is not None and scan.too_long < len(header) else None
    if column is not None and column == text_column:
        reason = f"text too long (over {limit} characters)"
    elif column is not None:
        reason = f"field too long (column {column!r} over {limit} characters)"
    else:
        reason = f"field too long (over {limit} characters)"
    return where | {"raw": raw, "reason": reason}


def _parquet_chunks(path: Path, chunk_rows: int) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        start = 0
        for batch in pf.iter_batches(batch_size=chunk_rows):
            # integer_object_nulls: an int column with gaps keeps its ints (not floats) in every batch.
            df = batch.to_pandas(integer_object_nulls=True)
            df = df.drop(columns=[c for c in df.columns if re.fullmatch(r"__index_level_\d+__", str(c))])
            yield df, list(range(start + 1, start + 1 + len(df))), []
            start += len(df)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a readable Parquet file ({e}).") from e


def _format(path: Path) -> str:
    if not path.exists():
        raise DataError(f"{path}: no such file.")
    suffix = "".join(path.suffixes[-1:]).lower()
    formats = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "csv",
               ".parquet": "parquet", ".pq": "parquet"}
    if suffix in formats:
        return formats[suffix]
    raise DataError(f"{path}: unsupported format {suffix!r}; use .csv, .jsonl or .parquet.")


def _chunks(path: Path, chunk_rows: int = CHUNK_ROWS, text_column: str | None = None,
            field_limit: int = 0) -> Iterator[Chunk]:
    fmt = _format(path)
    if fmt == "jsonl":
        return _jsonl_chunks(path, chunk_rows)
    if fmt == "csv":
        return _csv_chunks(path, chunk_rows, text_column, field_limit)
    return _parquet_chunks(path, chunk_rows)


def read_table(path: str | Path) -> tuple[pd.DataFrame, list[dict]]:
    """Read a whole CSV, JSONL or Parquet file into raw rows plus the lines that could not be read
    (``ingest`` reads in chunks instead; this is for files that fit in memory)."""
    path = Path(path)
    frames, bad, jsonl = [], [], _format(path) == "jsonl"
    for df, lines, b in _chunks(path):
        if jsonl:
            df = df.assign(_line=lines)
        frames.append(df)
        bad += b
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if df.empty and not bad:
        raise DataError(f"{path}: the file has no rows.")
    return df, bad
