"""Each check on small real-corpus slices: movie -> tweets is caught, movie -> held-out movie is not;
an HTML report, a history row and a dashboard are written."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kdops import corpora
from monitoring import MonitorConfig, monitor_window, profile_reference, render_dashboard, run_checks, verdict
from monitoring.checks import disagreement_test, embedding_tests, prediction_tests, text_tests
from monitoring.report import read_history


@pytest.fixture(scope="module")
def slices():
    rows = corpora.load("sentiment", domains=("movie", "tweets"), limit_per_domain=1100).rows
    movie = rows[rows["domain"] == "movie"].sample(frac=1, random_state=0)
    tweets = rows[rows["domain"] == "tweets"]
    return movie.iloc[:800], movie.iloc[800:1100], tweets.iloc[:300]


def fake_scores(texts, drift: bool):
    """Deterministic stand-ins: probabilities and embeddings that depend on the text (and on 'drift')."""
    rng = np.random.default_rng(len(texts))
    lengths = np.array([len(t) for t in texts], float)
    p = rng.uniform(0.55, 0.99, len(texts)) ** (3.0 if drift else 1.0)  # drifted traffic is less confident
    p = np.clip(p, 0.5, 1.0)
    probs = np.stack([p, 1 - p], 1)
    emb = rng.normal(0, 1, (len(texts), 8))
    emb[:, 0] += (0.8 if drift else 0.0) + 0.0 * lengths
    return probs, emb


@pytest.fixture(scope="module")
def profile(slices):
    ref = slices[0]
    probs, emb = fake_scores(ref["text"].tolist(), False)
    return profile_reference(ref["text"], MonitorConfig(), probabilities=probs, embeddings=emb,
                             label_names=("neg", "pos"))


def window(df, drift: bool) -> pd.DataFrame:
    probs, emb = fake_scores(df["text"].tolist(), drift)
    return pd.DataFrame({"text": df["text"].tolist(), "probabilities": list(probs), "embedding": list(emb)})


def test_text_checks_detect_tweets_not_held_out_movie(profile, slices):
    cfg = MonitorConfig()
    _, held_out, tweets = slices
    assert not any(r.fired for r in text_tests(profile, window(held_out, False), cfg))
    drifted = {r.name: r for r in text_tests(profile, window(tweets, False), cfg)}
    assert drifted["text.domain_classifier"].fired and drifted["text.domain_classifier"].statistic > 0.8
    assert drifted["text.oov_share"].fired


def test_embedding_and_prediction_checks(profile, slices):
    cfg = MonitorConfig()
    _, held_out, _ = slices
    assert not any(r.fired for r in embedding_tests(profile, window(held_out, False), cfg))
    assert not any(r.fired for r in prediction_tests(profile, window(held_out, False), cfg))
    assert embedding_tests(profile, window(held_out, True), cfg)[0].fired
    assert {r.name for r in prediction_tests(profile, window(held_out, True), cfg) if r.fired} >= {"prediction.confidence"}


def test_disagreement_check_uses_a_sample_and_fires_on_a_contrary_teacher(slices):
    cfg = MonitorConfig()
    cur = window(slices[1], False)
    asked = []

    def contrary(texts):  # always the opposite of what the student served
        asked.extend(texts)
        served = np.stack(cur.set_index("text").loc[texts, "probabilities"].to_numpy())
        return served[:, ::-1]

    [r] = disagreement_test(cur, cfg, contrary)
    assert r.fired and r.statistic == 1.0 and len(asked) == cfg.disagreement.sample_size(len(cur)) < len(cur)
    [ok] = disagreement_test(cur, cfg, lambda texts: np.stack(cur.set_index("text").loc[texts, "probabilities"]))
    assert not ok.fired and ok.statistic == 0.0


def test_no_alarm_on_held_out_and_retrain_on_tweets(profile, slices):
    cfg = MonitorConfig()
    _, held_out, tweets = slices
    assert verdict(run_checks(profile, window(held_out, False), cfg)).decision == "ok"
    assert verdict(run_checks(profile, window(tweets, True), cfg)).decision == "retrain"


def test_text_only_window_runs_text_checks_only(profile, slices):
    results = run_checks(profile, slices[2][["text"]].reset_index(drop=True), MonitorConfig())
    assert {r.group for r in results} == {"text"}


@pytest.mark.slow
def test_monitor_window_writes_report_history_and_dashboard(profile, slices, tmp_path):
    _, held_out, tweets = slices
    for i, (df, drift) in enumerate([(held_out, False), (tweets, True), (tweets, True)]):
        w = monitor_window(profile, window(df, drift), tmp_path, window_id=f"w{i}")
        assert w.report_path.exists() and w.report_path.stat().st_size > 10_000
        assert "<html" in w.report_path.read_text(encoding="utf-8")[:2000].lower()
    assert (w.verdict.decision, w.action) == ("retrain", "retrain")  # 2 of the last 3 windows: the trigger acts
    hist = read_history(tmp_path / "history.jsonl")
    assert list(hist.drop_duplicates("window_id")["decision"]) == ["ok", "retrain", "retrain"]
    png = render_dashboard(tmp_path / "history.jsonl", tmp_path / "dashboard.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_estimated_accuracy_tracks_realized_accuracy_without_labels():
    """Labels drawn from a calibrated teacher's probabilities: the estimate (the teacher's mean probability of the
    student's label) lands within 2 points of the accuracy the labels realize, for a good and a poor student, and a
    teacher's logits are turned into probabilities first."""
    from monitoring.checks import estimated_accuracy, teacher_probabilities

    rng = np.random.default_rng(0)
    n, k = 6000, 3
    logits = rng.normal(0, 2.5, (n, k))
    teacher = teacher_probabilities(logits)
    np.testing.assert_allclose(teacher.sum(1), 1.0)
    assert teacher_probabilities(teacher) is not None and np.allclose(teacher_probabilities(teacher), teacher)
    labels = np.array([rng.choice(k, p=p) for p in teacher])
    for noise in (0.5, 3.0):  # a student close to the teacher, and one far from it
        student = teacher_probabilities(logits + rng.normal(0, noise, (n, k)))
        realized = float((student.argmax(1) == labels).mean())
        assert abs(estimated_accuracy(student, teacher) - realized) < 0.02, (noise, realized)
    assert np.isnan(estimated_accuracy(np.zeros((0, k)), np.zeros((0, k))))


def test_monitor_window_records_the_estimate_with_a_teacher(profile, slices, tmp_path):
    from monitoring.checks import estimated_accuracy

    _, held_out, _ = slices
    cur = window(held_out, False)
    teacher = lambda texts: np.asarray(fake_scores(texts, False)[0])[:, ::-1] * 4  # noqa: E731  (logits of a rival)
    w = monitor_window(profile, cur, tmp_path, teacher=teacher, window_id="w0", write_html=False)
    est = w.history_row["estimated_acc"]
    assert 0.0 <= est < 0.5  # a teacher contrary to the student: most of the student's labels look wrong
    row = read_history(tmp_path / "history.jsonl")
    assert not row.empty
    assert monitor_window(profile, cur, tmp_path, window_id="w1", write_html=False).history_row["estimated_acc"] is None
    assert estimated_accuracy(np.eye(2)[[0, 1]], np.eye(2)[[0, 0]]) == 0.5
