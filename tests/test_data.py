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


# ---------------------------------------------------------------------------------------------
# Files of any size: over-long fields, chunked reading, snapshots that stay on disk

BIG = "y" * 200_000  # over csv's default field limit of 131,072 characters


def test_csv_field_over_the_parser_limit_is_a_quarantined_row(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text(
        "text,label,domain\n"
        "good film,pos,m\n"
        f"{BIG},pos,m\n"
        "bad film,neg,m\n"
        f'"{BIG[:100_000]}\n{BIG[:100_000]}\nstill the same text, quoted",neg,m\n'  # one record, three lines
        "nice one,pos,m\n"
        f'okay,pos,"{BIG}"\n'
        "last one,neg,m\n"
    )
    snap, rep = ingest(p, SCHEMA, tmp_path / "store")
    assert snap.rows["text"].tolist() == ["good film", "bad film", "nice one", "last one"]
    q = _quarantine(rep)
    assert [r["line"] for r in q] == [3, 5, 9]
    assert [r["reason"].split(" (")[0] for r in q] == ["text too long", "text too long", "field too long"]
    assert "column 'domain'" in q[2]["reason"] and len(q[0]["raw"]) < 2_000 and q[1]["end_line"] == 7
    assert rep.kept + rep.quarantined == 7


def test_jsonl_text_over_the_csv_limit_is_quarantined_too(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"text": "good film", "label": "pos"}, {"text": BIG, "label": "pos"},
            {"text": "bad film", "label": "neg"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    snap, rep = ingest(p, SCHEMA, tmp_path / "store")
    assert snap.rows["text"].tolist() == ["good film", "bad film"]
    (q,) = _quarantine(rep)
    assert q["reason"] == "text longer than 50 characters" and q["line"] == 2


def _messy_rows() -> list[dict]:
    # No labels or domains in the first rows: the ids of rows without one depend on the whole file.
    rows = [{"text": f"text {i}", "label": None, "domain": None, "uid": f"u{i % 7}"} for i in range(5)]
    rows += [{"text": f"more {i}", "label": ["pos", "neg", None, "meh"][i % 4], "domain": ["a", None][i % 2],
              "uid": None if i % 5 == 0 else f"v{i}"} for i in range(20)]
    rows += [dict(rows[3]), dict(rows[12]), {"text": " ", "label": "pos", "domain": "a", "uid": "w"}]
    return rows


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
@pytest.mark.parametrize("schema", [SCHEMA, DataSchema(id_column="uid")], ids=["content-ids", "user-ids"])
def test_chunked_reading_gives_the_snapshot_of_a_whole_read(tmp_path, fmt, schema):
    rows = _messy_rows()
    p = tmp_path / f"d.{fmt}"
    if fmt == "csv":
        pd.DataFrame(rows).to_csv(p, index=False)
    elif fmt == "parquet":
        pd.DataFrame(rows).to_parquet(p)
    else:
        p.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in rows))
    whole, rep = ingest(p, schema, tmp_path / "whole")
    df, _ = read_table(p)
    kept, bad = validate(df.drop(columns=["_line"], errors="ignore"), schema)
    assert whole.id == from_rows(kept, schema.labels).id  # one chunk: what validating the whole frame gives
    for chunk_rows in (1, 4):
        snap, rep_c = ingest(p, schema, tmp_path / f"c{chunk_rows}", chunk_rows=chunk_rows)
        assert snap.id == whole.id and snap._rows is None  # on disk until asked for
        assert snap.rows.fillna("-").values.tolist() == whole.rows.fillna("-").values.tolist()
        assert rep_c.reasons == rep.reasons and rep_c.quarantined == len(bad)
        assert [r["line"] for r in _quarantine(rep_c)] == [r["line"] for r in _quarantine(rep)]


def test_duplicates_across_chunk_boundaries(tmp_path):
    p = tmp_path / "d.csv"
    texts = ["a b", "c d", "e f", "a b", "g h", "c d", "a b"]
    pd.DataFrame({"text": texts, "label": "pos"}).to_csv(p, index=False)
    snap, rep = ingest(p, SCHEMA, tmp_path / "store", chunk_rows=2)
    assert snap.texts == ["a b", "c d", "e f", "g h"]
    assert rep.reasons == {"duplicate row": 3} and [q["line"] for q in _quarantine(rep)] == [5, 7, 8]
    uid = tmp_path / "u.jsonl"
    uid.write_text("".join(json.dumps({"uid": u, "text": f"t {i}"}) + "\n" for i, u in enumerate("xyzxwy")))
    snap, rep = ingest(uid, DataSchema(id_column="uid"), tmp_path / "store", chunk_rows=2)
    assert snap.rows["id"].tolist() == ["x", "y", "z", "w"] and rep.reasons == {"duplicate id": 2}


def test_a_big_snapshot_stays_on_disk_until_asked_for(tmp_path):
    p = tmp_path / "d.csv"
    pd.DataFrame({"text": [f"text {i}" for i in range(10)], "label": "pos"}).to_csv(p, index=False)
    snap, _ = ingest(p, SCHEMA, tmp_path / "store", chunk_rows=3)
    assert len(snap) == 10 and snap._rows is None and snap.texts[-1] == "text 9" and snap._rows is None
    assert snap.path == tmp_path / "store" / "snapshots" / f"{snap.id}.parquet"
    back = Snapshot.load(tmp_path / "store" / "snapshots", snap.id)
    assert len(back) == 10 and back.labels == SCHEMA.labels and back.rows["text"].tolist() == snap.texts
    assert back.save(tmp_path / "elsewhere").exists()
    assert Snapshot.load(tmp_path / "elsewhere", snap.id).texts == snap.texts
    assert not list((tmp_path / "store" / "snapshots").glob(".ingest-*"))  # no temporary file left behind
    p.write_text("text,label\n" + "".join(f"t{i},meh\n" for i in range(10)))
    with pytest.raises(DataError, match="no usable rows"):
        ingest(p, SCHEMA, tmp_path / "store", chunk_rows=3)
    assert not list((tmp_path / "store").rglob(".ingest-*"))


def test_csv_header_rules(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes("\ufefftext,label\ngood film,pos\n".encode())  # a spreadsheet's byte-order mark
    assert ingest(p, SCHEMA, tmp_path / "store")[1].kept == 1
    p.write_bytes(b"te\xffxt,label\ngood,pos\n")
    with pytest.raises(DataError, match="header line is not valid UTF-8"):
        read_table(p)
    p.write_text("text,label\n")
    with pytest.raises(DataError, match="no rows"):
        ingest(p, SCHEMA, tmp_path / "store")
