"""A user's own task end to end, as a user types it: the question corpus from ``kdops init`` to a student served
by Triton that answers, and one monitor tick over what it served. Real Prefect, MLflow and tritonserver."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

KDOPS = str(Path(sys.executable).with_name("kdops"))
LABELS = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]

pytestmark = [pytest.mark.slow, pytest.mark.server]


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "KDOPS_TRITON_URL", "KDOPS_PROJECT", "KDOPS_DEBUG")}
    env.update(KDOPS_HOME=str(home), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def kdops(*args: str, cwd: Path, home: Path, timeout: float = 900) -> str:
    res = subprocess.run([KDOPS, *args], cwd=cwd, env=_env(home), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"kdops {' '.join(args)}: {res.stderr[-3000:]}"
    return res.stdout


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen, limit_s: float) -> re.Match:
    deadline = time.time() + limit_s
    while time.time() < deadline:
        m = re.search(pattern, path.read_text(errors="replace"))
        if m:
            return m
        assert proc.poll() is None, path.read_text(errors="replace")[-3000:]
        time.sleep(1)
    raise AssertionError(f"no {pattern!r} within {limit_s} s:\n{path.read_text(errors='replace')[-3000:]}")


def test_question_corpus_from_init_to_served_student_and_a_monitor_tick(tmp_path):
    from kdops import corpora

    home = tmp_path / "home"
    rows = corpora.load("questions", limit_per_domain=400).rows
    rows[["text", "label"]].rename(columns={"text": "question", "label": "qtype"}).to_csv(tmp_path / "questions.csv", index=False)

    out = kdops("init", "--data", "questions.csv", "--text-column", "question", "--label-column", "qtype",
                "--model", "kdops-questions", "--min-retention", "0.01", "--monitor-interval", "5", cwd=tmp_path, home=home)
    assert "labels (6): ABBR" in out and "wrote kdops.toml" in out
    assert (tmp_path / "data" / "train.csv").is_file() and (tmp_path / "data" / "test.csv").is_file()

    out = kdops("teacher", "train", "--epochs", "1", "--max-length", "32", cwd=tmp_path, home=home)
    assert re.search(r"teacher \w+ at .*teacher: trained in \d+ s; validation accuracy", out), out
    out = kdops("round", "--recipe", "classifier-quick", "--json", "round.json", cwd=tmp_path, home=home)
    result = json.loads((tmp_path / "round.json").read_text())
    assert result["version"] == 1 and result["decision"]["action"] == "promote", out
    assert "kdops-questions" in kdops("registry", "champion", cwd=tmp_path, home=home)

    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        up = subprocess.Popen([KDOPS, "up", "--min-rows", "10", "--for-seconds", "400"], cwd=tmp_path, env=_env(home),
                              stdout=log, stderr=subprocess.STDOUT)
        try:
            url = _wait_for(log_path, r"Triton: http://(\S+) ", up, 240).group(1)
            served_as = _wait_for(log_path, r"deployed champion v1 as (\S+) ", up, 240).group(1)
            texts = rows["text"].sample(n=30, random_state=1).tolist()
            served = [json.loads(line) for line in
                      kdops("serve", "classify", *texts, "--url", url, cwd=tmp_path, home=home).splitlines()]
            assert len(served) == 30 and {s["label"] for s in served} <= set(LABELS)
            assert {s["model_version"] for s in served} == {served_as}
            history = home / "monitoring" / "history.jsonl"
            deadline = time.time() + 240
            while not (history.is_file() and history.read_text().strip()) and time.time() < deadline:
                assert up.poll() is None, log_path.read_text(errors="replace")[-3000:]
                time.sleep(2)
            assert history.is_file() and history.read_text().strip(), log_path.read_text(errors="replace")[-3000:]
            tick = json.loads(history.read_text().splitlines()[-1])
            assert tick["window_id"].startswith("tick-") and tick["tests"]  # the served window went through the monitors
            status = kdops("status", cwd=tmp_path, home=home)
            assert "kdops-questions" in status and "v1" in status
        finally:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(timeout=60)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
    assert "kdops up: stopped" in log_path.read_text(errors="replace")
