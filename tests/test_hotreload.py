"""The in-place reload protocol (kdops.hotreload) without a server: request, load, install, answer; refusals;
timeouts; and which exported slots may take new weights in place (serving.export.reload_compatible)."""

from __future__ import annotations

import json
import os
import sys
import threading

import pytest

from kdops.hotreload import (ReloadWatcher, read_acks, read_request, slot_directory, wait_for_acks,
                             write_request)


def _watcher(tmp_path, instance="m_0_0", fail=False):
    installed = []

    def load(artifact, version):
        if fail:
            raise ValueError(f"corrupt {artifact.name}")
        return (artifact.name, version)

    w = ReloadWatcher(tmp_path, instance, load, installed.append, seq=0, version="1-aaaa")
    return w, installed


def test_watcher_registers_loads_installs_and_answers(tmp_path):
    w, installed = _watcher(tmp_path)
    assert read_acks(tmp_path) == {"m_0_0": {"seq": 0, "ok": True, "version": "1-aaaa", "error": "", "pid": os.getpid()}}
    assert not w.poll_once()  # nothing asked yet
    (tmp_path / "2" / "artifact").mkdir(parents=True)
    write_request(tmp_path, 2, "2/artifact", "2-bbbb")
    assert w.poll_once() and not w.poll_once()  # served once, not again
    assert installed == [("artifact", "2-bbbb")]
    assert wait_for_acks(tmp_path, 2, timeout_s=1)["m_0_0"]["version"] == "2-bbbb"
    w.stop()
    assert read_acks(tmp_path) == {}  # a stopped instance is no longer waited for


def test_a_failed_load_is_refused_and_keeps_the_installed_predictor(tmp_path):
    w, installed = _watcher(tmp_path, fail=True)
    write_request(tmp_path, 3, "3/artifact", "3-cccc")
    assert w.poll_once()
    assert installed == []
    with pytest.raises(RuntimeError, match="m_0_0 could not load the new weights: ValueError: corrupt artifact"):
        wait_for_acks(tmp_path, 3, timeout_s=1)


def test_wait_needs_every_instance_and_times_out_on_a_silent_one(tmp_path):
    a, _ = _watcher(tmp_path, "m_0_0")
    _watcher(tmp_path, "m_0_1")  # registered, never polls: a stuck process
    write_request(tmp_path, 5, "5/artifact", "5-eeee")
    a.poll_once()
    with pytest.raises(TimeoutError, match="m_0_1"):
        wait_for_acks(tmp_path, 5, timeout_s=0.2)
    with pytest.raises(TimeoutError, match="no instance registered"):
        wait_for_acks(tmp_path / "nobody", 1, timeout_s=0.1)


def test_watcher_thread_serves_requests_on_its_own(tmp_path):
    done = threading.Event()
    # idle=False: this is about the polling thread. A SCHED_IDLE build gets no CPU while other work keeps both
    # cores busy at normal priority (a benchmark beside the suite starved it past this 5 s deadline), and the
    # swap then falls back to a fresh stub after reload_timeout_s, by design.
    w = ReloadWatcher(tmp_path, "m_0_0", lambda a, v: v, lambda p: done.set(), poll_s=0.01, idle=False).start()
    try:
        write_request(tmp_path, 1, "1/artifact", "1-ffff")
        assert wait_for_acks(tmp_path, 1, timeout_s=5)["m_0_0"]["ok"] and done.is_set()
    finally:
        w.stop()


def test_unreadable_or_invalid_requests_are_ignored(tmp_path):
    (tmp_path / "request.json").write_text("{not json")
    assert read_request(tmp_path) is None
    (tmp_path / "request.json").write_text(json.dumps({"seq": 1}))
    assert read_request(tmp_path) is None
    with pytest.raises(ValueError):
        write_request(tmp_path, 0, "x", "v")
    assert slot_directory(tmp_path / "repo", "m__s0") == tmp_path / "repo.kdops-reload" / "m__s0"  # outside the repo


def test_reload_compatible_only_when_config_and_code_match(tmp_path, tiny_student_dir, tiny_tokenizer, tiny_lm_dir):
    from kdops.artifacts import Lineage, save_student
    from kdops.student import from_teacher
    from serving.export import ExportConfig, export_artifact, reload_compatible
    from tests.conftest import make_teacher

    repo = tmp_path / "repo"
    export_artifact(tiny_student_dir, repo, "m__s0", 3, ExportConfig())
    assert reload_compatible(tiny_student_dir, repo, "m__s0", 3, ExportConfig())
    assert not reload_compatible(tiny_student_dir, repo, "m__s0", 4, ExportConfig())  # not the loaded version
    assert not reload_compatible(tiny_student_dir, repo, "m__s0", 3, ExportConfig(max_queue_delay_us=500))
    three = save_student(tmp_path / "three", from_teacher(make_teacher(tiny_tokenizer), num_labels=3, layers=[0],
                                                          embedding_size=16),
                         tiny_tokenizer, ["a", "b", "c"], 32, Lineage()).path
    assert not reload_compatible(three, repo, "m__s0", 3, ExportConfig())  # other outputs: a fresh load
    assert not reload_compatible(tiny_lm_dir, repo, "m__s0", 3, ExportConfig())  # another kind: a fresh load
    (repo / "m__s0" / "3" / "model.py").write_text("# older code\n")
    assert not reload_compatible(tiny_student_dir, repo, "m__s0", 3, ExportConfig())


def test_idle_thread_work_returns_results_and_raises_errors():
    from kdops.proc import run_in_idle_thread

    def policy():
        return os.sched_getscheduler(0) if hasattr(os, "sched_getscheduler") else None

    caller = policy()
    assert run_in_idle_thread(lambda a, b: a + b, 2, b=3) == 5
    if hasattr(os, "SCHED_IDLE"):
        assert run_in_idle_thread(policy) == os.SCHED_IDLE
    assert policy() == caller  # only the worker thread was lowered
    with pytest.raises(KeyError, match="missing"):
        run_in_idle_thread(lambda: {}["missing"])


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread priorities")
def test_niced_thread_work_runs_at_nice_19_and_leaves_the_caller_alone():
    """What a swap runs in (SwapConfig.nice_loading): nice 19 under the normal policy, on its own thread."""
    import threading

    from kdops.proc import can_raise_priority, run_in_niced_thread

    def state():
        tid = threading.get_native_id()
        return tid, os.getpriority(os.PRIO_PROCESS, tid), os.sched_getscheduler(0)

    caller = state()
    tid, nice, policy = run_in_niced_thread(state)
    assert tid != caller[0] and nice == 19 and policy == caller[2]  # not SCHED_IDLE: it may hold the GIL
    assert state() == caller
    assert run_in_niced_thread(lambda a, b: a * b, 4, b=5) == 20
    with pytest.raises(ValueError, match="refused"):
        run_in_niced_thread(lambda: (_ for _ in ()).throw(ValueError("refused")))
    # What the swap relies on before renicing a loading stub: it can put a process of its own back afterwards.
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        os.setpriority(os.PRIO_PROCESS, child.pid, 19)
        if can_raise_priority():
            os.setpriority(os.PRIO_PROCESS, child.pid, caller[1])
            assert os.getpriority(os.PRIO_PROCESS, child.pid) == caller[1]
        else:
            with pytest.raises(PermissionError):
                os.setpriority(os.PRIO_PROCESS, child.pid, caller[1])
    finally:
        child.kill()
        child.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_release_free_memory_gives_freed_heap_pages_back():
    """What a reload calls after dropping the old weights: freed heap blocks (below the mmap threshold, as
    tensors end up once glibc has raised it) leave the process's RSS only after the trim."""
    import ctypes
    import ctypes.util

    from kdops.proc import release_free_memory

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

    def rss_mb():
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024

    blocks = [libc.malloc(64 * 1024) for _ in range(3200)]  # 200 MB in 64 KB heap blocks, touched
    for b in blocks:
        libc.memset(b, 1, 64 * 1024)
    keep = libc.malloc(64 * 1024)  # a live block above them: the heap's top cannot simply shrink
    for b in blocks:
        libc.free(b)
    before = rss_mb()
    assert release_free_memory()
    assert before - rss_mb() > 150
    libc.free(keep)
