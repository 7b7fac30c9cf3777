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
        assert r.error == "" and "'student'" in r.detail and len(dog.restarts) == 1
        assert back <= 30, f"serving again after {back:.1f} s"
        assert errors == []  # retrying clients saw no failure
        assert failures[0] > 0  # ... though requests did fail while the server was down
        assert (server.url, server.grpc_url) == (url, grpc_url) and server.proc.pid != pid
        after = serving_client(server).predict("student", texts)
        assert after.labels == before.labels
        np.testing.assert_allclose(after.probabilities, before.probabilities, atol=1e-5)


def test_a_round_killed_mid_training_reruns_to_one_version_and_a_full_disk_keeps_the_champion(tmp_path):
    """``kdops round`` SIGKILLed after its first training epoch (teacher outputs paid for, a checkpoint written),
    then run again: exactly one version is registered, and every teacher request of the re-run is for an input
    the killed run had not labelled (the API teacher's answer cache gains one entry per request). Then a round
    that runs out of disk: a one-line error, no partial artifact, the champion unchanged."""
    import csv
    import json
    import sqlite3
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_api_teacher import fault_server, stats

    proj = tmp_path / "proj"
    proj.mkdir()
    words = ["good", "bad", "fine", "dull", "great", "awful", "odd", "nice", "grim", "fun"]
    for name, n in (("train.csv", 240), ("test.csv", 40)):
        with open(proj / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for i in range(n):
                w.writerow([f"{name[:-4]} {i}: a {words[i % 10]} film about {words[(i * 7) % 10]} things", ("neg", "pos")[i % 2]])
    home = tmp_path / "home"
    env = {**os.environ, "KDOPS_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    kdops = [sys.executable, "-c", "from flows.cli import main; main()"]
    with fault_server() as url:
        (proj / "kdops.toml").write_text(
            '[task]\nkind = "classifier"\nlabels = ["neg", "pos"]\n[data]\ntrain = "train.csv"\ntest = "test.csv"\n'
            f'[teacher]\nkind = "openai"\nurl = "{url}/v1"\nmodel = "fault-model"\n'
            '[student]\nlayers = 1\nepochs = 3\n[gate]\nmin_retention = 0.01\nmax_slice_drop = 1.0\n')
        first = subprocess.Popen([*kdops, "round"], cwd=proj, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 300
        while not any((home / "checkpoints").glob("*/*")) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, "the round ended before its first checkpoint: nothing was killed mid-way"
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        answers = home / "api_answers.sqlite"
        cached = sqlite3.connect(answers).execute("SELECT COUNT(*) FROM answers").fetchone()[0]
        asked = stats(url)["requests"]
        assert cached == asked >= 240  # the training texts were labelled before training started
        again = subprocess.run([*kdops, "round", "--json", str(tmp_path / "round.json")], cwd=proj, env=env,
                               capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-2000:]
        reasked = stats(url)["requests"] - asked
        gained = sqlite3.connect(answers).execute("SELECT COUNT(*) FROM answers").fetchone()[0] - cached
        assert reasked == gained == 40  # only the test texts: nothing the killed run paid for was asked again
        from flows.monitor import current_champion
        from flows.tasks import LoopContext
        from kdops.registry import Registry

        registry = Registry(tracking_uri=f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
        assert [int(v["version"]) for v in registry.versions("kdops-student")] == [1]
        assert json.loads(Path(tmp_path / "round.json").read_text())["version"] == 1

        # A full disk during the next round (a file-size limit below the student's weights; the champion is
        # already downloaded): one line, exit 2, nothing half-written kept, v1 still the champion.
        current_champion.fn(LoopContext(home=str(home), model="kdops-student"))
        (proj / "more.csv").write_text((proj / "train.csv").read_text().replace("\ntrain ", "\nmore "))
        students = sorted(p.name for p in (home / "students").iterdir())

        def limit_files():
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (12 << 20, 12 << 20))

        full = subprocess.run([*kdops, "round", "--train", "more.csv"], cwd=proj, env=env, capture_output=True,
                              text=True, timeout=600, preexec_fn=limit_files)
    assert full.returncode == 2, full.stderr[-2000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no space to write") and "Traceback" not in full.stderr, full.stderr[-2000:]
    assert sorted(p.name for p in (home / "students").iterdir()) == students  # no new or partial student
    assert [int(v["version"]) for v in registry.versions("kdops-student")] == [1]
    assert registry.champion("kdops-student") == 1
