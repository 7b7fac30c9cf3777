"""Embedded services the loop needs: Prefect's own API server (MLflow is a SQLite URI; Triton is serving/).

Each is replaced by configuration: ``PREFECT_API_URL`` set means "use that server, start nothing".
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from kdops.proc import die_with_parent, free_port


def _drain_prefect_clients(timeout_s: float = 10.0) -> None:
    """Send the flow-run logs and events still queued in this process before the server goes away; otherwise
    they are sent after it and print "Error logging to API: All connection attempts failed" (what Prefect's own
    test harness does, PrefectHQ/prefect#14854)."""
    import inspect

    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for worker in (APILogWorker, EventsWorker):
            if inspect.isawaitable(out := worker.drain_all(timeout=timeout_s)):
                out.close()  # called from async code: nothing to drain synchronously
    except Exception:  # never let a log flush stop the shutdown
        pass


class PrefectServer:
    """``prefect server start`` on loopback with its database under ``home``; a context manager."""

    def __init__(self, home: Path, port: int | None = None, timeout_s: float = 120.0):
        self.home, self.port, self.timeout_s = Path(home), port or free_port(), timeout_s
        self.proc: subprocess.Popen | None = None
        self.external = os.environ.get("PREFECT_API_URL", "")
        self.url = self.external or f"http://127.0.0.1:{self.port}/api"

    def start(self) -> "PrefectServer":
        if self.external:
            return self
        (self.home / "prefect").mkdir(parents=True, exist_ok=True)
        # The database is configuration: $KDOPS_PREFECT_DATABASE_URL or Prefect's own setting (a postgresql+asyncpg
        # URL, what Prefect recommends beyond one machine), else a SQLite file under the home. Both names are set
        # below: Prefect reads PREFECT_SERVER_DATABASE_CONNECTION_URL before its older alias PREFECT_API_....
        db = (os.environ.get("KDOPS_PREFECT_DATABASE_URL") or os.environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL")
              or os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL")
              or f"sqlite+aiosqlite:///{self.home / 'prefect' / 'prefect.db'}")
        # PREFECT_UI_API_URL: the UI's /ui-settings otherwise name port 4200 whatever port the server listens on, and
        # the UI that `kdops up` prints cannot reach its API.
        env = dict(os.environ, PREFECT_HOME=str(self.home / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_UI_API_URL=self.url, PREFECT_SERVER_DATABASE_CONNECTION_URL=db,
                   PREFECT_API_DATABASE_CONNECTION_URL=db)
        env.pop("PREFECT_API_URL", None)
        log = open(self.home / "prefect" / "server.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                      "--port", str(self.port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                     preexec_fn=die_with_parent)  # no orphan server if we are SIGKILLed
        deadline = time.time() + self.timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited ({self.proc.returncode}); see {self.home / 'prefect' / 'server.log'}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        os.environ["PREFECT_API_URL"] = self.url
                        return self
            except OSError:
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"prefect server did not answer on {self.url} within {self.timeout_s:.0f} s")

    @property
    def died(self) -> bool:
        """An embedded server whose process exited without ``stop()``."""
        return self.proc is not None and self.proc.poll() is not None

    def restart(self) -> str:
        """Start the embedded server again on the same port and database (scheduled runs live in the database, so
        none is lost; the runner reconnects by itself)."""
        if self.external:
            raise RuntimeError(f"{self.external} is an external Prefect server: not ours to restart")
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)
        self.proc = None
        self.start()
        return f"on {self.url}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _drain_prefect_clients()
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if not self.external:
            os.environ.pop("PREFECT_API_URL", None)

    def __enter__(self) -> "PrefectServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def reconcile_orphaned_runs(tags: tuple[str, ...] = ("kdops",)) -> list[str]:
    """Flow runs of the tagged deployments that a stopped ``kdops up`` left PENDING, RUNNING or CANCELLING, moved to
    CANCELLED; returns their names. Their runner was the stopped process, so none is alive, and a PENDING one holds
    its deployment's concurrency slot for good: with ``CANCEL_NEW`` every later scheduled run is then cancelled on
    arrival and the monitor never ticks again. Leaving PENDING through the orchestration rules releases the slot; a
    run the server will not move is deleted, which frees it too. Call it before serving, against the current API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterTags, FlowRunFilter,
                                                FlowRunFilterDeploymentId, FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import DeploymentSort, FlowRunSort
    from prefect.states import Cancelled

    stuck = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]
    done = []
    with get_client(sync_client=True) as client:
        deps = client.read_deployments(deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=list(tags))),
                                       sort=DeploymentSort.NAME_ASC, limit=200)  # the server refuses no sort
        if not deps:
            return done
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[d.id for d in deps]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=stuck))), sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            limit=200)
        for run in runs:
            result = client.set_flow_run_state(run.id, Cancelled(message="its kdops up stopped; reconciled at start-up"))
            if result.status.value != "ACCEPT":
                client.delete_flow_run(run.id)
            done.append(run.name)
    return done
