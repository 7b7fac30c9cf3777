"""``kdops up`` as a real process (embedded Prefect API, SQLite MLflow, tritonserver), ``monitor_tick``'s
no-champion path, and the on-disk round trip of a ``ReferenceProfile``."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

DEPLOYMENTS = {"kdops-monitor", "kdops-distill", "kdops-promote", "kdops-rollback", "kdops-review"}


def test_reference_profile_round_trip(tmp_path):
    from monitoring import MonitorConfig, ReferenceProfile, profile_reference

    texts = [f"good movie number {i}" for i in range(30)] + [f"awful boring film, take {i}!" for i in range(30)]
    rng = np.random.default_rng(0)
    ref = profile_reference(texts, MonitorConfig(max_reference=50), probabilities=rng.dirichlet([1, 1], 60),
                            embeddings=rng.normal(size=(60, 8)), label_names=("neg", "pos"))
    ref.save(tmp_path / "ref")
    assert not list((tmp_path / "ref").glob("*.pkl"))
    back = ReferenceProfile.load(tmp_path / "ref")
    assert back.texts == ref.texts and back.label_names == ("neg", "pos") and back.doc_freq == ref.doc_freq
    assert back.descriptors.columns.tolist() == ref.descriptors.columns.tolist()
    np.testing.assert_array_equal(back.descriptors.to_numpy(), ref.descriptors.to_numpy())
    np.testing.assert_array_equal(back.probabilities, ref.probabilities)
    np.testing.assert_array_equal(back.embeddings, ref.embeddings)
    assert back.embeddings.dtype == np.float32

    bare = profile_reference(texts, MonitorConfig(max_reference=40))  # no predictions, no embeddings, no labels
    bare.save(tmp_path / "bare")
    back = ReferenceProfile.load(tmp_path / "bare")
    assert back.probabilities is None and back.embeddings is None and back.label_names is None
    with pytest.raises(FileNotFoundError):
        ReferenceProfile.load(tmp_path / "missing")


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _ctx(tmp_path, home):
    from flows.tasks import LoopContext

    return LoopContext(home=str(home), teacher_dir="", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                       prediction_log=str(tmp_path / "predictions"))


@pytest.mark.server
def test_monitor_tick_without_champion(tmp_path, kdops_home, harness):
    from flows.monitor import monitor_tick

    out = monitor_tick(_ctx(tmp_path, kdops_home), window_s=60, min_rows=1)
    assert out == {"action": "no-champion"}
    assert not (kdops_home / "loop" / "kdops-student" / "state.json").exists()  # nothing checked, nothing to remember


@pytest.mark.server
def test_monitor_tick_checks_the_champion(tmp_path, kdops_home, harness, tiny_student_dir):
    """A registered champion: its reference is built once from its lineage's train snapshot and cached on disk;
    a tick waits for ``min_rows`` predictions, then runs monitor_flow on the rows since the last check."""
    import pandas as pd

    from flows.tasks import save_snapshot
    from flows.monitor import monitor_tick, read_state, reference_dir
    from kdops.prediction_log import PredictionLogWriter
    from kdops.registry import Registry, Tracking
    from monitoring import ReferenceProfile

    ctx = _ctx(tmp_path, kdops_home)
    texts = [f"{a} {b}" for a in ("good", "great", "bad", "awful", "boring", "fun") for b in ("movie", "film", "story", "book", "plot")]
    train_id = save_snapshot(ctx, pd.DataFrame({"text": texts, "label": None, "domain": "a"}), ("neg", "pos"))
    reg = Registry(tracking_uri=ctx.tracking_uri)
    with Tracking(tracking_uri=ctx.tracking_uri).run("tiny") as run:
        version = reg.register(tiny_student_dir, run.run_id, name=ctx.model, lineage={"snapshot_ids": {"train": train_id}})
    reg.promote(ctx.model, version, "test", {})

    out = monitor_tick(ctx, window_s=600, min_rows=40)
    assert out["action"] == "waiting" and out["rows"] == 0 and out["champion"] == version
    ref = ReferenceProfile.load(reference_dir(ctx, version))
    assert sorted(ref.texts) == sorted(texts) and ref.embeddings is not None and ref.label_names == ("neg", "pos")
    assert read_state(ctx)["champion"] == version

    rng = np.random.default_rng(0)
    with PredictionLogWriter(ctx.prediction_log, "test") as w:
        served = [texts[i] for i in rng.integers(len(texts), size=60)]
        p = rng.dirichlet([2, 2], len(served))
        w.write_batch(served, p, ["pos" if x[1] > 0.5 else "neg" for x in p], ctx.model, "1-test")
    out = monitor_tick(ctx, window_s=600, min_rows=40)
    # one window cannot act: the trigger needs 2 alarms in 3 windows
    assert out["rows"] == 60 and out["action"] == "ok" and out["champion"] == version
    checked = read_state(ctx)["last_checked"]
    assert checked > time.time() - 120
    out = monitor_tick(ctx, window_s=600, min_rows=40)  # nothing new since the last check
    assert out["action"] == "waiting" and out["rows"] == 0 and read_state(ctx)["last_checked"] == checked


@pytest.mark.server
def test_monitor_tick_retrain_starts_a_distill_round(tmp_path, kdops_home, harness, tiny_tokenizer, tiny_teacher,
                                                     tiny_student_dir):
    """The retrain branch without a served kdops-distill deployment: the served texts become an unlabelled
    snapshot, the champion is re-evaluated on its eval snapshot, and distill_flow runs here from the champion
    (teacher soft labels, incremental round, gate) and registers the candidate with the champion as parent."""
    import dataclasses

    import pandas as pd

    from flows.tasks import save_snapshot
    from flows.monitor import start_distill
    from kdops.data import Snapshot
    from kdops.registry import Registry, Tracking

    teacher_dir = tmp_path / "teacher"
    tiny_teacher.config.id2label, tiny_teacher.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    tiny_teacher.save_pretrained(str(teacher_dir))
    tiny_tokenizer.save_pretrained(str(teacher_dir))
    ctx = dataclasses.replace(_ctx(tmp_path, kdops_home), teacher_dir=str(teacher_dir))
    reg = Registry(tracking_uri=ctx.tracking_uri)
    with Tracking(tracking_uri=ctx.tracking_uri).run("tiny") as run:
        v1 = reg.register(tiny_student_dir, run.run_id, name=ctx.model)
    reg.promote(ctx.model, v1, "test", {})
    labels = ("neg", "pos")
    eval_id = save_snapshot(ctx, pd.DataFrame({"text": ["good movie", "awful film", "great story", "boring plot"],
                                               "label": ["pos", "neg", "pos", "neg"], "domain": "a"}), labels)
    served = [f"{a} {b}" for a in ("good", "bad", "fun", "sad") for b in ("phone", "case", "battery")] * 3

    out = start_distill(ctx, served, reg.champion_info(ctx.model), eval_id, {})
    assert out["started"] and out["flow_run"] is None and out["eval_id"] == eval_id
    snap = Snapshot.load(kdops_home / "snapshots", out["train_id"])
    assert sorted(snap.texts) == sorted(set(served)) and snap.rows["label"].isna().all()  # teacher labels only
    assert out["version"] != v1 and out["decision"] == "promote"  # seeded: the round keeps every slice
    assert reg.champion(ctx.model) == v1  # no Triton in ctx: nothing was swapped or promoted
    assert reg.lineage(ctx.model, out["version"])["parent_version"] == v1


@pytest.mark.server
def test_monitor_tick_and_retrain_on_an_lm_champion(tmp_path, kdops_home, harness, tiny_lm_tokenizer):
    """A causal-LM champion: its reference is its training text alone (no probabilities, no embeddings), a tick
    checks the served prompts with the text checks (the teacher labels nothing, so no disagreement check), and
    the retrain branch runs distill_flow (LM recipe) from the champion on the served prompts, replaying its training text."""
    import dataclasses
    import json

    import pandas as pd

    from flows.tasks import save_snapshot
    from flows.monitor import monitor_tick, reference_dir, start_distill
    from kdops.prediction_log import PredictionLogWriter
    from kdops.registry import Registry, Tracking
    from monitoring import ReferenceProfile
    from tests.conftest import make_tiny_lm, save_tiny_lm_student

    teacher_dir = tmp_path / "lm-teacher"
    make_tiny_lm(len(tiny_lm_tokenizer), layers=3, seed=3).save_pretrained(str(teacher_dir))
    tiny_lm_tokenizer.save_pretrained(str(teacher_dir))
    ctx = dataclasses.replace(_ctx(tmp_path, kdops_home), teacher_dir=str(teacher_dir))
    rng = np.random.default_rng(0)
    words = ["good", "great", "bad", "awful", "boring", "fun", "dull", "excellent"]
    reviews = list(dict.fromkeys(f"the {rng.choice(['movie', 'film', 'plot', 'actor', 'story'])} was really "
                                 f"{rng.choice(words)} and {rng.choice(words)}" for _ in range(200)))
    train_id = save_snapshot(ctx, pd.DataFrame({"text": reviews, "label": None, "domain": "a"}), None)
    eval_id = save_snapshot(ctx, pd.DataFrame({"text": reviews[:8], "label": None, "domain": "a"}), None)
    reg = Registry(tracking_uri=ctx.tracking_uri)
    with Tracking(tracking_uri=ctx.tracking_uri).run("tiny-lm") as run:
        v1 = reg.register(save_tiny_lm_student(tmp_path / "lm", tiny_lm_tokenizer), run.run_id, name=ctx.model,
                          lineage={"snapshot_ids": {"train": train_id}})
    reg.promote(ctx.model, v1, "test", {})

    questions = [f"{rng.choice(['what', 'where', 'who', 'how'])} is the {rng.choice(['city', 'country', 'person'])} ?"
                 for _ in range(60)]
    with PredictionLogWriter(ctx.prediction_log, "test") as w:  # what the served LM logs: prompts, no probabilities
        w.write_batch(questions, [[] for _ in questions], ["a completion"] * len(questions), ctx.model, "1-test")
    out = monitor_tick(ctx, window_s=600, min_rows=40)
    ref = ReferenceProfile.load(reference_dir(ctx, v1))
    meta = json.loads((reference_dir(ctx, v1) / "monitor.json").read_text())
    assert sorted(ref.texts) == sorted(reviews) and ref.embeddings is None and meta["kind"] == "causal-lm"
    assert out["rows"] == 60 and out["champion"] == v1 and out["decision"] != "ok"  # questions are not reviews
    checks = json.dumps(out["history"])
    assert "text." in checks and "disagreement" not in checks and "prediction" not in checks

    res = start_distill(ctx, questions, reg.champion_info(ctx.model), eval_id, {})
    assert res["started"] and res["flow_run"] is None and res["version"] != v1
    assert res["decision"] == "promote"  # seeded: perplexity per domain within the champion's
    lineage = reg.lineage(ctx.model, res["version"])
    assert lineage["parent_version"] == v1 and lineage["snapshot_ids"]["train"] == res["train_id"]
    assert lineage["details"]["replay"] > 0  # the champion's training text came back as replay
    assert reg.champion(ctx.model) == v1  # no Triton in ctx: nothing swapped or promoted


async def _api_view(url: str) -> tuple[dict, list]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterName, FlowRunFilter,
                                                FlowRunFilterDeploymentId, FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import DeploymentSort, FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}):
        async with get_client() as client:
            deps = await client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=list(DEPLOYMENTS))),
                                                 sort=DeploymentSort.NAME_ASC, limit=20)
            by_name = {d.name: d for d in deps}
            runs = []
            if "kdops-monitor" in by_name:
                # Past runs only: the scheduler keeps up to 100 future ones in SCHEDULED.
                runs = await client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[by_name["kdops-monitor"].id]),
                                                  state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=[StateType.SCHEDULED]))),
                    sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=50)
            return by_name, runs


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.server
@pytest.mark.slow
def test_kdops_up_serves_deployments_and_stops_on_sigterm(tmp_path):
    """Empty registry: nothing deployed on Triton, and each monitor tick completes with "no champion"."""
    from importlib.metadata import version

    sa = tuple(int(x) for x in version("sqlalchemy").split(".")[:2])
    if sa >= (2, 1):  # prefect 3.8's scheduler fails to insert runs with it: no schedule would ever fire
        pytest.fail(f"SQLAlchemy {version('sqlalchemy')}: Prefect 3.8's scheduler cannot insert scheduled runs "
                    "(InvalidRequestError: Can't evaluate bulk DML statement); pin sqlalchemy<2.1")
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "KDOPS_TRITON_URL")}
    env.update(KDOPS_HOME=str(home), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    log = open(tmp_path / "up.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "up", "--interval", "5", "--for-seconds", "170"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    servers: list[int] = []
    try:
        url, deadline = None, time.time() + 120
        while url is None and time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            m = re.search(r"Prefect API: (\S+)", (tmp_path / "up.log").read_text(errors="replace"))
            url = m.group(1) if m else None
            time.sleep(0.5)
        assert url, (tmp_path / "up.log").read_text()[-3000:]
        text = (tmp_path / "up.log").read_text(errors="replace")
        assert "MLflow store: sqlite:///" in text and "Triton: http://127.0.0.1:" in text and "no champion yet" in text
        servers = [p for p in _children(proc.pid) if "tritonserver" in _cmdline(p) or "prefect server" in _cmdline(p)
                   or ("prefect" in _cmdline(p) and "server" in _cmdline(p))]
        assert len(servers) >= 2, [(p, _cmdline(p)) for p in _children(proc.pid)]

        done, deps, runs = False, {}, []
        deadline = time.time() + 100
        while not done and time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            deps, runs = asyncio.run(_api_view(url))
            done = set(deps) == DEPLOYMENTS and any(r.state_type.value == "COMPLETED" for r in runs)
            time.sleep(2)
        assert set(deps) == DEPLOYMENTS, sorted(deps)
        monitor = deps["kdops-monitor"]
        assert monitor.entrypoint == "flows.monitor.monitor_tick"
        assert [s.schedule.interval.total_seconds() for s in monitor.schedules if s.active] == [5.0]
        assert any(r.state_type.value == "COMPLETED" for r in runs), [(r.name, r.state_name) for r in runs]
        assert monitor.parameters["ctx"]["home"] == str(home) and monitor.parameters["ctx"]["triton_url"]
        assert "pickle" not in str(monitor.parameters)
        from flows.status import format_status, status
        from kdops.paths import Home

        st = status(Home.at(home))  # what `kdops status` reads while it runs: Triton's own counters too
        assert st["service"]["running"] and st["service"]["serving"]["requests"] == 0, st["service"]
        assert any(line.startswith("  Triton (127.0.0.1:") for line in format_status(st)), format_status(st)

        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=90)  # a stop waits for in-flight ticks and the servers; slow under load
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    out = (tmp_path / "up.log").read_text(errors="replace")
    assert rc == 0, out[-3000:]
    assert "kdops up: stopped" in out
    deadline = time.time() + 10
    while any(_alive(p) for p in servers) and time.time() < deadline:
        time.sleep(0.2)
    assert not [p for p in servers if _alive(p)], "servers outlived kdops up"
    _restart_after_sigkill_with_a_stuck_run(tmp_path, env)


def _start_up(tmp_path: Path, env: dict, name: str):
    """``kdops up`` on the test's home (5 s monitor interval); returns (process, log path, Prefect API URL)."""
    log = tmp_path / f"{name}.log"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "up", "--interval", "5", "--for-seconds", "170"],
                            env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=tmp_path)
    url, deadline = None, time.time() + 120
    while url is None and time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        m = re.search(r"Prefect API: (\S+)", log.read_text(errors="replace"))
        url = m.group(1) if m else None
        time.sleep(0.5)
    assert url, log.read_text()[-3000:]
    return proc, log, url


def _ticks_after(url: str, t0: float, timeout: float) -> list:
    """Monitor runs that started after ``t0`` and completed, waiting up to ``timeout`` s for one."""
    deadline, done = time.time() + timeout, []
    while not done and time.time() < deadline:
        _, runs = asyncio.run(_api_view(url))
        done = [r for r in runs if r.state_type.value == "COMPLETED" and r.start_time and r.start_time.timestamp() > t0]
        time.sleep(1)
    return done


def _plant_pending_tick(url: str) -> str:
    """What a killed runner leaves behind: a kdops-monitor run moved to PENDING (it holds the one concurrency slot)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Pending

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("monitor_tick/kdops-monitor")
        deadline = time.time() + 60
        while time.time() < deadline:  # a real tick may hold the slot right now: then ours is cancelled; try again
            run = client.create_flow_run_from_deployment(dep.id, name="stuck-submission")
            client.set_flow_run_state(run.id, Pending())
            if client.read_flow_run(run.id).state.type.value == "PENDING":
                return run.name
            time.sleep(0.3)
        raise AssertionError("could not plant a PENDING tick: the slot was never free")


def _restart_after_sigkill_with_a_stuck_run(tmp_path: Path, env: dict) -> None:
    """Started again on the same home, killed with SIGKILL while a tick is stuck in PENDING, started once more: the
    last start reconciles the stuck run and the monitor ticks again within two intervals of serving."""
    proc, log, url = _start_up(tmp_path, env, "up2")
    try:
        assert _ticks_after(url, time.time() - 1, 60), log.read_text()[-3000:]  # the restarted service ticks
        _plant_pending_tick(url)
        time.sleep(7)  # a scheduled tick meets the stuck one: cancelled on arrival, as the issue saw
        _, runs = asyncio.run(_api_view(url))
        assert any(r.state_type.value == "CANCELLED" for r in runs), [(r.name, r.state_name) for r in runs]
        proc.kill()
        proc.wait(30)
        proc, log, url = _start_up(tmp_path, env, "up3")
        text = log.read_text(errors="replace")
        assert re.search(r"reconciled \d+ run\(s\) a previous kdops up left unfinished: .*stuck-submission", text), text[-3000:]
        deadline = time.time() + 60  # the runner registers the deployments, then starts polling
        while "being served and polling" not in log.read_text(errors="replace") and time.time() < deadline:
            time.sleep(0.2)
        serving = time.time()
        ticks = _ticks_after(url, serving - 5, 2 * 5 + 20)
        assert ticks, log.read_text()[-3000:]
        assert min(r.start_time.timestamp() for r in ticks) - serving <= 2 * 5 + 2  # within 2 intervals of serving
        _prefect_killed_and_back(proc, log, url)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(45)
            except subprocess.TimeoutExpired:
                proc.kill()


def _prefect_killed_and_back(proc, log: Path, url: str) -> None:
    """The embedded Prefect server SIGKILLed under ``kdops up``: its watchdog starts it again on the same port and
    database, the runner reconnects, ticks complete again, and no scheduled tick runs twice."""
    server = [p for p in _children(proc.pid) if "prefect" in _cmdline(p) and "server" in _cmdline(p)]
    assert len(server) == 1, [(p, _cmdline(p)) for p in _children(proc.pid)]
    os.kill(server[0], signal.SIGKILL)
    killed = time.time()
    deadline = killed + 90
    while "prefect server restarted" not in log.read_text(errors="replace") and time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
    assert "prefect server restarted" in log.read_text(errors="replace"), log.read_text()[-3000:]
    assert _ticks_after(url, killed, 60), log.read_text()[-3000:]
    _, runs = asyncio.run(_api_view(url))
    slots = [r.expected_start_time for r in runs if r.state_type.value in ("COMPLETED", "RUNNING")]
    assert len(slots) == len(set(slots)), "a scheduled tick ran twice"
