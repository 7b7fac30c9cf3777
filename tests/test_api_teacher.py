"""The OpenAI-API teacher against a real local HTTP server process (scripts/openai_fault_server.py) that answers
429, 500, slow and dropped responses on a schedule: soft labels by each method, the answer cache, retries and
backoff, timeouts, the spend cap, and a key that never reaches disk."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from kdops.api_teacher import ApiClassifierTeacher, ApiTeacherConfig, ApiTeacherError, SpendCapReached
from kdops.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [f"review number {i}: the plot was {w}" for i, w in enumerate(["dull", "great", "fine", "awful", "superb", "odd"])]


@contextmanager
def fault_server(*args: str):
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "openai_fault_server.py"), "--port", "0", *args],
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline().split()[-1])
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/stats", timeout=10) as r:
        return json.load(r)


def teacher(url: str, tmp_path: Path, **kw) -> ApiClassifierTeacher:
    kw = {"backoff_s": 0.02, "timeout_s": 5.0, **kw}
    cfg = ApiTeacherConfig(base_url=url + "/v1", model="fault-model", labels=("neg", "pos"), **kw)
    return ApiClassifierTeacher(cfg, cache_path=tmp_path / "answers.sqlite")


def test_echo_soft_labels_are_cached_per_input_with_their_method(tmp_path):
    with fault_server() as url:
        t = teacher(url, tmp_path)
        probs, methods = t.probabilities(TEXTS)
        first = stats(url)["requests"]
        assert methods == ["echo"] * len(TEXTS) and first == len(TEXTS)  # one request per text (both labels in it)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)
        assert len({round(p, 6) for p in probs[:, 0]}) > 1  # not a constant answer
        # a new teacher object (a new run) on the same inputs: no call, same numbers
        again = teacher(url, tmp_path)
        np.testing.assert_allclose(again.logits(TEXTS), np.log(probs), rtol=1e-5)
        assert stats(url)["requests"] == first and again.answers.methods(again.id) == {"echo": len(TEXTS)}
        # another prompt template is another teacher: it asks again
        other = teacher(url, tmp_path, prompt="Text: {text}\nSentiment ({labels}):")
        assert other.id != t.id
        other.logits(TEXTS[:2])
        assert stats(url)["requests"] == first + 2


def test_chat_top_logprobs_and_the_vote_fallback_agree_on_the_label(tmp_path):
    with fault_server() as url:
        chat = teacher(url, tmp_path, endpoint="chat")
        p_chat, m_chat = chat.probabilities(TEXTS)
    assert m_chat == ["top_logprobs"] * len(TEXTS)
    with fault_server("--no-logprobs") as url:
        voted = teacher(url, tmp_path / "v", votes=16)
        p_vote, m_vote = voted.probabilities(TEXTS)
        # echo and top_logprobs were each tried once, on the first text, before votes
        assert m_vote == ["votes"] * len(TEXTS)
    np.testing.assert_allclose(p_vote.sum(1), 1.0, atol=1e-9)
    # the server samples answers from the same distribution it reports as log-probs: votes follow it
    confident = np.abs(p_chat[:, 0] - 0.5) > 0.25
    assert confident.any()
    assert (p_vote[confident].argmax(1) == p_chat[confident].argmax(1)).all()


def test_a_method_asked_for_and_not_served_is_a_clear_error(tmp_path):
    with fault_server("--no-logprobs") as url:
        with pytest.raises(ApiTeacherError, match="method"):
            teacher(url, tmp_path, method="echo").probabilities(TEXTS[:1])


def test_429_500_dropped_and_slow_answers_are_retried(tmp_path):
    with fault_server("--schedule", "429,500,drop,slow,ok,429", "--slow-s", "3") as url:
        t = teacher(url, tmp_path, timeout_s=1.0, concurrency=1)
        probs, _ = t.probabilities(TEXTS)
        s = stats(url)
    assert probs.shape == (len(TEXTS), 2)
    assert (s["429"], s["500"], s["drop"], s["slow"]) == (2, 1, 1, 1)  # the slow one timed out on the client
    assert t.api.spent["retried"] == 5 and t.api.spent["failed"] == 0
    usage = t.usage_since(0)
    assert usage["retried_calls"] == 5 and usage["failed_calls"] == 0 and usage["requests"] == len(TEXTS) + 5


def test_retries_run_out_with_one_line_and_keep_what_was_paid(tmp_path):
    with fault_server("--schedule", "ok,500,500,500") as url:
        t = teacher(url, tmp_path, max_retries=2, concurrency=1)
        with pytest.raises(ApiTeacherError) as e:
            t.probabilities(TEXTS[:3])
        assert "\n" not in str(e.value) and "500" in str(e.value) and isinstance(e.value, UserError)
        assert t.answers.methods(t.id) == {"echo": 1}  # the first text's answer stays cached
        t2 = teacher(url, tmp_path)
        t2.probabilities(TEXTS[:3])
        assert stats(url)["answered"] == 3  # the re-run asked only for the two missing texts


def test_spend_cap_ends_cleanly_and_a_rerun_continues(tmp_path):
    with fault_server() as url:
        capped = teacher(url, tmp_path, max_requests=3, concurrency=1)
        with pytest.raises(SpendCapReached, match="spend cap"):
            capped.probabilities(TEXTS)
        assert stats(url)["requests"] == 3 and capped.answers.methods(capped.id) == {"echo": 3}
        teacher(url, tmp_path).probabilities(TEXTS)
        assert stats(url)["requests"] == len(TEXTS)  # only the three unpaid texts were asked for
        token_capped = teacher(url, tmp_path / "t", max_tokens=30, concurrency=1)
        with pytest.raises(SpendCapReached):
            token_capped.probabilities(TEXTS)
        assert 0 < token_capped.api.spent["prompt_tokens"] - 30 < 40  # stopped at the first call over the cap


def test_the_key_is_sent_but_never_stored(tmp_path, monkeypatch):
    secret = "sk-test-" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:24]
    monkeypatch.setenv("KDOPS_TEST_API_KEY", secret)
    with fault_server() as url:
        t = teacher(url, tmp_path, api_key_env="KDOPS_TEST_API_KEY")
        t.probabilities(TEXTS)
        assert stats(url)["auth"] == hashlib.sha256(secret.encode()).hexdigest()[:12]
    assert secret not in t.cfg.to_json()
    for f in tmp_path.iterdir():
        assert secret.encode() not in f.read_bytes(), f


def test_config_and_project_file_errors_are_one_line(tmp_path):
    from kdops.project import Project, ProjectError

    with pytest.raises(UserError, match="base URL"):
        ApiTeacherConfig(base_url="localhost:8000", model="m")
    with pytest.raises(UserError, match="echo"):
        ApiTeacherConfig(base_url="http://x/v1", model="m", endpoint="chat", method="echo")
    d = {"task": {"labels": ["neg", "pos"]},
         "teacher": {"kind": "openai", "url": "http://x/v1", "model": "m", "api": {"method": "votes", "votes": 4},
                     "label_words": {"pos": "positive"}}}
    cfg = Project.from_dict(d, tmp_path).api_teacher(cache=tmp_path / "a.sqlite")
    assert cfg.method == "votes" and cfg.votes == 4 and cfg.words(["neg", "pos"]) == ["neg", "positive"]
    assert ApiTeacherConfig.from_json(cfg.to_json()) == cfg
    bad = {**d, "teacher": {**d["teacher"], "api": {"temprature": 1}}}
    with pytest.raises(ProjectError, match="temprature"):
        Project.from_dict(bad, tmp_path).api_teacher()
    with pytest.raises(ProjectError, match="kind"):
        Project.from_dict({"teacher": {"kind": "vllm", "url": "http://x", "model": "m"}}, tmp_path)
    with pytest.raises(ProjectError, match="openai"):
        Project.from_dict({"teacher": {"path": "t", "api": {"votes": 3}}}, tmp_path)


@pytest.mark.server
@pytest.mark.slow
def test_a_distill_flow_with_an_api_teacher_logs_its_spend_and_never_its_key(tmp_path, monkeypatch):
    """A first round whose teacher is an API (no local teacher weights: the student comes from the shipped base
    encoder) through real Prefect and a SQLite MLflow store: the call counts reach the tracking run; the key
    reaches the server and neither store."""
    import mlflow
    import pandas as pd
    from prefect.testing.utilities import prefect_test_harness

    from flows.loop import distill_flow
    from flows.tasks import LoopContext, save_snapshot
    from kdops.distill import DistillConfig
    from kdops.gate import GateThresholds
    from kdops.recipes import ClassifierRecipe
    from kdops.registry import Registry
    from kdops.rounds import StudentShape

    secret = "sk-flow-" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:24]
    monkeypatch.setenv("KDOPS_TEST_API_KEY", secret)
    monkeypatch.setenv("KDOPS_HOME", str(tmp_path / "home"))
    words = ["good", "bad", "fine", "dull", "great", "awful", "odd", "nice"]
    rows = pd.DataFrame({"text": [f"a {w} film, take {i}" for i in range(4) for w in words],
                         "label": ["pos", "neg"] * 16, "domain": "a"})
    recipe = ClassifierRecipe(name="tiny", distill=DistillConfig(epochs=1, batch_size=16),
                              shape=StudentShape(layers=1, embedding_size=8, intermediate_size=32),
                              gate=GateThresholds(min_retention=0.01, max_slice_drop=1.0))
    with fault_server("--schedule", "ok,429") as url, prefect_test_harness(server_startup_timeout=120):
        cfg = ApiTeacherConfig(base_url=url + "/v1", model="fault-model", labels=("neg", "pos"), backoff_s=0.02,
                               api_key_env="KDOPS_TEST_API_KEY")
        ctx = LoopContext(home=str(tmp_path / "home"), teacher_api=cfg.to_json(),
                          tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", model="api-student")
        train_id, eval_id = save_snapshot(ctx, rows, ("neg", "pos")), save_snapshot(ctx, rows[:16], ("neg", "pos"))
        out = distill_flow(ctx, train_id, eval_id, recipe, None, deploy=False, use_review=False)
        served = stats(url)
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.sorting import FlowRunSort

        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(limit=50, sort=FlowRunSort.EXPECTED_START_TIME_DESC)
            params = json.dumps([r.parameters for r in runs], default=str)
    assert served["auth"] == hashlib.sha256(secret.encode()).hexdigest()[:12]
    spend = out["distill"]["teacher_spend"]
    assert spend["requests"] == served["requests"] == 33 and spend["retried_calls"] == 1 and spend["failed_calls"] == 0
    run = [v for v in Registry(tracking_uri=ctx.tracking_uri).versions("api-student") if int(v["version"]) == out["version"]][0]
    metrics = mlflow.MlflowClient(ctx.tracking_uri).get_run(run["run_id"]).data.metrics
    assert metrics["teacher_requests"] == 33 and metrics["teacher_tokens"] == spend["tokens"] > 0
    assert "fault-model" in params and secret not in params
    for f in [tmp_path / "mlflow.db", *(tmp_path / "home").rglob("*")]:
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
