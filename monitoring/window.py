"""One monitoring step for the flows: checks -> verdict -> trigger -> report + history.

The flow passes paths in and logs the returned report path to MLflow itself (only the registry module
imports mlflow).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from monitoring.checks import ReferenceProfile, TeacherFn, check_window
from monitoring.config import MonitorConfig, TriggerConfig
from monitoring.report import append_history, write_report
from monitoring.stats import TestResult
from monitoring.verdict import Trigger, Verdict, verdict


@dataclass(frozen=True)
class WindowResult:
    """What one monitored window produced."""

    results: tuple[TestResult, ...] = field(metadata={"help": "Every test that ran."})
    verdict: Verdict = field(metadata={"help": "The window's own decision (pure function of results)."})
    action: str = field(metadata={"help": "What to do after hysteresis and cool-down: ok | retrain | review."})
    report_path: Path | None = field(metadata={"help": "Evidently HTML report, for the flow to log as an artifact."})
    history_row: dict = field(metadata={"help": "The row appended to the drift history."})
    teacher_sample: dict = field(default_factory=dict, metadata={"help": "Rows the teacher labelled (index) and its probabilities on them (teacher); empty without a teacher."})


def trigger_path(out_dir: str | Path) -> Path:
    """Where ``monitor_window`` keeps the trigger's state under a monitoring directory."""
    return Path(out_dir) / "trigger.json"


def reset_trigger(out_dir: str | Path) -> None:
    Trigger.reset(trigger_path(out_dir))


def monitor_window(ref: ReferenceProfile, current: pd.DataFrame, out_dir: str | Path,
                   config: MonitorConfig = MonitorConfig(), trigger_config: TriggerConfig = TriggerConfig(),
                   teacher: TeacherFn | None = None, window_id: str | None = None,
                   write_html: bool = True) -> WindowResult:
    """Check one window of served traffic against the champion's reference.

    ``out_dir`` holds ``history.jsonl``, ``trigger.json`` (the trigger's state, so hysteresis and cool-down
    survive restarts) and ``reports/<window_id>.html``.
    """
    out_dir = Path(out_dir)
    now = datetime.now(timezone.utc)
    window_id = window_id or now.strftime("%Y%m%dT%H%M%S%fZ")
    sample: dict = {}
    results, estimate = check_window(ref, current, config, teacher, sample)
    v = verdict(results)
    trigger = Trigger.load(trigger_path(out_dir), trigger_config)
    action = trigger.update(v.decision)
    trigger.save(trigger_path(out_dir))
    report = write_report(ref, current, results, v, config, out_dir / "reports" / f"{window_id}.html") \
        if write_html else None
    row = append_history(out_dir / "history.jsonl", results, v, action, report, window_id, now, estimate)
    return WindowResult(tuple(results), v, action, report, row, sample)
