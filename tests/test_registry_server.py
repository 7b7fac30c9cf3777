"""The registry under concurrent flows (several processes on one SQLite store), behind a real ``mlflow server``,
and with a real ``tritonserver``: promotion and rollback move the ``champion`` alias and what Triton serves as one
transaction (``flows.promotion``). Marked ``server``: each process imports torch and mlflow, servers take seconds.
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
    from kdops.registry import Registry, Tracking

    reg = Registry(tracking_uri=uri)
    with Tracking(store=reg.store).run("concurrent") as run:
        got = [reg.register(d, run.run_id, "concurrent", {"teacher_id": "t"}) for d in dirs]
    shared = reg.register(shared_dir, shared_run, "concurrent", {"teacher_id": "t"})
    Path(out).write_text(json.dumps({"own": got, "shared": shared}))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("mlflow-server")


def test_concurrent_registration_loses_and_duplicates_nothing(store, tiny_student_dir, tmp_path):
    from test_registry import make_variant

    from kdops.registry import Registry, Tracking

    uri = f"sqlite:///{store}/mlflow.db"
    reg = Registry(tracking_uri=uri)
    with Tracking(store=reg.store).run("shared") as shared_run:
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

    from kdops.registry import Registry, Tracking

    local = Registry(tracking_uri=f"sqlite:///{store}/mlflow.db")
    with Tracking(store=local.store).run("before-server") as run:
        pass
    v1 = local.register(tiny_student_dir, run.run_id, "served", {"teacher_id": "t"})
    local.promote("served", v1, "first", actor="test")
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(local.store.ui_command(port=port), stdout=log, stderr=subprocess.STDOUT)
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
        remote_runs = Tracking(store=remote.store)
        assert remote.champion("served") == v1 and remote.ledger("served") == local.ledger("served")
        with remote_runs.run("through-server") as r2:
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


# -- promotion and rollback as one transaction with a real tritonserver -----------------------------------------

@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    from serving.server import ServerConfig, TritonServer

    with TritonServer(ServerConfig(repository=str(tmp_path_factory.mktemp("triton") / "repo"))) as server:
        yield server


def _served(triton, model: str) -> str:
    from serving.client import ServingClient

    (label,) = ServingClient(triton.url).predict(model, ["good movie"]).versions
    return label


def test_promotion_and_rollback_move_alias_and_triton_together(triton, tiny_student_dir, tmp_path, monkeypatch):
    """Each label is ``<Triton version>-<first 8 hex of the weights' sha>``: the exact weights served."""
    import dataclasses
    import shutil

    from test_registry import make_variant

    from flows.promotion import promote, rollback
    from flows.tasks import LoopContext
    from kdops.artifacts import file_sha256
    from kdops.registry import Registry, Tracking
    from serving.swap import SwapError

    monkeypatch.setenv("KDOPS_HOME", str(tmp_path / "home"))
    ctx = LoopContext(home=str(tmp_path / "home"), teacher_dir="", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                      triton_url=triton.url, triton_grpc_url=triton.grpc_url, triton_key=triton.admin_key,
                      repository=str(triton.repository), model="txn")
    reg = Registry(tracking_uri=ctx.tracking_uri)
    dirs = [tiny_student_dir, make_variant(tiny_student_dir, tmp_path / "v2", seed=21)]
    sha = [file_sha256(d / "model.safetensors")[:8] for d in dirs]
    with Tracking(store=reg.store).run("train") as run:
        v1, v2 = (reg.register(d, run.run_id, "txn", {"teacher_id": "t"}) for d in dirs)
    promote(ctx, v1, str(dirs[0]), "first")
    assert (reg.champion("txn"), _served(triton, "txn")) == (v1, f"1-{sha[0]}")
    ledger = reg.ledger("txn")

    # the registry step fails after the swap: Triton serves v1's weights again, the alias never moved
    def store_down(*args, **kw):
        raise OSError("store unavailable")

    monkeypatch.setattr(Registry, "_append", store_down)
    with pytest.raises(OSError, match="store unavailable"):
        promote(ctx, v2, str(dirs[1]), "gate passed")
    assert (reg.champion("txn"), _served(triton, "txn")) == (v1, f"3-{sha[0]}")  # 2 was v2, 3 is v1 back
    monkeypatch.undo()
    monkeypatch.setenv("KDOPS_HOME", str(tmp_path / "home"))
    assert reg.ledger("txn") == ledger

    # the swap fails (corrupt weights): nothing served changes, the alias is not moved
    broken = tmp_path / "broken"
    shutil.copytree(dirs[1], broken)
    (broken / "model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(SwapError):
        promote(ctx, v2, str(broken), "gate passed")
    assert (reg.champion("txn"), _served(triton, "txn")) == (v1, f"3-{sha[0]}")
    assert reg.ledger("txn") == ledger

    promote(ctx, v2, str(dirs[1]), "gate passed", {"retention": 0.99})
    assert (reg.champion("txn"), _served(triton, "txn")) == (v2, f"4-{sha[1]}")

    # rollback: a swap that fails (a wrong model repository) leaves the alias where it was ...
    with pytest.raises(SwapError, match="no-such-repo"):
        rollback(dataclasses.replace(ctx, repository=str(tmp_path / "no-such-repo")), "p99 regression")
    assert (reg.champion("txn"), _served(triton, "txn")) == (v2, f"4-{sha[1]}")
    # ... a registry step that fails after its swap puts v2 back on Triton ...
    monkeypatch.setattr(Registry, "_append", store_down)
    with pytest.raises(OSError, match="store unavailable"):
        rollback(ctx, "p99 regression")
    assert (reg.champion("txn"), _served(triton, "txn")) == (v2, f"6-{sha[1]}")  # 5 was v1
    monkeypatch.undo()
    monkeypatch.setenv("KDOPS_HOME", str(tmp_path / "home"))
    # ... and one that succeeds moves both, v1's artifact coming from the registry
    out = rollback(ctx, "p99 regression", actor="oncall")
    assert (reg.champion("txn"), _served(triton, "txn")) == (v1, f"7-{sha[0]}")
    assert {k: out["ledger"][k] for k in ("action", "version", "previous_champion", "actor")} == \
        {"action": "rollback", "version": v1, "previous_champion": v2, "actor": "oncall"}
    assert [e["action"] for e in reg.ledger("txn")] == ["promote", "promote", "rollback"]


def test_cli_rollback_moves_triton_too_and_says_registry_only_without_it(triton, tiny_student_dir, tmp_path,
                                                                           monkeypatch):
    from typer.testing import CliRunner

    from test_registry import make_variant

    from flows.promotion import promote
    from flows.promotion_cli import registry_app
    from flows.tasks import LoopContext
    from kdops.artifacts import file_sha256
    from kdops.registry import Registry, Tracking

    monkeypatch.setenv("KDOPS_HOME", str(tmp_path / "home"))
    for var in ("KDOPS_TRITON_URL", "KDOPS_TRITON_GRPC_URL", "KDOPS_TRITON_ADMIN_KEY"):
        monkeypatch.delenv(var, raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ctx = LoopContext(home=str(tmp_path / "home"), teacher_dir="", tracking_uri=uri, triton_url=triton.url,
                      triton_grpc_url=triton.grpc_url, triton_key=triton.admin_key,
                      repository=str(triton.repository), model="cli-txn", prediction_log=str(tmp_path / "predlog"))
    reg = Registry(tracking_uri=uri)
    dirs = [tiny_student_dir, make_variant(tiny_student_dir, tmp_path / "v2", seed=22)]
    sha = [file_sha256(d / "model.safetensors")[:8] for d in dirs]
    with Tracking(store=reg.store).run("train") as run:
        v1, v2 = (reg.register(d, run.run_id, "cli-txn", {"teacher_id": "t"}) for d in dirs)
    promote(ctx, v1, str(dirs[0]), "first")
    promote(ctx, v2, str(dirs[1]), "second")
    assert _served(triton, "cli-txn") == f"2-{sha[1]}"
    cli = CliRunner()
    common = ["--name", "cli-txn", "--tracking-uri", uri, "--reason", "bad"]
    out = cli.invoke(registry_app, ["rollback", *common, "--triton-url", triton.url, "--triton-grpc-url",
                                    triton.grpc_url, "--triton-admin-key", triton.admin_key,
                                    "--repository", str(triton.repository)])
    assert out.exit_code == 0, out.output
    assert out.output.strip() == f"cli-txn: champion v{v2} -> v{v1}; Triton serves 3-{sha[0]}"
    assert (reg.champion("cli-txn"), _served(triton, "cli-txn")) == (v1, f"3-{sha[0]}")
    # the served model kept writing where the loop's monitor reads (read back from the served config)
    assert triton_param(triton, "cli-txn") == str((tmp_path / "predlog").resolve())
    out = cli.invoke(registry_app, ["rollback", *common, "--to", str(v2)])
    assert out.exit_code == 0, out.output
    assert out.output.strip() == (f"cli-txn: champion v{v1} -> v{v2}; registry only (no --triton-url): "
                                  "the served model is unchanged")
    assert (reg.champion("cli-txn"), _served(triton, "cli-txn")) == (v2, f"3-{sha[0]}")


def triton_param(triton, model: str) -> str:
    from serving.client import ServingClient
    from serving.swap import read_state

    slot = read_state(triton.repository, model)["active_slot"]
    return ServingClient(triton.url).parameter(slot, "kdops_prediction_log_dir")
