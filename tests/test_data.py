"""Validation: every rule quarantines with a reason; nothing disappears; all-bad files are errors."""

import json

import pandas as pd
import pytest

from kdops.data import DataError, DataSchema, Snapshot, from_rows, ingest, read_table, validate

SCHEMA = DataSchema(labels=("neg", "pos"), max_chars=50)


def _quarantine(report) -> list[dict]:
    return [json.loads(line) for line in open(report.quarantine_path)]


def test_clean_csv_is_kept_whole(tmp_path):
    p = tmp_path / "ok.csv"
    pd.DataFrame({"text": ["good film", "bad film"], "label": ["pos", "neg"], "domain": ["m", "m"]}).to_csv(p, index=False)
    snap, rep = ingest(p, SCHEMA, tmp_path / "store")
    assert (rep.kept, rep.quarantined) == (2, 0)
    assert snap.rows["label"].tolist() == ["pos", "neg"]
    assert rep.quarantine_path is None


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"text": "   ", "label": "pos"}, "empty or whitespace text"),
        ({"text": "", "label": "pos"}, "empty or whitespace text"),
        ({"text": "x" * 51, "label": "pos"}, "text longer than 50 characters"),
        ({"text": "fine", "label": "meh"}, "label not in"),
    ],
)
def test_each_rule_quarantines_with_reason(tmp_path, row, reason):
    p = tmp_path / "d.jsonl"
    rows = [{"text": "good film", "label": "pos"}, row]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    snap, rep = ingest(p, SCHEMA, tmp_path / "store")
    assert rep.kept == 1 and rep.quarantined == 1
    (q,) = _quarantine(rep)
    assert reason in q["reason"]
    assert rep.kept + rep.quarantined == len(rows)  # no row disappears silently


def test_duplicate_ids_and_missing_labels(tmp_path):
    df = pd.DataFrame({"uid": ["a", "a", "b"], "text": ["x y", "z w", "q r"], "label": ["pos", "neg", None]})
    schema = DataSchema(id_column="uid", labels=("neg", "pos"), require_labels=True)
    kept, bad = validate(df, schema)
    assert kept["id"].tolist() == ["a"]
    assert sorted(bad["reason"]) == ["duplicate id", "missing label"]


def test_undecodable_bytes_are_quarantined_not_guessed(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b"text,label\ngood film,pos\nbad \xff\xfe film,neg\n")
    snap, rep = ingest(p, SCHEMA, tmp_path / "store")
    assert rep.kept == 1 and "undecodable bytes" in _quarantine(rep)[0]["reason"]
    p2 = tmp_path / "d.jsonl"
    p2.write_bytes(b'{"text": "ok one", "label": "pos"}\n{"text": "bad \xff", "label": "pos"}\n')
    _, rep2 = ingest(p2, SCHEMA, tmp_path / "store")
    assert rep2.kept == 1 and "undecodable" in _quarantine(rep2)[0]["reason"]


def test_malformed_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok", "label": "pos"}\n{not json\n[1, 2]\n')
    _, rep = ingest(p, SCHEMA, tmp_path / "store")
    reasons = sorted(q["reason"] for q in _quarantine(rep))
    assert rep.kept == 1 and reasons[0].startswith("JSON line is not an object") and reasons[1].startswith("malformed JSON")
    c = tmp_path / "d.csv"
    c.write_text('text,label\n"good",pos\n"bad",neg,extra,fields\n')
    _, rep = ingest(c, SCHEMA, tmp_path / "store")
    assert rep.kept == 1 and rep.quarantined == 1


def test_missing_column_is_a_clear_error(tmp_path):
    p = tmp_path / "d.csv"
    pd.DataFrame({"sentence": ["good"], "label": ["pos"]}).to_csv(p, index=False)
    with pytest.raises(DataError, match=r"missing column\(s\) \['text'\]; found \['label', 'sentence'\]"):
        ingest(p, SCHEMA, tmp_path / "store")
    snap, rep = ingest(p, DataSchema(text_column="sentence", labels=("neg", "pos")), tmp_path / "store")
    assert rep.kept == 1


def test_all_bad_file_is_an_error_and_empty_files_too(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": " ", "label": "pos"}\n{"text": "ok", "label": "??"}\n')
    with pytest.raises(DataError, match="no usable rows; all 2 were rejected"):
        ingest(p, SCHEMA, tmp_path / "store")
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        read_table(tmp_path / "e.csv")
    with pytest.raises(DataError, match="unsupported format"):
        read_table(tmp_path / "x.xlsx") if (tmp_path / "x.xlsx").write_text("x") else None
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet"):
        read_table(tmp_path / "bad.parquet")


def test_parquet_and_custom_columns(tmp_path):
    p = tmp_path / "d.parquet"
    pd.DataFrame({"body": ["good film", "bad film"], "y": ["pos", "neg"], "src": ["a", "b"]}).to_parquet(p)
    schema = DataSchema(text_column="body", label_column="y", domain_column="src", labels=("neg", "pos"))
    snap, rep = ingest(p, schema, tmp_path / "store")
    assert snap.rows[["text", "label", "domain"]].values.tolist() == [["good film", "pos", "a"], ["bad film", "neg", "b"]]


def test_snapshot_id_is_a_content_address(tmp_path):
    rows = pd.DataFrame({"text": ["a b", "c d"], "label": ["pos", "neg"]})
    a, b = from_rows(rows, ("neg", "pos")), from_rows(rows.copy(), ("neg", "pos"))
    assert a.id == b.id
    assert from_rows(rows.iloc[::-1], ("neg", "pos")).id != a.id
    assert from_rows(rows.assign(label=["neg", "neg"]), ("neg", "pos")).id != a.id
    a.save(tmp_path)
    back = Snapshot.load(tmp_path, a.id)
    assert back.id == a.id and back.rows["text"].tolist() == ["a b", "c d"]


def test_schema_validation():
    with pytest.raises(ValueError, match="max_chars"):
        DataSchema(max_chars=0)
    with pytest.raises(ValueError, match="unique"):
        DataSchema(labels=("a", "a"))
