"""The deployments on a Prefect work pool, run by ``prefect worker`` processes: ``kdops up --work-pool NAME``.

``kdops up`` alone serves its deployments in-process (``prefect.serve``). With a work pool, the same deployments
(``flows.up.build_deployments``) are registered on a *process* pool and every flow run is a child process of a
``prefect worker``: one that ``kdops up`` starts and keeps alive here, and any others started with
``prefect worker start --pool NAME`` on machines that reach the same Prefect API, MLflow store and ``KDOPS_HOME``.
Deployments use module entrypoints (``flows.loop.distill_flow``), so a worker needs the kdops package installed and
no image or remote code storage.

Registration goes through ``RunnerDeployment.apply(work_pool_name=...)``, not ``prefect deploy`` or
``prefect.deploy()``: both first ask for the pool's online workers (``read_workers_for_work_pool()`` without a
limit), which sends ``"limit": null, "offset": null``; FastAPI 0.151 and later validate an explicit null against
the server's ``limit: int`` and answer 422 (earlier versions took null for "missing" and used the default).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from kdops.proc import die_with_parent

POOL_TYPE = "process"


def ensure_pool(name: str) -> bool:
    """Create the process work pool ``name`` unless it exists (True when created); refuse a pool of another type,
    whose workers would not run our module entrypoints in a local process."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type=POOL_TYPE,
                                                       base_job_template=ProcessWorker.get_default_base_job_template()))
                return True
            except ObjectAlreadyExists:  # another kdops up created it meanwhile
                pool = client.read_work_pool(name)
    if pool.type != POOL_TYPE:
        from kdops.errors import UserError

        raise UserError(f"work pool {name!r} is of type {pool.type!r}; kdops needs a {POOL_TYPE!r} pool.")
    return False


def register(deployments: list, pool: str) -> list[str]:
    """The deployments (``RunnerDeployment``s) created or updated on the existing ``pool``; their ids."""
    return [str(d.apply(work_pool_name=pool)) for d in deployments]


def _signal(proc, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except Exception:  # psutil.NoSuchProcess: it ended meanwhile
        pass


def online_workers(pool: str) -> list[str]:
    """Names of the pool's workers that sent a heartbeat lately. The limit is explicit: a null one is refused (422)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

    with get_client(sync_client=True) as client:
        workers = client.read_workers_for_work_pool(
            pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"])), limit=200, offset=0)
    return [w.name for w in workers]


class PoolWorker:
    """``prefect worker start --pool NAME --type process`` as a child process; a context manager. ``start()`` returns
    once the worker says it started (its polling loop runs) and the API lists it online."""

    def __init__(self, pool: str, api_url: str, log_path: str | Path, name: str = "", limit: int | None = None,
                 query_s: float | None = None, env: dict | None = None, timeout_s: float = 120.0):
        self.pool, self.api_url, self.log_path, self.limit = pool, api_url, Path(log_path), limit
        self.name = name or f"kdops-{socket.gethostname()}-{os.getpid()}"
        self.query_s, self.env, self.timeout_s = query_s, dict(env or {}), timeout_s
        self.proc: subprocess.Popen | None = None

    def start(self) -> "PoolWorker":
        from prefect.settings import PREFECT_API_URL, temporary_settings

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PREFECT_API_URL": self.api_url, "PYTHONUNBUFFERED": "1", **self.env}
        if self.query_s:  # the default 10 s would start runs of a shorter monitor interval late
            env["PREFECT_WORKER_QUERY_SECONDS"] = str(self.query_s)
        cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", self.pool, "--type", POOL_TYPE,
               "--name", self.name] + (["--limit", str(self.limit)] if self.limit else [])
        log = open(self.log_path, "ab")
        offset = log.tell()  # a restarted worker keeps its name: readiness is read from its own lines of the log
        # The worker runs each flow with its own interpreter (this venv's), so the kdops package is importable there.
        # Its own session: a Ctrl-C in our terminal stops it through stop(), after the watchdog, never before.
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=die_with_parent)  # no orphan worker if we are SIGKILLed
        log.close()
        deadline = time.time() + self.timeout_s
        with temporary_settings({PREFECT_API_URL: self.api_url}):
            while time.time() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"prefect worker exited ({self.proc.returncode}); see {self.log_path}")
                try:
                    if self._started_since(offset) and self.name in online_workers(self.pool):
                        return self
                except Exception:  # the API is restarting: ask again
                    pass
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"prefect worker {self.name} did not come online on pool {self.pool} within "
                           f"{self.timeout_s:.0f} s; see {self.log_path}")

    def _started_since(self, offset: int) -> bool:
        """The worker printed that it started (its polling and heartbeat loops run) after ``offset`` in the log."""
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f"Worker {self.name!r} started!".encode() in f.read()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def died(self) -> bool:
        """A worker whose process exited without ``stop()``."""
        return self.proc is not None and self.proc.poll() is not None

    def restart(self) -> str:
        """Start the worker again under the same name (for ``kdops.proc.Watchdog``)."""
        self.stop()
        self.start()
        return f"(pid {self.proc.pid})"

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGINT: the worker stops polling and waits for its runs in flight; after ``grace_s`` those runs get SIGTERM
        (Prefect's engine then reports them CRASHED while the API is still up, which frees their concurrency slots)
        and the worker exits. The runs are in sessions of their own: left alone, they would outlive the worker and
        hang on an API that ``kdops up`` stops next."""
        import psutil

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                try:
                    runs = psutil.Process(self.proc.pid).children()
                except psutil.NoSuchProcess:
                    runs = []
                for run in runs:
                    _signal(run, signal.SIGTERM)
                _, alive = psutil.wait_procs(runs, timeout=10)
                for run in alive:
                    _signal(run, signal.SIGKILL)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()  # Prefect's worker turns a second interrupt into SIGKILL of itself anyway
                    self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> "PoolWorker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def pool_service(deployments: list, pool: str, api_url: str, log_path: str | Path, poll_s: float | None = None,
                 echo=print):
    """Register ``deployments`` on ``pool`` and keep one local worker running (restarted if it dies) while the block
    runs; yields the ``PoolWorker``. Deployments stay registered afterwards: workers elsewhere keep running them."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from kdops.proc import Watchdog

    with temporary_settings({PREFECT_API_URL: api_url}):
        created = ensure_pool(pool)
        register(deployments, pool)
    echo(f"Work pool {pool} ({POOL_TYPE}{', created' if created else ''}): "
         f"{', '.join(d.name for d in deployments)} registered")
    worker = PoolWorker(pool, api_url, log_path, query_s=poll_s).start()
    try:
        with Watchdog("prefect worker", lambda: worker.died, worker.restart, interval_s=2.0):
            echo(f"Worker {worker.name} (pid {worker.pid}) polls {pool}; log: {log_path}")
            echo(f"More workers: PREFECT_API_URL={api_url} prefect worker start --pool {pool} --type {POOL_TYPE}")
            yield worker
    finally:
        worker.stop()


def serve_on_pool(deployments: list, pool: str, api_url: str, log_path: str | Path, for_seconds: float | None,
                  echo=print, poll_s: float | None = None) -> None:
    """``kdops up --work-pool``: ``pool_service`` until Ctrl-C, SIGTERM (the caller's handler raises) or
    ``for_seconds``. Main thread only."""
    stack = ExitStack()
    try:
        stack.enter_context(pool_service(deployments, pool, api_url, log_path, poll_s, echo))
        deadline = time.monotonic() + for_seconds if for_seconds else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic())))
    finally:
        # Already stopping: a further SIGTERM must not cut the worker's shutdown short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        echo("kdops up: stopping")
        stack.close()
