"""One MLflow store: where it is, one ``MlflowClient`` for it, a cross-process lock and retries.

``Tracking`` (runs) and ``Registry`` (versions, aliases, ledger) both sit on a ``Store``; two stores in one process
(tests, a flow talking to two servers) never share the fluent API's global tracking URI or active run.

- Where: the ``tracking_uri`` argument, else ``$MLFLOW_TRACKING_URI``, else an embedded SQLite store
  ``sqlite:///<kdops home>/mlflow/mlflow.db`` with artifacts in ``<kdops home>/mlflow/artifacts``.
- Nothing is opened on construction; the client and the database come on first use.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterator


class RegistryError(RuntimeError):
    """A registry operation that cannot be done as asked (unknown alias, nothing to roll back to...)."""


@dataclass(frozen=True)
class RegistryConfig:
    tracking_uri: str | None = field(default=None, metadata={
        "help": "MLflow tracking/registry URI; default $MLFLOW_TRACKING_URI, else the embedded SQLite store."})
    artifact_root: str | None = field(default=None, metadata={
        "help": "Artifact root for experiments this store creates; default <home>/mlflow/artifacts "
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
    """``{"a": {"b": 1}} -> {"a.b": 1}``; lists stay values (params write them as JSON), dataclasses become dicts."""
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if is_dataclass(v) and not isinstance(v, type):
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


def actor(name: str | None = None) -> str:
    """Who acts: the argument, else ``$KDOPS_ACTOR``, else ``$USER``."""
    return name or os.environ.get("KDOPS_ACTOR") or os.environ.get("USER") or "unknown"


def transient(e: Exception) -> bool:
    """An error worth retrying. SQLite under concurrent writers: MLflow wraps OperationalError ("database is
    locked") as TEMPORARILY_UNAVAILABLE; a version-number race surfaces as an IntegrityError after MLflow's own
    3 retries; a busy server answers 503 or drops the connection. Anything else is a real error."""
    code = getattr(e, "error_code", "")
    if code == "RESOURCE_ALREADY_EXISTS":
        return False
    text = str(e).lower()
    return (code in ("TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED") or "database is locked" in text
            or "unique constraint failed" in text
            or type(e).__name__ in ("ConnectionError", "OperationalError", "ReadTimeout"))


class Store:
    """Where the MLflow store is and the one client that talks to it. Construction touches nothing."""

    def __init__(self, tracking_uri: str | None = None, artifact_root: str | None = None,
                 config: RegistryConfig | None = None):
        cfg = config or RegistryConfig()
        self.config = cfg
        self.tracking_uri = tracking_uri or cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        if self.tracking_uri is None:
            from kdops.paths import Home

            self.tracking_uri = Home.from_env().tracking_uri
        self.db_path = Path(self.tracking_uri[len("sqlite:///"):]) if self.is_sqlite else None
        root = artifact_root or cfg.artifact_root
        if root is None and self.db_path is not None:
            root = str(self.db_path.parent / "artifacts")
        self.artifact_root = root
        self._client = None
        self._lock_depth = 0

    @property
    def is_sqlite(self) -> bool:
        return self.tracking_uri.startswith("sqlite:///")

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
                self.retry(lambda: client.search_experiments(max_results=1))
            self._client = client
        return self._client

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """A cross-process lock around check-then-write sequences (SQLite stores; re-entrant).

        SQLite serialises writers but not our read-decide-write steps (is this artifact registered
        yet? who is champion now?); a file lock makes them atomic between flows on this machine.
        A remote server gets no lock; ``Registry.register`` then de-duplicates after the fact instead.
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

    def retry(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, retried with exponential backoff and jitter while it fails transiently."""
        delay = self.config.backoff_s
        for attempt in range(self.config.retries):
            try:
                return fn()
            except Exception as e:  # MlflowException, sqlalchemy and requests errors alike
                if attempt == self.config.retries - 1 or not transient(e):
                    raise
                time.sleep(delay * (1 + random.random()))
                delay *= 2

    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created (under this store's artifact root) when missing."""
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


class OnStore:
    """What ``Tracking`` and ``Registry`` share: a ``Store`` of their own, or one passed in to share its client."""

    def __init__(self, tracking_uri: str | None = None, artifact_root: str | None = None,
                 config: RegistryConfig | None = None, store: Store | None = None):
        self.store = store or Store(tracking_uri, artifact_root, config)

    @property
    def tracking_uri(self) -> str:
        return self.store.tracking_uri

    @property
    def artifact_root(self) -> str | None:
        return self.store.artifact_root

    @property
    def client(self):
        return self.store.client
