"""New data and schedules (kdops/sources.py, flows/sources.py, flows/status.py): the watched directory ingests each file once, the queue drains only
after a finished round, ``kdops status`` shows the queue and, with a real Prefect API, the next scheduled runs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from flows.sources import drain_queue
from flows.status import format_status, status
from kdops.sources import DataQueue, scan_watch_dir
from kdops.data import DataSchema
from kdops.paths import Home

PAST = time.time() - 3600  # older than any settle time: the file is complete


def _write(path: Path, text: str, mtime: float | None = PAST) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def _csv(*rows: tuple[str, str]) -> str:
    return "text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows)


def _ctx(tmp_path, home: Path, teacher_dir: str = ""):
    from flows.tasks import LoopContext

    return LoopContext(home=str(home), teacher_dir=teacher_dir, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                       prediction_log=str(tmp_path / "predictions"))


def test_scan_ingests_each_new_file_once(tmp_path):
    home, watch = Home.at(tmp_path / "home"), tmp_path / "incoming"
    _write(watch / "a.csv", _csv(("good movie", "pos"), ("awful film", "neg")), PAST)
    _write(watch / "day2" / "b.jsonl", '{"text": "great plot", "label": "pos"}\n{"text": "", "label": "neg"}\n', PAST + 1)
    _write(watch / ".hidden.csv", _csv(("x", "pos")))
    _write(watch / "c.csv.partial", _csv(("x", "pos")))
    _write(watch / "notes.txt", "not data")

    res = scan_watch_dir(home, watch, DataSchema())
    assert [(Path(r.path).name, r.status) for r in res] == [("a.csv", "ingested"), ("b.jsonl", "ingested")]
    assert res[1].rows == 1 and res[1].quarantined == 1 and Path(res[1].quarantine_path).exists()  # the empty text
    queue = DataQueue.load(home)
    assert [q.snapshot for q in queue.queued] == [r.snapshot for r in res]  # arrival order
    assert (home.snapshots / f"{res[0].snapshot}.parquet").exists()

    assert scan_watch_dir(home, watch, DataSchema()) == []  # nothing new
    os.utime(watch / "a.csv", (PAST + 5, PAST + 5))  # re-saved unchanged: hashed again, same content, not ingested
    assert scan_watch_dir(home, watch, DataSchema()) == []
    _write(watch / "copy.csv", (watch / "a.csv").read_text())
    assert [r.status for r in scan_watch_dir(home, watch, DataSchema())] == ["skipped"]

    # new content under an old name; an entirely bad file; a file still being written
    _write(watch / "a.csv", _csv(("fun story", "pos")), PAST + 10)
    _write(watch / "bad.csv", "body,y\nhello,pos\n", PAST + 20)
    _write(watch / "late.csv", _csv(("sad book", "neg")), mtime=None)
    res = {Path(r.path).name: r for r in scan_watch_dir(home, watch, DataSchema(), settle_s=30)}
    assert res["a.csv"].status == "ingested" and res["late.csv"].status == "writing"
    assert res["bad.csv"].status == "failed" and "missing column(s) ['text']" in res["bad.csv"].reason
    assert "\n" not in res["bad.csv"].reason
    assert len(DataQueue.load(home).queued) == 3
    os.utime(watch / "bad.csv", (PAST + 30, PAST + 30))  # touched, unchanged: not retried
    os.utime(watch / "late.csv", (PAST + 40, PAST + 40))  # finished
    assert [(Path(r.path).name, r.status) for r in scan_watch_dir(home, watch, DataSchema(), settle_s=30)] == [("late.csv", "ingested")]
    assert [q.source for q in DataQueue.load(home).queued][-1] == str((watch / "late.csv").resolve())


def test_scan_maps_labels_onto_the_teachers(tmp_path):
    home, watch = Home.at(tmp_path / "home"), tmp_path / "in"
    _write(watch / "x.csv", _csv(("good movie", "fresh"), ("awful film", "neg"), ("meh", "meh")))
    (r,) = scan_watch_dir(home, watch, DataSchema(), labels=("neg", "pos"), label_map={"fresh": "pos"})
    from kdops.data import Snapshot

    snap = Snapshot.load(home.snapshots, r.snapshot)
    assert r.quarantined == 1 and snap.labels == ("neg", "pos") and sorted(snap.rows["label"]) == ["neg", "pos"]
    assert scan_watch_dir(home, tmp_path / "nowhere", DataSchema()) == []  # no directory (yet): no crash


def test_queue_drains_only_after_a_finished_round(tmp_path, monkeypatch):
    from flows.tasks import load_snapshot, save_snapshot
    from kdops.errors import UserError

    monkeypatch.setattr("flows.monitor.current_champion", SimpleNamespace(fn=lambda ctx: None))  # no champion yet
    ctx, watch = _ctx(tmp_path, tmp_path / "home"), tmp_path / "in"
    home = ctx.paths
    eval_id = save_snapshot(ctx, pd.DataFrame({"text": ["good", "bad"], "label": ["pos", "neg"]}), ("neg", "pos"))
    calls = []

    def never(**kw):
        calls.append(kw)
        return {}

    assert drain_queue(ctx, never, eval_id) == {"action": "empty-queue"} and calls == []

    _write(watch / "a.csv", _csv(("good movie", "pos"), ("awful film", "neg")))
    _write(watch / "b.csv", _csv(("good movie", "pos"), ("great story", "pos")), PAST + 1)
    scan_watch_dir(home, watch, DataSchema(labels=("neg", "pos")))
    queued = [q.snapshot for q in DataQueue.load(home).queued]

    def fails(**kw):
        raise RuntimeError("teacher went away\nsecond line")

    with pytest.raises(RuntimeError):
        drain_queue(ctx, fails, eval_id)
    q = DataQueue.load(home)
    assert [x.snapshot for x in q.queued] == queued
    assert q.last_round.status == "failed" and q.last_round.error == "RuntimeError: teacher went away"
    with pytest.raises(UserError, match=r"\[data\] test"):  # no evaluation data and no champion to take it from
        drain_queue(ctx, never, None)
    assert [x.snapshot for x in DataQueue.load(home).queued] == queued and calls == []

    def succeeds(**kw):  # a file lands while the round runs: it waits for the next round
        calls.append(kw)
        _write(watch / "c.csv", _csv(("sad book", "neg")))
        scan_watch_dir(home, watch, DataSchema(labels=("neg", "pos")))
        return {"version": 3, "decision": {"action": "promote"}}

    out = drain_queue(ctx, succeeds, eval_id)
    (kw,) = calls
    assert out["action"] == "round" and out["snapshots"] == queued and out["version"] == 3
    assert kw["eval_id"] == eval_id and kw["recipe"] == "classifier" and kw["champion"] is None and kw["replay_ids"] == []
    assert kw["deploy"] is False  # no Triton in the context
    train = load_snapshot(ctx, kw["train_id"])
    assert sorted(train.texts) == ["awful film", "good movie", "great story"] and train.labels == ("neg", "pos")
    q = DataQueue.load(home)
    assert [Path(x.source).name for x in q.queued] == ["c.csv"]
    r = q.last_round
    assert (r.status, r.version, r.decision, r.snapshots, r.train_id, r.rows) == ("finished", 3, "promote", tuple(queued), kw["train_id"], 4)

    st = status(home, api_url="http://127.0.0.1:9/api")  # nothing listens there
    assert st["service"]["running"] is False and st["schedules"] is None
    assert [x["snapshot"] for x in st["queue"]] == [q.queued[0].snapshot] and st["last_round"]["version"] == 3
    text = "\n".join(format_status(st))
    assert "kdops up is not running" in text and q.queued[0].snapshot in text and "v3 promote" in text


def test_status_command_json(tmp_path, kdops_home, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from flows.status import status_command

    monkeypatch.chdir(tmp_path)  # no kdops.toml here
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    _write(tmp_path / "in" / "bad.csv", "body\nx\n")
    scan_watch_dir(Home.at(kdops_home), tmp_path / "in", DataSchema())
    app = typer.Typer()
    app.command("status")(status_command)
    app.command("other")(lambda: None)  # two commands: "status" is a sub-command, as under `kdops`
    res = CliRunner().invoke(app, ["status", "--json", "-"])
    assert res.exit_code == 0, res.output
    st = json.loads(res.output)
    assert st["model"] == "kdops-student" and st["champion"]["version"] is None and st["queue"] == []
    assert st["failed_files"][0]["path"].endswith("bad.csv") and "missing column" in st["failed_files"][0]["reason"]
    res = CliRunner().invoke(app, ["status"])
    assert "kdops up is not running" in res.output and "failed: " in res.output


def test_up_config_schedules():
    from flows.up import UpConfig

    assert UpConfig(home="h").retrain_schedule == {}
    assert UpConfig(home="h", retrain_cron="0 2 * * *").retrain_schedule == {"cron": "0 2 * * *"}
    assert UpConfig(home="h", retrain_interval_s=600).retrain_schedule["interval"].total_seconds() == 600
    assert UpConfig(home="h", kind="causal-lm").first_recipe == "lm-quick"
    for bad in ({"retrain_cron": "0 2 * * *", "retrain_interval_s": 60}, {"retrain_cron": "every day"},
                {"kind": "causal-lm", "recipe": "classifier"}, {"retrain_interval_s": -1}, {"for_seconds": 0}):
        with pytest.raises(ValueError):
            UpConfig(home="h", **bad)


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    from flows.services import PrefectServer

    with PrefectServer(tmp_path_factory.mktemp("prefect")) as server:
        yield server.url


@pytest.mark.server
def test_status_shows_the_next_scheduled_runs(tmp_path, prefect_api):
    """build_deployments' schedules registered on a real Prefect API: kdops-distill on a cron, kdops-monitor and
    kdops-ingest on intervals; status reads each one's next scheduled run from the API."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.up import UpConfig, build_deployments

    home = tmp_path / "home"
    ctx = _ctx(tmp_path, home)
    cfg = UpConfig(home=str(home), interval_s=600, retrain_cron="*/30 * * * *", watch_dir=str(tmp_path / "in"))
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        deps = {d.name: d for d in build_deployments(ctx, cfg, None, eval_id="e1")}
        assert set(deps) >= {"kdops-distill", "kdops-monitor", "kdops-ingest"}
        assert deps["kdops-distill"].parameters["eval_id"] == "e1" and deps["kdops-distill"].parameters["recipe"] == "classifier"
        for name in ("kdops-distill", "kdops-monitor", "kdops-ingest", "kdops-promote"):
            deps[name].apply()
    deadline, by_name = time.time() + 60, {}
    while time.time() < deadline:  # the scheduler creates runs for new deployments within seconds
        st = status(Home.at(home), api_url=prefect_api)
        by_name = {s["deployment"]: s for s in st["schedules"] or []}
        if len(by_name) == 3 and all(s["next_run"] for s in by_name.values()):
            break
        time.sleep(2)
    assert st["service"]["running"] is True
    assert set(by_name) == {"distill_flow/kdops-distill", "monitor_tick/kdops-monitor", "ingest_tick/kdops-ingest"}
    distill = by_name["distill_flow/kdops-distill"]
    assert distill["schedule"].startswith("cron */30 * * * *") and 0 <= distill["next_run_in_s"] <= 1800 + 5
    assert by_name["monitor_tick/kdops-monitor"]["schedule"] == "every 600 s"
    assert "kdops-promote" not in "".join(by_name)  # on demand: no schedule, not listed
    assert "distill_flow/kdops-distill: cron */30 * * * * (UTC); next run " in "\n".join(format_status(st))

    # what a scheduled run gets: the deployment's parameters as JSON, coerced back into the flows' types
    from flows.loop import distill_flow
    from flows.sources import ingest_tick

    _write(tmp_path / "in" / "a.csv", _csv(("good movie", "pos")))
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        ingested = ingest_tick(**json.loads(json.dumps(deps["kdops-ingest"].parameters)))
        assert ingested["ingested"] == 1 and ingested["queued"] == 1
        DataQueue.file(Home.at(home)).unlink()  # an empty queue: the scheduled round is a no-op
        assert distill_flow(**json.loads(json.dumps(deps["kdops-distill"].parameters))) == {"action": "empty-queue"}


@pytest.mark.server
def test_scheduled_distill_flow_trains_on_the_queue(tmp_path, prefect_api, tiny_tokenizer, tiny_teacher):
    """distill_flow without a train_id (what the schedule runs): the queued snapshots -> a real first round ->
    a registered version; the queue is drained and the round recorded. A second run finds the queue empty."""
    from flows.loop import distill_flow
    from flows.tasks import save_snapshot
    from kdops.registry import Registry

    from prefect.settings import PREFECT_API_URL, temporary_settings

    teacher_dir = tmp_path / "teacher"
    tiny_teacher.config.id2label, tiny_teacher.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    tiny_teacher.save_pretrained(str(teacher_dir))
    tiny_tokenizer.save_pretrained(str(teacher_dir))
    ctx = _ctx(tmp_path, tmp_path / "home", str(teacher_dir))
    words = [f"{a} {b}" for a in ("good", "great", "bad", "awful", "fun", "sad") for b in ("movie", "film", "story", "book")]
    _write(tmp_path / "in" / "a.csv", _csv(*[(t, "pos" if t.split()[0] in ("good", "great", "fun") else "neg") for t in words]))
    scan_watch_dir(ctx.paths, tmp_path / "in", DataSchema(labels=("neg", "pos")))
    eval_id = save_snapshot(ctx, pd.DataFrame({"text": ["good movie", "awful film", "great story", "sad book"],
                                               "label": ["pos", "neg", "pos", "neg"], "domain": "a"}), ("neg", "pos"))

    with temporary_settings({PREFECT_API_URL: prefect_api}):
        out = distill_flow(ctx, eval_id=eval_id, recipe="classifier-quick")
        again = distill_flow(ctx, eval_id=eval_id)
    assert out["action"] == "round" and out["version"] == 1 and out["decision"]["action"] in ("promote", "review", "reject")
    q = DataQueue.load(ctx.paths)
    assert q.queued == [] and q.last_round.version == 1 and q.last_round.recipe == "classifier-quick"
    assert Registry(tracking_uri=ctx.tracking_uri).lineage(ctx.model, 1)["snapshot_ids"]["train"] == out["train_snapshot"]
    assert again == {"action": "empty-queue"}


def test_status_shows_the_last_monitored_window_and_its_estimated_accuracy(tmp_path):
    from kdops.paths import Home

    home = Home.at(tmp_path / "home")
    home.monitoring.mkdir(parents=True)
    rows = [{"timestamp": "2026-12-03T10:00:00+00:00", "window_id": "w1", "decision": "ok", "action": "ok", "estimated_acc": 0.93},
            {"timestamp": "2026-12-03T10:05:00+00:00", "window_id": "w2", "decision": "retrain", "action": "retrain",
             "estimated_acc": 0.871, "tests": {}}]
    (home.monitoring / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    st = status(home, api_url="http://127.0.0.1:9/api")
    assert st["last_window"]["window_id"] == "w2" and st["last_window"]["estimated_acc"] == 0.871
    text = "\n".join(format_status(st))
    assert "last monitored window: 2026-12-03T10:05:00+00:00 retrain -> retrain; estimated student accuracy 0.871" in text
