"""Production stores: an ``mlflow server`` and the embedded Prefect server, both on PostgreSQL (what their docs
recommend beyond one machine), in a throwaway cluster (tests/pg.py). One loop round (distil, register, promote
with a hot swap, a monitor tick) runs against them unchanged: only configuration differs (the tracking URI, and
``$KDOPS_PREFECT_DATABASE_URL`` for the Prefect server). Then the rows are read back from PostgreSQL itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import pg
from kdops.proc import die_with_parent, free_port
from test_flows import _rows

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def postgres():
    if why := pg.missing():
        pytest.skip(why)
    with pg.PostgresCluster(("mlflow", "prefect")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    from serving.server import ServerConfig, TritonServer

    with TritonServer(ServerConfig(repository=str(tmp_path_factory.mktemp("triton") / "repo"))) as server:
        yield server


class MLflowServer:
    """``mlflow server`` on a PostgreSQL backend store, artifacts proxied to a local directory. Started first
    and waited for later, so its start-up overlaps the other servers'."""

    def __init__(self, backend_uri: str, artifacts: Path, log: Path):
        self.backend_uri, self.artifacts, self.log = backend_uri, artifacts, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "MLflowServer":
        # the URI (with its password) goes by environment, out of the process list
        env = dict(os.environ, MLFLOW_BACKEND_STORE_URI=self.backend_uri)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1", "--artifacts-destination", str(self.artifacts)],
                env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                start_new_session=True)  # a process group of its own: the uvicorn it starts is stopped with it
        return self

    def wait(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()[-3000:]
                assert time.monotonic() < deadline, f"no answer: {self.log.read_text()[-3000:]}"
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _query(cluster: pg.PostgresCluster, database: str, sql: str, *args) -> list[tuple]:
    import psycopg2

    with psycopg2.connect(cluster.url(database)) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        rows = cur.fetchall()
    conn.close()
    return rows


def test_loop_round_on_postgres_backed_mlflow_and_prefect(tmp_path, monkeypatch, postgres, tiny_tokenizer,
                                                          tiny_teacher, triton):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.loop import distill_flow
    from flows.monitor import monitor_tick
    from flows.services import PrefectServer
    from flows.tasks import LoopContext, save_snapshot
    from kdops.distill import DistillConfig
    from kdops.gate import GateThresholds
    from kdops.prediction_log import read_predictions
    from kdops.recipes import ClassifierRecipe
    from kdops.registry import Registry
    from kdops.rounds import StudentShape
    from serving.client import ServingClient

    teacher_dir = tmp_path / "teacher"
    tiny_teacher.config.id2label, tiny_teacher.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    tiny_teacher.save_pretrained(str(teacher_dir))
    tiny_tokenizer.save_pretrained(str(teacher_dir))
    home = tmp_path / "home"
    monkeypatch.setenv("KDOPS_HOME", str(home))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # embedded Prefect server, on PostgreSQL
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the tracking URI comes from LoopContext alone
    monkeypatch.setenv("KDOPS_PREFECT_DATABASE_URL", postgres.url("prefect", driver="postgresql+asyncpg"))

    mlflow = MLflowServer(postgres.url("mlflow"), tmp_path / "mlartifacts", tmp_path / "mlflow.log").start()
    try:
        with PrefectServer(home) as prefect, temporary_settings({PREFECT_API_URL: prefect.url}):
            mlflow.wait()
            ctx = LoopContext(home=str(home), teacher_dir=str(teacher_dir), tracking_uri=mlflow.url,
                              triton_url=triton.url, triton_grpc_url=triton.grpc_url,
                              triton_key=triton.admin_key, repository=str(triton.repository),
                              prediction_log=str(tmp_path / "predlog"))
            recipe = ClassifierRecipe(name="tiny", distill=DistillConfig(epochs=1, batch_size=8),
                                      shape=StudentShape(layers=1, embedding_size=8, intermediate_size=32),
                                      gate=GateThresholds(min_retention=0.01, max_slice_drop=1.0))
            labels = ("neg", "pos")
            train_id, eval_id = save_snapshot(ctx, _rows(), labels), save_snapshot(ctx, _rows(16), labels)
            r1 = distill_flow(ctx, train_id, eval_id, recipe, None)  # distil, register, gate, promote, swap
            assert r1["decision"]["action"] == "promote" and "promotion" in r1
            reg = Registry(tracking_uri=mlflow.url)
            assert reg.champion(ctx.model) == r1["version"]

            since = time.time()
            client = ServingClient(triton.url)
            for text in _rows(40)["text"]:
                client.predict(ctx.model, [text])
            deadline = time.time() + 20  # the served model's log is written in the background
            while len(read_predictions(ctx.prediction_log, since=since)) < 40 and time.time() < deadline:
                time.sleep(0.5)
            tick = monitor_tick(ctx, window_s=600, min_rows=40)
            assert tick["champion"] == r1["version"] and tick["rows"] >= 40
            assert tick["action"] == "ok"  # the reference's own texts, one window: nothing to act on
    finally:
        mlflow.stop()

    # the registry's rows are in PostgreSQL: the version, its champion alias, and the monitoring run
    versions = _query(postgres, "mlflow", "SELECT version FROM model_versions WHERE name = %s", ctx.model)
    assert [v for (v,) in versions] == [r1["version"]]
    aliases = _query(postgres, "mlflow", "SELECT alias, version FROM registered_model_aliases WHERE name = %s",
                     ctx.model)
    assert dict(aliases) == {"champion": r1["version"]}
    experiments = {n for (n,) in _query(postgres, "mlflow", "SELECT name FROM experiments")}
    assert "kdops-monitoring" in experiments
    # the flow runs are in PostgreSQL, completed
    runs = set(_query(postgres, "prefect",
                      "SELECT f.name, r.state_type::text FROM flow_run r JOIN flow f ON f.id = r.flow_id"))
    assert {(name, "COMPLETED") for name in ("distill_flow", "promote_flow", "monitor_tick")} <= runs
    # and no store fell back to a SQLite file under the home
    assert not (home / "prefect" / "prefect.db").exists() and not (home / "mlflow" / "mlflow.db").exists()
