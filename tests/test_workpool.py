"""The deployments on a Prefect process work pool (flows/workpool.py): the embedded Prefect server, a real
``prefect worker`` process, the kdops deployments registered on the pool, a distill round and a promotion run by
the worker (not by the test process), the registry's champion alias moved by the latter, and a killed worker
started again by its watchdog."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pandas as pd
import pytest

POOL = "kdops-test-pool"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return {int(x) for x in out.stdout.split()}


def _run_on_pool(client, deployment: str, parameters: dict, worker_pid: int, timeout_s: float):
    """Start a run of ``deployment`` and wait for a terminal state; returns (flow run, pids the worker started)."""
    dep = client.read_deployment_by_name(deployment)
    run = client.create_flow_run_from_deployment(dep.id, parameters=parameters)
    seen, deadline = set(), time.time() + timeout_s
    while time.time() < deadline:
        seen |= _children(worker_pid)
        run = client.read_flow_run(run.id)
        if run.state and run.state.type.value in TERMINAL:
            return run, seen
        time.sleep(0.5)
    raise AssertionError(f"{deployment}: run {run.name} still {run.state.type.value if run.state else None} "
                         f"after {timeout_s:.0f} s")


@pytest.mark.server
@pytest.mark.slow
def test_distill_and_promote_run_on_a_process_worker(tmp_path, monkeypatch, tiny_tokenizer, tiny_teacher):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.services import PrefectServer
    from flows.tasks import LoopContext, save_snapshot
    from flows.up import UpConfig, build_deployments
    from flows.workpool import ensure_pool, online_workers, pool_service
    from kdops.registry import Registry

    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # the embedded server, not one a caller set
    home = tmp_path / "home"
    monkeypatch.setenv("KDOPS_HOME", str(home))  # the worker and its runs inherit it
    teacher_dir = tmp_path / "teacher"
    tiny_teacher.config.id2label, tiny_teacher.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    tiny_teacher.save_pretrained(str(teacher_dir))
    tiny_tokenizer.save_pretrained(str(teacher_dir))
    # No Triton: a promotion is then the registry step alone (flows/promotion.py).
    ctx = LoopContext(home=str(home), teacher_dir=str(teacher_dir), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                      prediction_log=str(tmp_path / "predictions"))
    words = [("good", "pos"), ("great", "pos"), ("fun", "pos"), ("bad", "neg"), ("awful", "neg"), ("boring", "neg")]
    rows = pd.DataFrame([{"text": f"{w} {x}", "label": y, "domain": "a"}
                         for w, y in words for x in ("movie", "film", "story", "book", "plot")])
    labels = ("neg", "pos")
    train_id, eval_id = save_snapshot(ctx, rows, labels), save_snapshot(ctx, rows.iloc[::3], labels)
    # A tiny first round: 1 layer, 8-rank embeddings, 1 epoch, a gate that keeps any student (parameters: JSON).
    recipe = {"name": "tiny", "distill": {"epochs": 1, "batch_size": 8, "early_stopping_patience": 0},
              "shape": {"layers": 1, "embedding_size": 8, "intermediate_size": 32},
              "gate": {"min_retention": 0.01, "max_slice_drop": 1.0}}

    with PrefectServer(tmp_path / "prefect-home") as server, temporary_settings({PREFECT_API_URL: server.url}):
        deployments = build_deployments(ctx, UpConfig(home=str(home), interval_s=3600), list(labels))
        with pool_service(deployments, POOL, server.url, tmp_path / "worker.log", poll_s=1) as worker:
            assert worker.name in online_workers(POOL)  # the API's answer with an explicit limit: no 422
            assert ensure_pool(POOL) is False  # exists: registering again reuses it
            with get_client(sync_client=True) as client:
                distill = client.read_deployment_by_name("distill_flow/kdops-distill")
                assert distill.work_pool_name == POOL and distill.entrypoint == "flows.loop.distill_flow"

                params = {"train_id": train_id, "eval_id": eval_id, "recipe": recipe, "deploy": False}
                run, started = _run_on_pool(client, "distill_flow/kdops-distill", params, worker.pid, timeout_s=150)
                log = (tmp_path / "worker.log").read_text(errors="replace")
                assert run.state.type.value == "COMPLETED", (run.state, log[-4000:])
                pid = int(str(run.infrastructure_pid).rsplit(":", 1)[-1])
                assert pid in started and pid != worker.pid, (pid, started)  # a child of the worker ran it
                assert run.name in log and str(run.id) in log
                reg = Registry(tracking_uri=ctx.tracking_uri)
                versions = reg.versions(ctx.model)
                assert len(versions) == 1 and reg.champion(ctx.model) is None  # registered, not promoted (deploy=False)
                version = versions[0]["version"]

                run, started = _run_on_pool(client, "promote_flow/kdops-promote",
                                            {"version": version, "artifact": "", "reason": "test: promote on a worker"},
                                            worker.pid, timeout_s=90)
                assert run.state.type.value == "COMPLETED", (run.state, (tmp_path / "worker.log").read_text()[-4000:])
                assert int(str(run.infrastructure_pid).rsplit(":", 1)[-1]) in started
                assert reg.champion(ctx.model) == version

                # a dead worker is started again by the watchdog, and the pool's runs go on
                killed = worker.pid
                os.kill(killed, signal.SIGKILL)
                deadline = time.time() + 60
                while (worker.pid in (None, killed) or worker.died) and time.time() < deadline:
                    time.sleep(0.5)
                assert worker.pid not in (None, killed) and not worker.died, "the worker was not restarted"
                run, _ = _run_on_pool(client, "monitor_tick/kdops-monitor", {"min_rows": 10_000}, worker.pid, 90)
                assert run.state.type.value == "COMPLETED", (run.state, (tmp_path / "worker.log").read_text()[-4000:])
        assert worker.proc is None  # stopped with the block
