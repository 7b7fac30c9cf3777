"""Keep an embedded tritonserver serving: restart it when its process dies, and load again what it served.

``kdops up`` runs one ``TritonWatchdog`` beside the Prefect runner. Every ``interval_s`` it notes which models are
READY; when the server process has exited (a crash, the OOM killer, a stray ``kill -9``) it starts the server on
the same ports and repository (``TritonServer.restart``) and loads those models again, so the champion the
repository holds serves again under the same URL. Each restart is logged and counted in ``restarts``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from serving.client import ServingClient
from serving.server import TritonServer

log = logging.getLogger(__name__)


@dataclass
class Restart:
    at: float
    seconds: float
    models: list[str]
    error: str = ""


@dataclass
class TritonWatchdog:
    server: TritonServer
    interval_s: float = 1.0
    always: tuple[str, ...] = ()  # models to load after a restart even if they were not seen READY
    restarts: list[Restart] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop, self._parked = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._ready: set[str] = set(self.always)

    def _note_ready(self) -> None:
        try:
            client = ServingClient(self.server.url, admin_key=self.server.admin_key, timeout_s=5.0)
            self._ready = set(self.always) | {m["name"] for m in client.index() if m.get("state") == "READY"}
        except Exception:  # a busy or restarting server: keep what we knew
            pass

    def check(self) -> Restart | None:
        """One look: restart a dead server (and reload its models); None when it is alive."""
        if not self.server.died:
            self._note_ready()
            return None
        models = sorted(self._ready)
        code = self.server.proc.returncode if self.server.proc else None
        log.warning("tritonserver exited (%s); restarting it on %s with %s", code, self.server.url, models or "no models")
        t0 = time.time()
        try:
            seconds = self.server.restart(models)
            r = Restart(t0, seconds, models)
            log.warning("tritonserver restarted in %.1f s; serving %s again", seconds, models)
        except Exception as e:  # keep watching: the next look tries again
            r = Restart(t0, time.time() - t0, models, error=" ".join(str(e).split())[:300])
            log.error("tritonserver restart failed: %s", r.error)
        self.restarts.append(r)
        return r

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # never let the watchdog die with the server it guards
                log.exception("triton watchdog")
        # The kernel's parent-death signal (TritonServer's die_with_parent) follows the *thread* that started a
        # process: a server restarted here would get SIGTERM if this thread ended. Park it until the process exits.
        self._parked.set()
        threading.Event().wait()

    def start(self) -> "TritonWatchdog":
        if self.server.cfg.url:  # an attached server is someone else's to keep alive
            return self
        self._note_ready()
        self._thread = threading.Thread(target=self._run, name="triton-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._parked.wait(timeout=30)  # no check runs after this returns

    def __enter__(self) -> "TritonWatchdog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
