"""Child processes that do not outlive their parent.

The embedded servers (``tritonserver``, ``prefect server``) run as child processes. If the parent is killed
with SIGKILL (an OOM kill, a CI timeout), ``atexit`` and ``__exit__`` never run and the servers would keep
their ports and databases. On Linux the kernel can deliver a signal to the child when its parent dies
(``PR_SET_PDEATHSIG``); elsewhere this is a no-op and the context managers are the only cleanup.

Caveat from prctl(2): "parent" is the *thread* that forked the child. Start servers from a thread that
lives as long as they should (the main thread, in kdops).

``Watchdog`` restarts a server whose process died (``kdops up`` keeps tritonserver and Prefect alive with it).

Also here, for work beside a server on the same cores: short-lived threads at a lower priority
(``run_in_idle_thread``, ``run_in_niced_thread``), and giving freed heap pages back (``release_free_memory``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import logging
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    """The C library, looked up once: ``find_library`` runs ``ldconfig`` in a subprocess on every call."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """``preexec_fn`` for ``subprocess.Popen``: ask the kernel to send ``sig`` when the parent dies."""
    if not sys.platform.startswith("linux"):
        return
    _libc().prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def release_free_memory() -> bool:
    """Give the C heap's free pages back to the kernel (glibc ``malloc_trim(0)``), after a ``gc.collect()``.

    Why: a hot reload frees one model's tensors and allocates the next's. glibc keeps the freed blocks in its
    arenas, and with its sliding mmap threshold tensors of that size stop being mmapped after the first free.
    Without a trim the serving stub's RSS grew with every reload before levelling off; the serving bench's RSS
    growth figure (bench/README.md) is measured with it.
    True when memory was released; False where there is no glibc (a no-op there).
    """
    import gc

    gc.collect()
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = _libc().malloc_trim
    except (OSError, AttributeError):  # another C library (musl) without malloc_trim
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))


def lower_this_thread(nice: int = 19, sched_idle: bool = True) -> None:
    """Put the calling thread (only it: Linux priorities are per thread) at nice ``nice`` and, with
    ``sched_idle``, SCHED_IDLE.

    Why SCHED_IDLE too: a thread at nice 19 that holds the CPU when a normal thread wakes may keep it for
    the rest of its slice (EEVDF protects a running slice); a SCHED_IDLE one is preempted at once. Not
    reversible without privileges, so only for threads that exist for background work, and not in a
    process that serves meanwhile: preempted while holding the GIL, such a thread stalls every other
    thread of its process behind it (priority inversion).
    """
    import os
    import threading

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):
        pass
    if not sched_idle:
        return
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: the calling thread
    except (AttributeError, OSError):
        pass


def _on_a_new_thread(fn, name: str, first=None):
    """``fn()`` on a short-lived thread (after ``first()`` there, when given); its result, or its exception."""
    import threading

    out: dict = {}

    def work():
        if first is not None:
            first()
        try:
            out["value"] = fn()
        except BaseException as e:  # handed back to the caller below
            out["error"] = e

    t = threading.Thread(target=work, name=name)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def run_in_idle_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a short-lived thread at the lowest priority (nice 19 and SCHED_IDLE); its
    result, or its exception."""
    return _on_a_new_thread(lambda: fn(*args, **kwargs), "kdops-idle-work", lower_this_thread)


def run_in_niced_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a short-lived thread at nice 19 (normal policy); its result, or its exception.

    The priority ends with the thread: the caller's own never changes, so nothing has to be raised back
    (which needs CAP_SYS_NICE). Normal policy rather than SCHED_IDLE for work that takes locks other threads of
    the process wait on (the GIL): a SCHED_IDLE thread can be starved while holding one.
    """
    return _on_a_new_thread(lambda: fn(*args, **kwargs), "kdops-niced-work",
                            lambda: lower_this_thread(sched_idle=False))


@functools.lru_cache(maxsize=1)
def can_raise_priority() -> bool:
    """Whether this process may put a thread or process it reniced back to its priority: CAP_SYS_NICE (root
    outside a container that dropped it), or an RLIMIT_NICE that allows it. Probed once, on a throwaway thread
    (one step nicer, then back)."""
    import os
    import threading

    if not hasattr(os, "setpriority"):
        return False

    def probe() -> bool:
        tid = threading.get_native_id()
        try:
            before = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, before + 1)
            os.setpriority(os.PRIO_PROCESS, tid, before)
            return True
        except OSError:
            return False

    return _on_a_new_thread(probe, "kdops-nice-probe")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it), for a server this process starts."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Restart:
    at: float
    seconds: float
    detail: str = ""
    error: str = ""


class Watchdog:
    """Restart a server whose process died: every ``interval_s`` a thread calls ``observe()`` while ``died()`` is
    false (to note what to restore), else ``restart()`` (which returns a detail for the log) and records a
    ``Restart``. A failed restart is retried at the next look. ``kdops up`` keeps its servers alive with these."""

    def __init__(self, name: str, died, restart, observe=None, interval_s: float = 1.0):
        self.name, self._died, self._restart, self._observe, self.interval_s = name, died, restart, observe, interval_s
        self.restarts: list[Restart] = []
        self._stop, self._parked = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> Restart | None:
        if not self._died():
            if self._observe is not None:
                try:
                    self._observe()
                except Exception:  # a busy server: keep what was noted
                    pass
            return None
        log.warning("%s died; restarting it", self.name)
        t0 = time.monotonic()
        try:
            r = Restart(time.time(), 0.0, detail=str(self._restart() or ""))
            log.warning("%s restarted in %.1f s %s", self.name, time.monotonic() - t0, r.detail)
        except Exception as e:
            r = Restart(time.time(), 0.0, error=" ".join(str(e).split())[:300])
            log.error("%s restart failed: %s", self.name, r.error)
        r.seconds = time.monotonic() - t0
        self.restarts.append(r)
        return r

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # never let the watchdog die with the server it guards
                log.exception("%s watchdog", self.name)
        # PR_SET_PDEATHSIG follows the *thread* that started a process (see above): a server restarted here
        # would get SIGTERM if this thread ended. It parks until the process exits.
        self._parked.set()
        threading.Event().wait()

    def start(self) -> "Watchdog":
        if self._observe is not None:
            try:
                self._observe()
            except Exception:
                pass
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._parked.wait(timeout=30)  # no check runs after this returns

    def __enter__(self) -> "Watchdog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
