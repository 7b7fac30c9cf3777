"""Faults met by killing real processes: tritonserver SIGKILLed under traffic comes back on the same URL serving the
same champion (``serving.watchdog.TritonWatchdog``, what ``kdops up`` runs), and clients that retry see no failure."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

pytestmark = [pytest.mark.server, pytest.mark.slow]

from tests.conftest import serving_client, traffic  # noqa: E402


def _retrying(call, budget_s: float = 90.0):
    """``call`` retried until it answers (what a client behind a retrying proxy sees); counts the failures."""
    failures = [0]

    def run():
        deadline = time.monotonic() + budget_s
        while True:
            try:
                return call()
            except Exception:
                failures[0] += 1
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    return run, failures


def test_a_killed_tritonserver_is_restarted_and_serves_the_champion_again(tmp_path, tiny_student_dir):
    from serving.export import ExportConfig
    from serving.server import ServerConfig, TritonServer
    from serving.swap import SwapConfig, deploy
    from serving.watchdog import TritonWatchdog

    texts = ["good movie", "awful film"]
    cfg = SwapConfig(export=ExportConfig(runtime="torch", max_queue_delay_us=500))
    with TritonServer(ServerConfig(repository=str(tmp_path / "repo"))) as server:
        deploy(server, "student", tiny_student_dir, cfg=cfg)
        before = serving_client(server).predict("student", texts)
        url, grpc_url, pid = server.url, server.grpc_url, server.proc.pid
        with TritonWatchdog(server, interval_s=0.5) as dog:
            time.sleep(1.2)  # the watchdog has seen what is READY
            call, failures = _retrying(lambda: serving_client(server).predict("student", texts))
            with traffic(call, threads=2) as (errors, _):
                time.sleep(0.5)
                killed = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                while not dog.restarts and time.monotonic() - killed < 60:
                    time.sleep(0.1)
                assert dog.restarts, "the watchdog never restarted the server"
                # serving again: a request answers within the restart budget
                while time.monotonic() - killed < 60:
                    try:
                        serving_client(server).predict("student", texts)
                        break
                    except Exception:
                        time.sleep(0.2)
                back = time.monotonic() - killed
                time.sleep(0.5)
        r = dog.restarts[0]
        assert r.error == "" and "student" in r.models and len(dog.restarts) == 1
        assert back <= 30, f"serving again after {back:.1f} s"
        assert errors == []  # retrying clients saw no failure
        assert failures[0] > 0  # ... though requests did fail while the server was down
        assert (server.url, server.grpc_url) == (url, grpc_url) and server.proc.pid != pid
        after = serving_client(server).predict("student", texts)
        assert after.labels == before.labels
        np.testing.assert_allclose(after.probabilities, before.probabilities, atol=1e-5)
