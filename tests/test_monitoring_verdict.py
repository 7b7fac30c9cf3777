"""The verdict is a pure function of test results; the trigger's hysteresis and cool-down; configs validate."""

from __future__ import annotations

import math

import pytest

from monitoring import MonitorConfig, Trigger, TriggerConfig, verdict
from monitoring.config import DisagreementCheck, TextDriftCheck
from monitoring.stats import TestResult

A = 0.001


def t(name: str, group: str, p: float) -> TestResult:
    return TestResult(name, 0.0, p, A, group)


QUIET = [t("text.domain_classifier", "text", 0.5), t("embedding.classifier", "embedding", 0.3),
         t("prediction.label_mix", "prediction", 0.9), t("prediction.confidence", "prediction", 0.4)]


def replace(results, name, p):
    return [t(r.name, r.group, p) if r.name == name else r for r in results]


def test_nothing_fired_is_ok():
    assert verdict(QUIET).decision == "ok"
    assert verdict([]).decision == "ok"


def test_p_equal_to_alpha_does_not_fire_and_nan_never_fires():
    assert verdict(replace(QUIET, "text.domain_classifier", A)).decision == "ok"
    assert verdict(replace(QUIET, "text.domain_classifier", math.nan)).decision == "ok"


def test_input_drift_without_teacher_is_retrain():
    v = verdict(replace(QUIET, "text.domain_classifier", 1e-9))
    assert v.decision == "retrain" and v.reasons == ("text.domain_classifier",)


def test_input_drift_with_agreeing_teacher_is_review():
    r = replace(QUIET, "embedding.classifier", 1e-9) + [t("disagreement.teacher_student", "disagreement", 0.8)]
    assert verdict(r).decision == "review"


def test_input_and_prediction_drift_is_retrain_even_with_agreeing_teacher():
    r = replace(replace(QUIET, "embedding.classifier", 1e-9), "prediction.confidence", 1e-6)
    r += [t("disagreement.teacher_student", "disagreement", 0.8)]
    assert verdict(r).decision == "retrain"


def test_disagreement_alone_is_retrain():
    r = QUIET + [t("disagreement.teacher_student", "disagreement", 1e-5)]
    assert verdict(r).decision == "retrain"


def test_prediction_drift_alone_is_review():
    assert verdict(replace(QUIET, "prediction.label_mix", 1e-7)).decision == "review"


def test_verdict_is_pure():
    r = replace(QUIET, "text.domain_classifier", 1e-9)
    assert verdict(r) == verdict(list(r)) == verdict(tuple(r))


def test_single_noisy_window_does_not_act():
    trig = Trigger(TriggerConfig(k=2, n=3, cooldown=2))
    assert [trig.update(d) for d in ["ok", "retrain", "ok", "ok", "retrain", "ok"]] == ["ok"] * 6


def test_k_of_n_acts_then_cools_down():
    trig = Trigger(TriggerConfig(k=2, n=3, cooldown=2))
    actions = [trig.update(d) for d in ["retrain", "ok", "retrain", "retrain", "retrain", "retrain", "retrain"]]
    # acts on the 3rd window (2 of last 3), is silent for 2 windows of cool-down, then needs 2 fresh alarms
    assert actions == ["ok", "ok", "retrain", "ok", "ok", "ok", "retrain"]


def test_most_severe_decision_wins():
    trig = Trigger(TriggerConfig(k=2, n=2, cooldown=0))
    assert [trig.update(d) for d in ["review", "retrain"]] == ["ok", "retrain"]
    assert [trig.update(d) for d in ["review", "review"]] == ["ok", "review"]


def test_trigger_state_round_trips_through_json(tmp_path):
    trig = Trigger(TriggerConfig(k=2, n=3, cooldown=3))
    for d in ["retrain", "retrain", "ok"]:
        trig.update(d)
    trig.save(tmp_path / "trigger.json")
    again = Trigger.load(tmp_path / "trigger.json")
    assert again.state == trig.state and again.config == trig.config
    assert again.state.cooldown_left == 2 and again.state.last_action == "retrain"
    assert Trigger.load(tmp_path / "missing.json").state.windows_seen == 0


def test_trigger_rejects_unknown_decision():
    with pytest.raises(ValueError):
        Trigger().update("panic")


def test_bonferroni_split_and_validation():
    cfg = MonitorConfig(false_alarm_budget=0.01)
    assert cfg.n_tests == 4 + 1 + 1 + 2 + 1
    assert cfg.alpha == pytest.approx(0.01 / cfg.n_tests)
    with pytest.raises(ValueError):
        MonitorConfig(false_alarm_budget=0.0)
    with pytest.raises(ValueError):
        TextDriftCheck(descriptors=("emoji_count",))
    with pytest.raises(ValueError):
        TriggerConfig(k=4, n=3)
    with pytest.raises(ValueError):
        DisagreementCheck(sample_share=0.0)
    assert DisagreementCheck(sample_share=0.05, min_sample=50, max_sample=500).sample_size(10_000) == 500
    assert DisagreementCheck().sample_size(30) == 30
