"""kdops.prediction_log: round trip, torn lines, since-filter, rollover."""

from __future__ import annotations

import time

import numpy as np

from kdops.prediction_log import PredictionLogWriter, read_predictions


def test_round_trip_and_since(tmp_path):
    with PredictionLogWriter(tmp_path, "student-v1") as w:
        w.write_batch(["good", "bad"], np.array([[0.1, 0.9], [0.8, 0.2]]), ["pos", "neg"], "student", "1-abc", ts=100.0)
        w.write_batch(["fine"], [[0.4, 0.6]], ["pos"], "student", "2-def", ts=200.0)
    df = read_predictions(tmp_path)
    assert list(df["text"]) == ["good", "bad", "fine"]
    assert df["probabilities"][0] == [0.1, 0.9] and list(df["model_version"]) == ["1-abc", "1-abc", "2-def"]
    assert str(df["time"].dt.tz) == "UTC"
    assert list(read_predictions(tmp_path, since=150.0)["text"]) == ["fine"]
    assert read_predictions(tmp_path / "missing").empty


def test_torn_last_line_is_skipped(tmp_path):
    w = PredictionLogWriter(tmp_path, "s")
    w.write_batch(["a"], [[0.5, 0.5]], ["pos"], "m", "1")
    w.close()
    shard = next(tmp_path.glob("*.jsonl"))
    with open(shard, "a") as fh:
        fh.write('{"ts": 1, "text": "half')  # a writer killed mid-line
    assert list(read_predictions(tmp_path)["text"]) == ["a"]


def test_rollover_and_many_writers(tmp_path):
    writers = [PredictionLogWriter(tmp_path, f"inst{i}", max_bytes=200) for i in range(3)]
    t0 = time.time()
    for k in range(20):
        for i, w in enumerate(writers):
            w.write_batch([f"t{i}-{k}"], [[0.5, 0.5]], ["pos"], "m", "1")
    for w in writers:
        w.close()
    df = read_predictions(tmp_path, since=t0 - 1)
    assert len(df) == 60 and df["text"].is_unique
    assert len(list(tmp_path.glob("*.jsonl"))) > 3  # rolled over


def test_retention_removes_old_and_excess_closed_shards_and_spares_live_ones(tmp_path):
    import os
    import time

    from kdops.prediction_log import ACTIVE_S, prune

    now = time.time()
    for i, age_days in enumerate([40, 20, 10, 5]):
        p = tmp_path / f"s{i}.jsonl"
        p.write_text("x" * 1000 + "\n")
        os.utime(p, (now - age_days * 86400, now - age_days * 86400))
    (tmp_path / "live.jsonl").write_text("y" * 5000 + "\n")  # written just now: may belong to a running writer
    removed = prune(tmp_path, max_total_bytes=3000 + 5001, max_age_s=30 * 86400, now=now)
    assert sorted(p.name for p in removed) == ["s0.jsonl", "s1.jsonl"]  # past 30 days; then the oldest over size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.jsonl", "s2.jsonl", "s3.jsonl"]
    assert prune(tmp_path, max_total_bytes=10, now=now + ACTIVE_S - 1) != []  # old ones go; the live one stays
    assert [p.name for p in tmp_path.iterdir()] == ["live.jsonl"]


def test_a_redacting_writer_keeps_no_text(tmp_path):
    import hashlib

    with PredictionLogWriter(tmp_path, "s", redact=True) as w:
        w.write_batch(["my secret order 1234"], [[0.2, 0.8]], ["pos"], "student", "1-abc")
    raw = "".join(p.read_text() for p in tmp_path.iterdir())
    assert "secret" not in raw
    df = read_predictions(tmp_path)
    assert df["text"].tolist() == ["sha256:" + hashlib.sha256(b"my secret order 1234").hexdigest()]
    assert df["label"].tolist() == ["pos"]
