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
