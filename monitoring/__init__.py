"""Drift monitoring of served traffic: the only package in kdops that imports evidently.

Public API (nothing runs on import; evidently is imported inside the functions that use it):

- ``MonitorConfig`` / ``TriggerConfig``: checks and thresholds declared as frozen dataclasses;
- ``profile_reference(texts, config, probabilities=, embeddings=, label_names=)`` once per champion;
- ``monitor_window(profile, window_df, out_dir, config, trigger_config, teacher=)`` per window;
- ``run_checks`` / ``verdict`` / ``Trigger`` for finer control; ``render_dashboard(history, png)``.
"""

from monitoring.checks import ReferenceProfile, profile_reference, run_checks
from monitoring.config import (
    DisagreementCheck,
    calibrated_config,
    EmbeddingDriftCheck,
    MonitorConfig,
    PredictionDriftCheck,
    TextDriftCheck,
    TriggerConfig,
)
from monitoring.report import append_history, read_history, render_dashboard, write_report
from monitoring.stats import TestResult
from monitoring.verdict import OK, RETRAIN, REVIEW, Trigger, TriggerState, Verdict, verdict
from monitoring.window import WindowResult, monitor_window, reset_trigger

__all__ = [
    "DisagreementCheck", "EmbeddingDriftCheck", "MonitorConfig", "PredictionDriftCheck", "TextDriftCheck",
    "TriggerConfig", "ReferenceProfile", "profile_reference", "run_checks", "TestResult", "Verdict", "verdict",
    "Trigger", "TriggerState", "OK", "RETRAIN", "REVIEW", "append_history", "read_history", "render_dashboard",
    "write_report", "WindowResult", "monitor_window", "reset_trigger", "calibrated_config",
]
