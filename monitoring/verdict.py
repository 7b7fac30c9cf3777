"""From test results to a verdict (pure) and from verdicts to actions (a small stateful trigger).

``verdict`` has no I/O and no state: the same results always give the same answer. ``Trigger`` adds the
hysteresis (k of the last n windows) and the cool-down that keep one noisy window, or the windows that
follow a real drift while the retrain runs, from starting a storm of retraining.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kdops.paths import atomic_write
from monitoring.config import TriggerConfig
from monitoring.stats import TestResult

OK, RETRAIN, REVIEW = "ok", "retrain", "review"
_SEVERITY = {OK: 0, REVIEW: 1, RETRAIN: 2}


@dataclass(frozen=True)
class Verdict:
    """A window's decision and the tests that caused it."""

    decision: str = field(metadata={"help": "ok | retrain | review."})
    reasons: tuple[str, ...] = field(default=(), metadata={"help": "Names of the tests that fired."})
    explanation: str = field(default="", metadata={"help": "One sentence a person can act on."})


def verdict(results: Iterable[TestResult]) -> Verdict:
    """ok / retrain / review from the tests of one window.

    - nothing fired: ok;
    - the teacher disagrees with the student more than tolerated: retrain (distilling on live traffic is
      exactly what closes that gap), whatever else fired;
    - the inputs moved (text or embeddings) and the student's answers moved or the teacher was not asked:
      retrain on the new traffic;
    - the inputs moved but the teacher measured no loss of agreement: review (the student may be fine;
      a person decides whether the new traffic belongs in the next round);
    - only the answers moved (same inputs, different label mix or confidence): review, since that points
      to a label shift in the world or a serving bug, which retraining on the same inputs would not fix.
    """
    results = list(results)
    fired = tuple(r.name for r in results if r.fired)
    groups = {r.group for r in results if r.fired}
    measured = {r.group for r in results if r.p_value == r.p_value}  # not nan
    if not fired:
        return Verdict(OK, (), "no test fired at the per-test level")
    if "disagreement" in groups:
        return Verdict(RETRAIN, fired, "teacher-student disagreement on live traffic is above the tolerated rate")
    inputs_moved = bool(groups & {"text", "embedding"})
    if inputs_moved and ("prediction" in groups or "disagreement" not in measured):
        return Verdict(RETRAIN, fired, "served inputs drifted away from the distillation data")
    if inputs_moved:
        return Verdict(REVIEW, fired, "inputs drifted but the teacher still agrees with the student")
    return Verdict(REVIEW, fired, "predictions drifted while inputs did not: label shift or a serving problem")


@dataclass
class TriggerState:
    """What the trigger remembers between windows; saved as JSON."""

    recent: list[str] = field(default_factory=list)  # decisions of the last n windows, oldest first
    cooldown_left: int = 0
    windows_seen: int = 0
    last_action: str | None = None
    last_action_window: int | None = None


class Trigger:
    """k-of-n hysteresis with a cool-down. ``update(decision)`` returns the action: ok | retrain | review."""

    def __init__(self, config: TriggerConfig = TriggerConfig(), state: TriggerState | None = None):
        self.config, self.state = config, state or TriggerState()

    def update(self, decision: str) -> str:
        if decision not in _SEVERITY:
            raise ValueError(f"unknown decision {decision!r}; expected one of {sorted(_SEVERITY)}.")
        s, c = self.state, self.config
        s.windows_seen += 1
        if s.cooldown_left > 0:
            # A retrain (or a review) is already under way for this drift: more evidence of it starts nothing
            # new, and is not counted either, so a persisting drift acts at most once per cool-down + k windows.
            s.cooldown_left -= 1
            return OK
        s.recent = (s.recent + [decision])[-c.n:]
        alarms = [d for d in s.recent if d != OK]
        if len(alarms) < c.k:
            return OK
        action = max(alarms, key=_SEVERITY.__getitem__)
        s.cooldown_left, s.recent = c.cooldown, []  # the windows that triggered are spent
        s.last_action, s.last_action_window = action, s.windows_seen
        return action

    def to_json(self) -> str:
        return json.dumps({"config": asdict(self.config), "state": asdict(self.state)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Trigger":
        d = json.loads(text)
        return cls(TriggerConfig(**d["config"]), TriggerState(**d["state"]))

    def save(self, path: str | Path) -> Path:
        # atomic: a crash never leaves a half-written state that would reset the cool-down
        return atomic_write(path, self.to_json())

    @staticmethod
    def reset(path: str | Path) -> None:
        """Forget the saved state: a new champion starts with a fresh trigger (hysteresis counted against the
        previous one means nothing for it)."""
        Path(path).unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path, config: TriggerConfig | None = None) -> "Trigger":
        """The saved trigger state, under ``config`` when given (configuration changes apply to the saved
        state) or else the saved configuration; a fresh trigger when no state was saved yet."""
        path = Path(path)
        if not path.exists():
            return cls(config or TriggerConfig())
        saved = cls.from_json(path.read_text())
        return cls(config, saved.state) if config is not None else saved
