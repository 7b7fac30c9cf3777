"""The MLflow adapter: runs, registered student versions with lineage, aliases and a promotion ledger.

The only module in kdops that imports ``mlflow`` (STYLE 6). Everything goes through one ``MlflowClient``
per ``Registry`` so that two registries in one process (tests, a flow talking to two stores) never share
the fluent API's global tracking URI or active run.

- Store: ``tracking_uri`` argument, else ``$MLFLOW_TRACKING_URI``, else an embedded SQLite store
  ``sqlite:///<kdops home>/mlflow/mlflow.db`` with artifacts in ``<kdops home>/mlflow/artifacts``.
- Promotion state is the ``champion`` / ``challenger`` aliases; the history is an append-only ledger
  kept as registered-model tags ``kdops.ledger.<time_ns>.<rand>`` (one JSON entry each, never rewritten),
  so it travels with the model in any MLflow backend and needs no extra table.
- Student artifacts are logged as plain files (safetensors + JSON + tokenizer); no mlflow flavour,
  no pickle. ``download`` gives the directory back; ``load`` goes through ``kdops.artifacts``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

CHAMPION, CHALLENGER = "champion", "challenger"
DEFAULT_MODEL = "kdops-student"
ACTIONS = ("promote", "rollback", "reject", "review")
LEDGER_PREFIX = "kdops.ledger."
LINEAGE_PREFIX = "kdops.lineage."
SHA_TAG, PATH_TAG, STATE_TAG = "kdops.weights_sha256", "kdops.artifact_path", "kdops.state"


class RegistryError(RuntimeError):
    """A registry operation that cannot be done as asked (unknown alias, nothing to roll back to...)."""


@dataclass(frozen=True)
class RegistryConfig:
    tracking_uri: str | None = field(default=None, metadata={
        "help": "MLflow tracking/registry URI; default $MLFLOW_TRACKING_URI, else the embedded SQLite store."})
    artifact_root: str | None = field(default=None, metadata={
        "help": "Artifact root for experiments this registry creates; default <home>/mlflow/artifacts "
                "for SQLite stores, the server's own root otherwise."})
    retries: int = field(default=6, metadata={
        "help": "Attempts for an operation that hits a locked database or a busy server."})
    backoff_s: float = field(default=0.2, metadata={
        "help": "First retry delay in seconds; doubles each attempt, with jitter."})
    lock_timeout_s: float = field(default=120.0, metadata={
        "help": "How long to wait for the cross-process registry lock (SQLite stores only)."})

    def __post_init__(self):
        if self.retries < 1:
            raise ValueError("retries must be at least 1.")
        if self.backoff_s < 0 or self.lock_timeout_s <= 0:
            raise ValueError("backoff_s must be >= 0 and lock_timeout_s > 0.")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; lists become JSON strings (params) and dataclasses dicts."""
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if hasattr(v, "__dataclass_fields__"):
            from dataclasses import asdict

            v = asdict(v)
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def numeric_leaves(d: dict) -> dict[str, float]:
    """The flat numeric entries of a nested dict (bools and NaN-free numbers only; strings dropped)."""
    return {k: float(v) for k, v in flatten(d).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


@lru_cache(maxsize=None)
def code_version() -> str:
    """The git commit of the kdops checkout (``+dirty`` when tracked files changed), or ``unknown``."""
    repo = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "diff", "--quiet", "HEAD"], capture_output=True,
                               timeout=10).returncode != 0
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _actor(actor: str | None) -> str:
    return actor or os.environ.get("KDOPS_ACTOR") or os.environ.get("USER") or "unknown"


def _transient(e: Exception) -> bool:
    # SQLite under concurrent writers: MLflow wraps OperationalError ("database is locked") as
    # TEMPORARILY_UNAVAILABLE; a version-number race surfaces as an IntegrityError after MLflow's own
    # 3 retries; a busy server answers 503 or drops the connection. Anything else is a real error.
    code = getattr(e, "error_code", "")
    if code == "RESOURCE_ALREADY_EXISTS":
        return False
    text = str(e).lower()
    return (code in ("TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED") or "database is locked" in text
            or "unique constraint failed" in text
            or type(e).__name__ in ("ConnectionError", "OperationalError", "ReadTimeout"))


class RunLog:
    """The handle ``Registry.run`` yields: everything a training or evaluation run records."""

    def __init__(self, registry: "Registry", run_id: str):
        self._r, self._run_id = registry, run_id

    @property
    def run_id(self) -> str:
        return self._run_id

    def log_params(self, params: dict) -> None:
        """Flatten nested configs (loss, schedule, student) to ``loss.alpha``-style params."""
        from mlflow.entities import Param

        items = [Param(k, (json.dumps(v) if isinstance(v, (list, tuple)) else str(v))[:6000])
                 for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self._r._retry(lambda b=items[i:i + 100]: self._r.client.log_batch(self._run_id, params=b))

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Log the numeric leaves of ``metrics`` (nested allowed) at ``step`` (e.g. the epoch)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step or 0) for k, v in numeric_leaves(metrics).items()]
        for i in range(0, len(items), 1000):
            self._r._retry(lambda b=items[i:i + 1000]: self._r.client.log_batch(self._run_id, metrics=b))

    def log_eval_report(self, report: dict, name: str = "eval_report", step: int | None = None) -> dict:
        """The EvalReport as ``<name>.json`` plus its numeric leaves as metrics; returns those metrics."""
        self._r._retry(lambda: self._r.client.log_dict(self._run_id, report, f"{name}.json"))
        flat = numeric_leaves(report)
        self.log_metrics(flat, step=step)
        return flat

    def log_figure(self, fig, name: str) -> str:
        path = name if name.endswith((".png", ".svg", ".pdf")) else f"figures/{name}.png"
        self._r._retry(lambda: self._r.client.log_figure(self._run_id, fig, path))
        return path

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        log = self._r.client.log_artifacts if path.is_dir() else self._r.client.log_artifact
        self._r._retry(lambda: log(self._run_id, str(path), artifact_path))

    def log_snapshot(self, snapshot, context: str = "train") -> None:
        """Record a data snapshot as a run input whose name and digest are the snapshot's content id."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        # Same as mlflow.log_input(dataset, context) but on this registry's client, not the global run.
        ds = mlflow.data.from_pandas(snapshot.rows, name=snapshot.id, digest=snapshot.id,
                                     targets="label" if snapshot.rows["label"].notna().any() else None)
        inp = DatasetInput(dataset=ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        self._r._retry(lambda: self._r.client.log_inputs(self._run_id, datasets=[inp]))
        self.set_tags({f"kdops.snapshot.{context}": snapshot.id})

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self._r._retry(lambda k=k, v=v: self._r.client.set_tag(self._run_id, k, str(v)))


class Registry:
    """One MLflow store. Construction touches nothing; the store is opened on first use."""

    def __init__(self, tracking_uri: str | None = None, artifact_root: str | None = None,
                 config: RegistryConfig | None = None):
        cfg = config or RegistryConfig()
        self.config = cfg
        self.tracking_uri = tracking_uri or cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        if self.tracking_uri is None:
            from kdops.paths import home

            self.tracking_uri = f"sqlite:///{home() / 'mlflow' / 'mlflow.db'}"
        self.db_path = Path(self.tracking_uri[len("sqlite:///"):]) if self.is_sqlite else None
        root = artifact_root or cfg.artifact_root
        if root is None and self.db_path is not None:
            root = str(self.db_path.parent / "artifacts")
        self.artifact_root = root
        self._client = None
        self._lock_depth = 0
        self._lock_fh = None

    @property
    def is_sqlite(self) -> bool:
        return self.tracking_uri.startswith("sqlite:///")

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            if self.db_path is not None:
                self.db_path.parent.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
            # First use of a new SQLite file runs MLflow's migrations; two processes doing that at
            # once fail with "table already exists", so the first touch happens under the file lock.
            with self.locked():
                self._retry(lambda: client.search_experiments(max_results=1))
            self._client = client
        return self._client

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """A cross-process lock around check-then-write sequences (SQLite stores; re-entrant).

        SQLite serialises writers but not our read-decide-write steps (is this artifact registered
        yet? who is champion now?); a file lock makes them atomic between flows on this machine.
        A remote server gets no lock; ``register`` then de-duplicates after the fact instead.
        """
        if self.db_path is None or self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        import fcntl

        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(str(self.db_path) + ".lock", "a+")
        deadline = time.monotonic() + self.config.lock_timeout_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    fh.close()
                    raise RegistryError(f"Timed out waiting for the registry lock {fh.name}.") from None
                time.sleep(0.02 + random.random() * 0.05)
        self._lock_depth = 1
        try:
            yield
        finally:
            self._lock_depth = 0
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    def _retry(self, fn: Callable[[], Any]) -> Any:
        delay = self.config.backoff_s
        for attempt in range(self.config.retries):
            try:
                return fn()
            except Exception as e:  # MlflowException, sqlalchemy and requests errors alike
                if attempt == self.config.retries - 1 or not _transient(e):
                    raise
                time.sleep(delay * (1 + random.random()))
                delay *= 2

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None  # None: the server's (or MLflow's) default root decides
        if self.artifact_root and "://" in self.artifact_root:
            location = f"{self.artifact_root.rstrip('/')}/{name}"
        elif self.artifact_root:
            location = Path(self.artifact_root, name).resolve().as_uri()
        with self.locked():
            try:
                return self.client.create_experiment(name, artifact_location=location)
            except MlflowException as e:  # created by another process meanwhile
                if "already exists" not in str(e).lower():
                    raise
                return self.client.get_experiment_by_name(name).experiment_id

    # -- runs ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def run(self, name: str, experiment: str = "kdops", tags: dict | None = None,
            run_id: str | None = None) -> Iterator[RunLog]:
        """A run that ends FINISHED, or FAILED if the block raises. ``run_id`` resumes an existing run
        (a flow re-run after a crash keeps logging into the same run)."""
        if run_id is None:
            all_tags = {"mlflow.source.git.commit": code_version(), "mlflow.user": _actor(None),
                        **{k: str(v) for k, v in (tags or {}).items()}}
            exp_id = self._experiment_id(experiment)
            run_id = self._retry(lambda: self.client.create_run(exp_id, run_name=name, tags=all_tags)).info.run_id
        else:
            self._retry(lambda: self.client.update_run(run_id, status="RUNNING"))
        try:
            yield RunLog(self, run_id)
        except BaseException:
            self._retry(lambda: self.client.set_terminated(run_id, "FAILED"))
            raise
        self._retry(lambda: self.client.set_terminated(run_id, "FINISHED"))

    def get_run(self, run_id: str):
        return self.client.get_run(run_id)

    # -- registration --------------------------------------------------------------------------

    def register(self, student_dir: str | Path, run_id: str, name: str = DEFAULT_MODEL,
                 lineage: dict | None = None) -> int:
        """Log the student directory to ``run_id`` and create a model version tagged with its lineage.

        Idempotent: the same weights (``weights_sha256`` in kdops.json) registered again for the same run
        return the existing version. Lineage keys: teacher_id, snapshot_ids, soft_label_cache_key,
        parent_version (default: the champion now), code_version (default: this checkout's commit);
        any other key is kept too.
        """
        from kdops.artifacts import file_sha256, read_meta

        student_dir = Path(student_dir)
        meta = read_meta(student_dir)
        sha = meta.weights_sha256 or file_sha256(student_dir / "model.safetensors")
        artifact_path = f"students/{sha[:16]}"  # content-addressed: a re-run overwrites identical files
        existing = self._find_version(name, run_id, sha)
        if existing is not None:
            return existing
        RunLog(self, run_id).log_artifact(student_dir, artifact_path)
        source = f"{self.client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
        with self.locked():
            existing = self._find_version(name, run_id, sha)
            if existing is not None:
                return existing
            self._ensure_model(name)
            lin = {**meta.lineage.to_dict(), **(lineage or {})}
            lin = {k: v for k, v in lin.items() if v not in (None, "", {})}
            lin.setdefault("parent_version", self.champion(name))
            lin.setdefault("code_version", code_version())
            tags = {f"{LINEAGE_PREFIX}{k}": v if isinstance(v, str) else json.dumps(v, default=str)
                    for k, v in lin.items()}
            tags.update({SHA_TAG: sha, PATH_TAG: artifact_path, "kdops.registered_by": _actor(None), "kdops.kind": meta.kind})
            mv = self._retry(lambda: self.client.create_model_version(
                name, source, run_id=run_id, tags=tags, description=f"{meta.kind} student {sha[:12]}"))
        version = int(mv.version)
        # Without a shared lock (remote server) two flows can both pass the check above; both then
        # see the duplicates, agree that the lowest version wins, and delete their own extra one.
        dupes = sorted(int(v.version) for v in self._versions_for(name, run_id)
                       if v.tags.get(SHA_TAG) == sha)
        if dupes and dupes[0] != version:
            self._retry(lambda: self.client.delete_model_version(name, str(version)))
            return dupes[0]
        return version

    def _ensure_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self._retry(lambda: self.client.create_registered_model(name))
        except MlflowException as e:
            if "already exists" not in str(e).lower():
                raise

    def _versions_for(self, name: str, run_id: str) -> list:
        from mlflow.exceptions import MlflowException

        try:
            return self._retry(lambda: self.client.search_model_versions(
                f"name = '{name}' and run_id = '{run_id}'"))
        except MlflowException as e:
            if "not found" in str(e).lower() or "RESOURCE_DOES_NOT_EXIST" in str(e):
                return []
            raise

    def _find_version(self, name: str, run_id: str, sha: str) -> int | None:
        found = [int(v.version) for v in self._versions_for(name, run_id) if v.tags.get(SHA_TAG) == sha]
        return min(found) if found else None

    def model_version(self, name: str, version_or_alias: int | str):
        """The MLflow ModelVersion for a number (``3``, ``"3"``) or an alias (``"champion"``)."""
        from mlflow.exceptions import MlflowException

        try:
            if str(version_or_alias).isdigit():
                return self.client.get_model_version(name, str(version_or_alias))
            return self.client.get_model_version_by_alias(name, str(version_or_alias))
        except MlflowException as e:
            raise RegistryError(f"{name}: no version or alias {version_or_alias!r} ({e.message}).") from e

    def lineage(self, name: str, version_or_alias: int | str) -> dict:
        """The lineage tags of a version, decoded (lists and numbers come back as JSON values)."""
        out = {}
        for k, v in self.model_version(name, version_or_alias).tags.items():
            if k.startswith(LINEAGE_PREFIX):
                try:
                    out[k[len(LINEAGE_PREFIX):]] = json.loads(v)
                except json.JSONDecodeError:
                    out[k[len(LINEAGE_PREFIX):]] = v
        return out

    def versions(self, name: str = DEFAULT_MODEL) -> list[dict]:
        """All versions, oldest first: number, aliases, run, weights sha, state, lineage."""
        from mlflow.exceptions import MlflowException

        try:  # search results do not carry aliases; the registered model does
            aliases = self._retry(lambda: self.client.get_registered_model(name)).aliases
        except MlflowException:
            return []
        rows = []
        for mv in self._retry(lambda: self.client.search_model_versions(f"name = '{name}'")):
            rows.append({"version": int(mv.version), "run_id": mv.run_id,
                         "aliases": sorted(a for a, v in aliases.items() if str(v) == str(mv.version)),
                         "created": mv.creation_timestamp, "weights_sha256": mv.tags.get(SHA_TAG, ""),
                         "state": mv.tags.get(STATE_TAG, ""), "lineage": self.lineage(name, mv.version)})
        return sorted(rows, key=lambda r: r["version"])

    def download(self, name: str, version_or_alias: int | str, dst: str | Path | None = None) -> Path:
        """The artifact directory of a version (cached under <home>/mlflow/downloads when unchanged)."""
        from kdops.artifacts import ArtifactError, read_meta

        mv = self.model_version(name, version_or_alias)
        sha, path = mv.tags.get(SHA_TAG, ""), mv.tags.get(PATH_TAG)
        if not path:
            raise RegistryError(f"{name} v{mv.version} was not registered by kdops (no {PATH_TAG} tag).")
        if dst is None:
            from kdops.paths import subdir

            dst = subdir("mlflow") / "downloads" / name / f"v{mv.version}"
        dst = Path(dst)
        if dst.is_dir():
            with contextlib.suppress(ArtifactError):
                if read_meta(dst).weights_sha256 == sha:
                    return dst
            shutil.rmtree(dst)
        tmp = dst.with_name(f"{dst.name}.partial-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        try:
            got = Path(self._retry(lambda: self.client.download_artifacts(mv.run_id, path, str(tmp))))
            if read_meta(got).weights_sha256 != sha:
                raise ArtifactError(f"{name} v{mv.version}: downloaded weights do not match the registered sha.")
            with contextlib.suppress(OSError):  # another process may have finished the same download
                got.rename(dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dst

    def load(self, name: str, version_or_alias: int | str, device: str = "cpu"):
        """``(model, tokenizer, meta)`` of a version (safetensors): ``kdops.artifacts.load_student`` for a
        classifier, ``kdops.lm.student.load_lm_student`` for a causal-LM student."""
        from kdops.artifacts import load_student, read_meta

        directory = self.download(name, version_or_alias)
        if read_meta(directory).kind == "causal-lm":
            from kdops.lm.student import load_lm_student

            return load_lm_student(directory, device=device)
        return load_student(directory, device=device)

    # -- aliases and the promotion ledger ----------------------------------------------------------

    def set_alias(self, name: str, alias: str, version: int | str) -> None:
        self._retry(lambda: self.client.set_registered_model_alias(name, alias, str(version)))

    def delete_alias(self, name: str, alias: str) -> None:
        with contextlib.suppress(Exception):
            self.client.delete_registered_model_alias(name, alias)

    def get_version_by_alias(self, name: str, alias: str) -> int | None:
        from mlflow.exceptions import MlflowException

        try:
            return int(self.client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            return None

    def champion(self, name: str = DEFAULT_MODEL) -> int | None:
        return self.get_version_by_alias(name, CHAMPION)

    def challenger(self, name: str = DEFAULT_MODEL) -> int | None:
        return self.get_version_by_alias(name, CHALLENGER)

    def ledger(self, name: str = DEFAULT_MODEL) -> list[dict]:
        """Every promotion decision, oldest first (keys sort by time: ``kdops.ledger.<time_ns>...``)."""
        from mlflow.exceptions import MlflowException

        try:
            tags = self._retry(lambda: self.client.get_registered_model(name)).tags
        except MlflowException:
            return []
        return [json.loads(tags[k]) for k in sorted(k for k in tags if k.startswith(LEDGER_PREFIX))]

    def _append(self, name: str, action: str, version: int | None, previous: int | None, reason: str,
                report_summary: dict | None, actor: str | None) -> dict:
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}.")
        summary = report_summary or {}
        if len(json.dumps(summary, default=str)) > 8000:  # keep the ledger readable: numbers only
            summary = numeric_leaves(summary)
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "actor": _actor(actor),
                 "action": action, "version": version, "previous_champion": previous, "reason": reason,
                 "report_summary": summary}
        # A fresh key per entry (never an overwrite) is what makes the ledger append-only.
        key = f"{LEDGER_PREFIX}{time.time_ns():020d}.{uuid.uuid4().hex[:6]}"
        self._ensure_model(name)
        self._retry(lambda: self.client.set_registered_model_tag(name, key, json.dumps(entry, default=str)))
        return entry

    def _state(self, name: str, version: int | None, state: str) -> None:
        if version is not None:
            self._retry(lambda: self.client.set_model_version_tag(name, str(version), STATE_TAG, state))

    def promote(self, name: str, version: int, reason: str, report_summary: dict | None = None,
                actor: str | None = None) -> dict:
        """Move ``champion`` to ``version`` and record who/why/what it replaced. A no-op when it is
        champion already (a re-run flow does not promote twice); returns the ledger entry."""
        with self.locked():
            self.model_version(name, version)  # fails loudly for an unknown version
            previous = self.champion(name)
            if previous == int(version):
                done = [e for e in self.ledger(name) if e["version"] == int(version)]
                return done[-1] if done else {"action": "promote", "version": int(version)}
            self.set_alias(name, CHAMPION, version)
            if self.challenger(name) == int(version):
                self.delete_alias(name, CHALLENGER)
            self._state(name, previous, "retired")
            self._state(name, int(version), CHAMPION)
            return self._append(name, "promote", int(version), previous, reason, report_summary, actor)

    def rollback(self, name: str, reason: str, actor: str | None = None, to_version: int | None = None) -> dict:
        """Put back the champion that the current one replaced (or ``to_version``); returns the entry.
        Repeated rollbacks walk further back through the promotions."""
        with self.locked():
            current = self.champion(name)
            if current is None:
                raise RegistryError(f"{name}: no champion to roll back.")
            if to_version is None:
                made = [e for e in self.ledger(name) if e["action"] == "promote" and e["version"] == current]
                if not made or made[-1]["previous_champion"] is None:
                    raise RegistryError(f"{name}: v{current} has no recorded previous champion to roll back to.")
                to_version = made[-1]["previous_champion"]
            self.model_version(name, to_version)
            self.set_alias(name, CHAMPION, to_version)
            self._state(name, current, "rolled_back")
            self._state(name, int(to_version), CHAMPION)
            return self._append(name, "rollback", int(to_version), current, reason, None, actor)

    def reject(self, name: str, version: int, reason: str, report_summary: dict | None = None,
               actor: str | None = None) -> dict:
        """Record a candidate the gate (or a person) turned down; it stops being the challenger."""
        with self.locked():
            if self.challenger(name) == int(version):
                self.delete_alias(name, CHALLENGER)
            self._state(name, int(version), "rejected")
            return self._append(name, "reject", int(version), self.champion(name), reason, report_summary, actor)

    def review(self, name: str, version: int, reason: str, report_summary: dict | None = None,
               actor: str | None = None) -> dict:
        """Record a candidate sent to human review; it becomes (or stays) the challenger meanwhile."""
        with self.locked():
            self.set_alias(name, CHALLENGER, version)
            self._state(name, int(version), "in_review")
            return self._append(name, "review", int(version), self.champion(name), reason, report_summary, actor)

    # -- UI ------------------------------------------------------------------------------------

    def ui_command(self, port: int = 5000, host: str = "127.0.0.1", workers: int = 1) -> list[str]:
        """The ``mlflow server`` command line (``mlflow ui`` is its alias) for this store. One worker by
        default: MLflow's default of 4 processes each import mlflow, too much for a laptop UI."""
        if not self.is_sqlite:
            raise RegistryError(f"{self.tracking_uri} is not an embedded store; open it in a browser instead.")
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.tracking_uri,
               "--host", host, "--port", str(port), "--workers", str(workers)]
        if self.artifact_root:
            cmd += ["--default-artifact-root", self.artifact_root]
        return cmd
