"""Child processes that do not outlive their parent.

The embedded servers (``tritonserver``, ``prefect server``) run as child processes. If the parent is killed
with SIGKILL (an OOM kill, a CI timeout), ``atexit`` and ``__exit__`` never run and the servers would keep
their ports and databases. On Linux the kernel can deliver a signal to the child when its parent dies
(``PR_SET_PDEATHSIG``); elsewhere this is a no-op and the context managers are the only cleanup.

Caveat from prctl(2): "parent" is the *thread* that forked the child. Start servers from a thread that
lives as long as they should (the main thread, in kdops).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """``preexec_fn`` for ``subprocess.Popen``: ask the kernel to send ``sig`` when the parent dies."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
