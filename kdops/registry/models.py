"""The promotion state of registered students: the ``champion`` / ``challenger`` aliases, the append-only ledger
(``kdops.registry.ledger``) and the decisions that move them (promote, rollback, reject, review).

Every decision is one step that either completes with its ledger entry or leaves the alias where it was; moving
what Triton serves with it is ``flows.promotion``'s transaction (kdops does not talk to Triton).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from kdops.registry import ledger as _ledger
from kdops.registry.store import RegistryError
from kdops.registry.versions import CHALLENGER, CHAMPION, DEFAULT_MODEL, STATE_TAG, Versions, decode_lineage

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Champion:
    """The serving champion as the registry knows it: what a round continues from and is gated against."""

    version: int = field(metadata={"help": "Registered version number."})
    artifact: Path = field(metadata={"help": "Its artifact directory (downloaded from the store)."})
    report: dict | None = field(default=None, metadata={
        "help": "The report summary its promotion recorded in the ledger (what the gate compares against); None "
                "when it was made champion without one."})
    lineage: dict = field(default_factory=dict, metadata={"help": "Its lineage (kdops.artifacts.Lineage fields)."})

    def read(self):
        """Its ``kdops.artifacts.Artifact`` (what a round continues from)."""
        from kdops.artifacts import Artifact

        return Artifact.read(self.artifact)

    def as_dict(self) -> dict:
        return {"version": self.version, "artifact": str(self.artifact), "report": self.report, "lineage": self.lineage}


class Registry(Versions):
    """Versions, aliases and the ledger of one MLflow store. Construction touches nothing."""

    def champion_info(self, name: str = DEFAULT_MODEL, download_dir: str | Path | None = None) -> Champion | None:
        """The champion with its artifact (downloaded), the summary its promotion recorded, and its lineage."""
        version = self.champion(name)
        if version is None:
            return None
        mv = self.model_version(name, version)
        return Champion(version, self.download(name, version, dst=download_dir),
                        _ledger.promoted_summary(self.ledger(name), version), decode_lineage(mv.tags))

    def best_slices(self, name: str, eval_id: str) -> dict[str, float]:
        """Each slice's best promoted accuracy on evaluation snapshot ``eval_id`` (what the gate holds a slice to)."""
        return _ledger.best_slices(self.ledger(name), eval_id)

    # -- aliases -------------------------------------------------------------------------------

    def set_alias(self, name: str, alias: str, version: int | str) -> None:
        self.store.retry(lambda: self.client.set_registered_model_alias(name, alias, str(version)))

    def delete_alias(self, name: str, alias: str) -> None:
        with contextlib.suppress(Exception):
            self.client.delete_registered_model_alias(name, alias)

    def _put_alias(self, name: str, alias: str, version: int | None) -> None:
        """Point ``alias`` at ``version``, or remove it for None (how a failed step puts an alias back)."""
        if version is None:
            self.delete_alias(name, alias)
        else:
            self.set_alias(name, alias, version)

    # -- the ledger and the decisions it records -------------------------------------------------

    def ledger(self, name: str = DEFAULT_MODEL) -> list[dict]:
        """Every promotion decision, oldest first."""
        from mlflow.exceptions import MlflowException

        try:
            return _ledger.read(self.store.retry(lambda: self.client.get_registered_model(name)).tags)
        except MlflowException:
            return []

    def _append(self, name: str, action: str, version: int | None, previous: int | None, reason: str,
                report_summary: dict | None, who: str | None) -> dict:
        key, entry = _ledger.entry(action, version, previous, reason, report_summary, who)
        self._ensure_model(name)
        self.store.retry(lambda: self.client.set_registered_model_tag(name, key, json.dumps(entry, default=str)))
        return entry

    def _move(self, name: str, alias: str, version: int, previous: int | None, record) -> dict:
        """Move ``alias`` to ``version`` and ``record()`` the ledger entry: both, or the alias goes back."""
        self.set_alias(name, alias, version)
        try:
            return record()
        except BaseException:
            self._put_alias(name, alias, previous)
            raise

    def _states(self, name: str, states: dict[int | None, str]) -> None:
        """The ``kdops.state`` tags (a readable copy of what the ledger says): a failure here is logged, not raised,
        since the decision is already recorded."""
        for version, state in states.items():
            if version is None:
                continue
            try:
                self.store.retry(lambda v=version, s=state: self.client.set_model_version_tag(
                    name, str(v), STATE_TAG, s))
            except Exception as e:  # noqa: BLE001 - any store error; the ledger stays the record
                log.warning("%s v%s: state tag %r not written (%s)", name, version, state, e)

    def promote(self, name: str, version: int, reason: str, report_summary: dict | None = None,
                actor: str | None = None) -> dict:
        """Move ``champion`` to ``version`` and record who/why/what it replaced. A no-op when it is
        champion already (a re-run flow does not promote twice); returns the ledger entry."""
        version = int(version)
        with self.store.locked():
            self.model_version(name, version)  # fails loudly for an unknown version
            previous = self.champion(name)
            if previous == version:
                done = [e for e in self.ledger(name) if e["version"] == version]
                return done[-1] if done else {"action": "promote", "version": version}
            entry = self._move(name, CHAMPION, version, previous, lambda: self._append(
                name, "promote", version, previous, reason, report_summary, actor))
            if self.challenger(name) == version:
                self.delete_alias(name, CHALLENGER)
            self._states(name, {previous: "retired", version: CHAMPION})
            return entry

    def rollback_target(self, name: str, to_version: int | None = None) -> tuple[int, int]:
        """``(current champion, version a rollback restores)`` without moving anything: ``to_version``, else the
        champion the current one replaced. Repeated rollbacks walk further back through the promotions."""
        current = self.champion(name)
        if current is None:
            raise RegistryError(f"{name}: no champion to roll back.")
        if to_version is None:
            to_version = _ledger.replaced_by(self.ledger(name), current)
            if to_version is None:
                raise RegistryError(f"{name}: v{current} has no recorded previous champion to roll back to.")
        self.model_version(name, to_version)
        return current, int(to_version)

    def rollback(self, name: str, reason: str, actor: str | None = None, to_version: int | None = None) -> dict:
        """Put back the champion that the current one replaced (or ``to_version``); returns the entry."""
        with self.store.locked():
            current, target = self.rollback_target(name, to_version)
            entry = self._move(name, CHAMPION, target, current, lambda: self._append(
                name, "rollback", target, current, reason, None, actor))
            self._states(name, {current: "rolled_back", target: CHAMPION})
            return entry

    def reject(self, name: str, version: int, reason: str, report_summary: dict | None = None,
               actor: str | None = None) -> dict:
        """Record a candidate the gate (or a person) turned down; it stops being the challenger."""
        version = int(version)
        with self.store.locked():
            self.model_version(name, version)
            entry = self._append(name, "reject", version, self.champion(name), reason, report_summary, actor)
            if self.challenger(name) == version:
                self.delete_alias(name, CHALLENGER)
            self._states(name, {version: "rejected"})
            return entry

    def review(self, name: str, version: int, reason: str, report_summary: dict | None = None,
               actor: str | None = None) -> dict:
        """Record a candidate sent to human review; it becomes the challenger until someone decides."""
        version = int(version)
        with self.store.locked():
            self.model_version(name, version)
            previous, champion = self.challenger(name), self.champion(name)
            entry = self._move(name, CHALLENGER, version, previous, lambda: self._append(
                name, "review", version, champion, reason, report_summary, actor))
            self._states(name, {version: "in_review"})
            return entry
