"""What runs at a lower priority while a swap loads a new version beside the serving one.

Thread-level helpers (niced and idle threads, the permission probe) are kdops.proc's; here are the two that
need the serving side: the local reference forward on one torch thread, and renicing a loading stub process.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager, nullcontext

from kdops.proc import can_raise_priority

log = logging.getLogger(__name__)


@contextmanager
def torch_on_this_thread():
    """Run torch ops on the calling thread only (one intra-op thread), then restore the thread count.

    Why: priorities are per thread, and torch's intra-op workers were started by whichever thread first ran a
    parallel op, at its priority: a niced swap's reference forward on them lifted the serving p99 while
    swapping (serving/README.md). The count is process-wide, so other torch work in this process runs
    single-threaded for the few milliseconds of the reference.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def renice(pid: int, value: int) -> None:
    """Set every thread of process ``pid`` to nice ``value`` (setpriority acts on one thread on Linux)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), value)
        except (PermissionError, ProcessLookupError):
            pass


@contextmanager
def _niced_stub(server, marker: str):
    """While a slot loads, renice its stub process (found by its model.py path) to 19, then back to 0.

    Why: a new stub's torch import and model build (seconds of CPU) compete with the serving instance;
    at nice 19 it takes only idle CPU.
    """
    stop = threading.Event()
    found: set[int] = set()

    def watch():
        while not stop.is_set():
            for pid in server.pids():
                try:
                    if pid not in found:
                        with open(f"/proc/{pid}/cmdline", "rb") as fh:
                            if marker.encode() in fh.read():
                                found.add(pid)
                    if pid in found:  # threads torch starts later inherit, but re-apply to be sure
                        renice(pid, 19)
                except OSError:
                    pass
            stop.wait(0.05)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()
        for pid in found:
            try:
                renice(pid, 0)
            except OSError:
                pass


def loading_stub(target, marker: str, nice: bool):
    """A context for loading a slot: its new stub (``marker``: a path in its command line) at nice 19 while it
    loads, when ``nice`` and ``target`` is an embedded server whose processes this side may put back to normal
    priority afterwards; otherwise nothing (a stub left at nice 19 would serve at nice 19)."""
    if not (nice and hasattr(target, "pids") and getattr(target, "proc", None) is not None):
        return nullcontext()
    if not can_raise_priority():
        log.info("%s: loading at normal priority (no permission to renice the stub back)", marker)
        return nullcontext()
    return _niced_stub(target, marker)
