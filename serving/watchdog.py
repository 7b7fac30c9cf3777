"""Keep an embedded tritonserver serving: restart it when its process dies, and load again what it served.

``kdops up`` runs one beside the Prefect runner. While the server lives, each look notes which models are READY;
when its process has exited (a crash, the OOM killer, a stray ``kill -9``) the server starts again on the same
ports and repository (``TritonServer.restart``) and those models are loaded again, so the champion the repository
holds serves again under the same URL. Restarts are logged and kept in ``restarts``.
"""

from __future__ import annotations

from kdops.proc import Watchdog
from serving.client import ServingClient
from serving.server import TritonServer


class TritonWatchdog(Watchdog):
    def __init__(self, server: TritonServer, interval_s: float = 1.0):
        self.server, self.ready = server, set()
        super().__init__("tritonserver", lambda: server.died, self._restart, self._note_ready, interval_s)

    def _note_ready(self) -> None:
        client = ServingClient(self.server.url, admin_key=self.server.admin_key, timeout_s=5.0)
        self.ready = {m["name"] for m in client.index() if m.get("state") == "READY"}

    def _restart(self) -> str:
        models = sorted(self.ready)
        self.server.restart(models)
        return f"on {self.server.url}, serving {models or 'nothing'} again"

    def start(self) -> "TritonWatchdog":
        if self.server.cfg.url:  # an attached server is someone else's to keep alive
            return self
        return super().start()
