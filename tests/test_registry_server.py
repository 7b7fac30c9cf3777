"""The registry under concurrent flows (several processes on one SQLite store) and behind a real
``mlflow server``. Marked ``server``: each process imports torch and mlflow, and the server takes seconds.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.server

PROCS, PER_PROC = 4, 3


def _register_worker(uri: str, dirs: list[str], shared_dir: str, shared_run: str, out: str) -> None:
    """One flow: its own run, three students of its own, plus the one student every flow re-registers."""
    from kdops.registry import Registry

    reg = Registry(tracking_uri=uri)
    with reg.run("concurrent") as run:
        got = [reg.register(d, run.run_id, "concurrent", {"teacher_id": "t"}) for d in dirs]
    shared = reg.register(shared_dir, shared_run, "concurrent", {"teacher_id": "t"})
    Path(out).write_text(json.dumps({"own": got, "shared": shared}))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("mlflow-server")


def test_concurrent_registration_loses_and_duplicates_nothing(store, tiny_student_dir, tmp_path):
    from test_registry import make_variant

    from kdops.registry import Registry

    uri = f"sqlite:///{store}/mlflow.db"
    reg = Registry(tracking_uri=uri)
    with reg.run("shared") as shared_run:
        pass
    dirs = [make_variant(tiny_student_dir, tmp_path / f"v{i}", seed=100 + i) for i in range(PROCS * PER_PROC + 1)]
    shared = dirs.pop()
    ctx = mp.get_context("spawn")  # fork would hand the children the parent's open SQLite connections
    procs = [ctx.Process(target=_register_worker, args=(uri, [str(d) for d in dirs[i::PROCS]], str(shared),
                                                         shared_run.run_id, str(tmp_path / f"out{i}.json")))
             for i in range(PROCS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0
    results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(PROCS)]
    own = [v for r in results for v in r["own"]]
    assert len(own) == len(set(own)) == PROCS * PER_PROC
    assert len({r["shared"] for r in results}) == 1  # four flows, one artifact, one version
    versions = reg.versions("concurrent")
    assert [v["version"] for v in versions] == list(range(1, PROCS * PER_PROC + 2))
    assert len({v["weights_sha256"] for v in versions}) == PROCS * PER_PROC + 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_registry_through_a_real_mlflow_server(store, tiny_student_dir, tmp_path):
    """The same store served by ``mlflow server`` (ui_command): an HTTP client sees the same versions,
    aliases and ledger, and can register and promote through the REST API."""
    from test_registry import make_variant

    from kdops.registry import Registry

    local = Registry(tracking_uri=f"sqlite:///{store}/mlflow.db")
    with local.run("before-server") as run:
        pass
    v1 = local.register(tiny_student_dir, run.run_id, "served", {"teacher_id": "t"})
    local.promote("served", v1, "first", actor="test")
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(local.ui_command(port=port), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        remote = Registry(tracking_uri=f"http://127.0.0.1:{port}")
        assert remote.champion("served") == v1 and remote.ledger("served") == local.ledger("served")
        with remote.run("through-server") as r2:
            r2.log_metrics({"loss": 0.5}, step=1)
        variant = make_variant(tiny_student_dir, tmp_path / "variant", seed=7)
        v2 = remote.register(variant, r2.run_id, "served", {"teacher_id": "t"})
        assert remote.register(variant, r2.run_id, "served", {}) == v2
        remote.promote("served", v2, "via REST", actor="test")
        assert local.champion("served") == v2 and local.lineage("served", v2)["parent_version"] == v1
        assert remote.rollback("served", "back")["version"] == v1
        assert remote.download("served", "champion", dst=tmp_path / "dl").joinpath("model.safetensors").exists()
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
