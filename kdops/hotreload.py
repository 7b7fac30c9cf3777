"""Replace a running predictor's weights in place, on request through files: the hot-reload protocol.

A serving process (Triton's ``model.py`` for a slot) keeps one ``ReloadWatcher``. The swapping side
stages an artifact under the watcher's directory and writes ``request.json``; the watcher loads it in its
own thread at low priority, warms it up, installs it and answers in ``ack-<instance>.json``::

    <dir>/request.json          {"seq": 7, "artifact": "7/artifact", "version": "7-1a2b3c4d"}
    <dir>/7/artifact/           safetensors + JSON, as every kdops artifact
    <dir>/ack-<instance>.json   {"seq": 7, "ok": true, "version": "7-1a2b3c4d"}   (or "ok": false, "error")

Why: starting a new Python-backend stub (a process importing torch and transformers) for every swap
lifted the latency of the requests served meanwhile to 4-5x the steady p99 on a 2-core box, whatever its
scheduling priority (bench/README.md); loading weights into a process that already imported everything
costs a fraction of that. Nothing here knows about Triton: ``load`` builds a predictor, ``install``
hands it over. Files, not an endpoint: only who can write the model repository can change weights.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kdops.paths import atomic_write
from kdops.proc import release_free_memory, run_in_idle_thread

log = logging.getLogger(__name__)

REQUEST = "request.json"


@dataclass(frozen=True)
class ReloadRequest:
    seq: int
    artifact: Path  # absolute, resolved against the watcher's directory
    version: str


def _write_json(path: Path, obj: dict) -> None:
    atomic_write(path, json.dumps(obj))  # a reader never sees half a file


def write_request(directory: str | Path, seq: int, artifact: str, version: str) -> None:
    """Ask every watcher of ``directory`` to serve ``artifact`` (a path relative to it) as ``version``."""
    if seq < 1:
        raise ValueError("seq must be >= 1")
    _write_json(Path(directory) / REQUEST, {"seq": seq, "artifact": artifact, "version": version})


def read_request(directory: str | Path) -> ReloadRequest | None:
    """The current request, or None when there is none (or it is unreadable: then nothing is reloaded)."""
    d = Path(directory)
    try:
        raw = json.loads((d / REQUEST).read_text())
        return ReloadRequest(int(raw["seq"]), d / str(raw["artifact"]), str(raw["version"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable reload request in %s: %s", d, e)
        return None


def read_acks(directory: str | Path) -> dict[str, dict]:
    """Every watcher's last answer, by instance name."""
    out = {}
    for p in Path(directory).glob("ack-*.json"):
        try:
            out[p.name[4:-5]] = json.loads(p.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now: read again on the next poll
    return out


def wait_for_acks(directory: str | Path, seq: int, timeout_s: float, poll_s: float = 0.02) -> dict[str, dict]:
    """Block until every registered watcher answered ``seq``; return the answers.

    Raises ``TimeoutError`` when one has not answered in time (a stuck or dead process) and
    ``RuntimeError`` with the watcher's message when one failed to load the artifact.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        acks = read_acks(directory)
        failed = {k: a for k, a in acks.items() if a.get("seq") == seq and not a.get("ok")}
        if failed:
            name, a = next(iter(failed.items()))
            raise RuntimeError(f"instance {name} could not load the new weights: {a.get('error')}")
        if acks and all(a.get("seq") == seq for a in acks.values()):
            return acks
        if time.monotonic() > deadline:
            waiting = sorted(k for k, a in acks.items() if a.get("seq") != seq) or ["(no instance registered)"]
            raise TimeoutError(f"no answer to reload {seq} from {', '.join(waiting)} within {timeout_s:.0f} s")
        time.sleep(poll_s)


class ReloadWatcher:
    """Polls ``directory`` for a new request and serves it; one per serving process (model instance).

    ``load(artifact_dir, version)`` builds a predictor (and should warm it up); it runs at the lowest
    priority (``idle``: nice 19 and SCHED_IDLE, ``kdops.proc.run_in_idle_thread``), so serving keeps the
    CPU. ``install(predictor)`` makes it the one that answers. The watcher's own thread stays at normal
    priority: it only stats a file per poll. A failed load
    answers ``ok: false`` and leaves the installed predictor alone.
    """

    def __init__(self, directory: str | Path, instance: str, load: Callable[[Path, str], object],
                 install: Callable[[object], None], seq: int = 0, version: str = "",
                 poll_s: float = 0.05, idle: bool = True):
        self.directory, self.instance = Path(directory), instance.replace("/", "_")
        self.load, self.install, self.seq, self.poll_s, self.idle = load, install, seq, poll_s, idle
        self._seen: tuple | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self._ack(seq, True, version)  # registers this instance: the swapping side waits for every one

    @property
    def ack_path(self) -> Path:
        return self.directory / f"ack-{self.instance}.json"

    def _ack(self, seq: int, ok: bool, version: str = "", error: str = "") -> None:
        _write_json(self.ack_path, {"seq": seq, "ok": ok, "version": version, "error": error, "pid": os.getpid()})

    def poll_once(self) -> bool:
        """Serve a pending request, if any; True when one was served (loaded or refused)."""
        try:  # a stat per poll; the file is read only when it changed
            st = os.stat(self.directory / REQUEST)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            return False
        if stamp == self._seen:
            return False
        self._seen = stamp
        req = read_request(self.directory)
        if req is None or req.seq <= self.seq:
            return False
        self.seq = req.seq
        t0 = time.perf_counter()
        try:
            # The build runs in a short-lived thread at the lowest priority (nice 19, SCHED_IDLE). Not this
            # thread: it also runs in the serving process, and a lowered thread that gets preempted while
            # holding the GIL stalls the serving thread behind it (priority inversion).
            predictor = self._background(self.load, req.artifact, req.version)
        except Exception as e:  # a corrupt artifact, a shape mismatch: refuse it, keep serving what we have
            log.warning("reload %d of %s refused: %s", req.seq, req.artifact, e)
            self._ack(req.seq, False, req.version, f"{type(e).__name__}: {e}")
            return True
        self.install(predictor)
        del predictor
        # The previous weights, now unreferenced: else RSS creeps up reload by reload. At the lowest priority
        # too (its gc pass takes tens of ms of CPU); nothing waits for this stub's GIL before the ack.
        try:
            self._background(release_free_memory)
        except Exception as e:  # the new weights are installed: answer anyway
            log.warning("reload %d: freeing the previous weights failed: %s", req.seq, e)
        log.info("reload %d: now serving %s (%.2f s)", req.seq, req.version, time.perf_counter() - t0)
        self._ack(req.seq, True, req.version)
        return True

    def _background(self, fn, *args):
        """``fn(*args)`` at the lowest priority in a short-lived thread (``idle``), else on this thread."""
        return run_in_idle_thread(fn, *args) if self.idle else fn(*args)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll_once()
            except Exception as e:  # never let the watcher die silently: say so and keep watching
                log.error("reload watcher of %s: %s", self.directory, e)

    def start(self) -> "ReloadWatcher":
        self._thread = threading.Thread(target=self._run, name=f"kdops-reload-{self.instance}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.ack_path.unlink(missing_ok=True)  # an unloaded instance is no longer waited for


def slot_directory(repository: str | Path, model: str) -> Path:
    """Where the reload requests of ``<repository>/<model>`` live: ``<repository>.kdops-reload/<model>/``,
    beside the repository, never inside it. Inside, a Triton that loads every folder of its repository
    (NVIDIA's default, ``--model-control-mode=none``) failed to start on the unknown folder (measured), and a
    write under ``<repository>/<model>/`` marks that model as modified, so Triton re-loads it whenever an
    ensemble in front of it is re-loaded."""
    repository = Path(repository)
    return repository.parent / f"{repository.name}.kdops-reload" / model


def start_reloadable(repository: str | Path, model: str, instance: str, artifact: Path, version: str,
                     load: Callable[[Path, str], object], install: Callable[[object], None],
                     warn: Callable[[str], None] = log.warning) -> tuple[object, ReloadWatcher | None]:
    """What a serving process does at start: build its predictor, from the last reload request when its
    artifact is still staged (a restarted server serves what was swapped in last) or else from
    ``artifact``; then watch for reloads. No watcher (``None``, and ``warn`` says why) when the
    repository is read-only: every swap then starts a new process, as for any Triton model."""
    directory = slot_directory(repository, model)
    req = read_request(directory)
    if req is not None and req.artifact.is_dir():
        predictor, seq, version = load(req.artifact, req.version), req.seq, req.version
    else:
        predictor, seq = load(artifact, version), 0
    try:
        watcher = ReloadWatcher(directory, instance, load, install, seq, version).start()
    except OSError as e:
        warn(f"{model}: in-place reload off ({e})")
        watcher = None
    return predictor, watcher
