"""Hot swap and rollback of a student (classifier or generation model) behind a stable model name.

Layout: clients call ``<model>`` (an ensemble, no backend, no process) which forwards to one of two slot
models ``<model>__s0`` / ``<model>__s1`` (Python backend). A swap:

1. puts the new artifact into the idle slot: when that slot still runs (the standby, the previous
   version) and its config takes the artifact unchanged, its stub replaces its weights in place
   (kdops.hotreload, ``method="reload"``); otherwise the artifact is exported there (complete config,
   pre-compiled model.py) and loaded: a new stub imports torch, builds the model, runs the warm-up
   (``method="load"``);
2. sends a smoke batch to the slot by name and checks shapes, finiteness, the version string, and
   (by default) that its probabilities equal kdops.predict's on the same artifact, locally;
3. re-points the ensemble at the slot and re-loads it: a backend-less model, ~1 ms, and Triton keeps
   serving the old ensemble until the new one is ready, so no request sees an unloaded model;
4. keeps the old slot loaded as the next swap's standby (``standby=False``: drain, then unload it).

A failure in 1-2 unloads the new slot and raises ``SwapError``: the ensemble never pointed at it, so the
old version kept serving throughout. Why this shape and what it measured: serving/README.md.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import time
import logging
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from serving.client import ServingClient, ServingError
from kdops.hotreload import read_acks, slot_directory, wait_for_acks, write_request
from kdops.proc import can_raise_priority, run_in_niced_thread
from serving.export import (LM_IO, ExportConfig, artifact_kind, classifier_io, export_artifact, reload_compatible,
                            stage_reload, version_label, write_ensemble)

log = logging.getLogger(__name__)

SMOKE_TEXTS = ("this movie was good", "a terrible boring plot", "what city is this?", "i really love this phone")


class SwapError(RuntimeError):
    """A new version was refused; the previous one is still serving."""


@dataclass(frozen=True)
class SwapConfig:
    export: ExportConfig = field(default_factory=ExportConfig, metadata={"help": "How slot models are exported."})
    smoke_texts: tuple[str, ...] = field(default=SMOKE_TEXTS, metadata={"help": "Texts the new slot must answer before traffic moves."})
    verify_local: bool = field(default=True, metadata={"help": "Also compare the slot's probabilities with kdops.predict on the same artifact."})
    atol: float = field(default=1e-4, metadata={"help": "Largest allowed |served - local| probability difference."})
    smoke_tokens: int = field(default=8, metadata={"help": "Generation models: greedy tokens per smoke prompt (served and local must agree exactly)."})
    nice_loading: bool = field(default=True, metadata={"help": "Run the swap at nice 19: in a thread of its own (the caller's priority is untouched) and, with the embedded server and the permission to renice it back, the loading stub until ready. Serving keeps the CPU; swaps take longer on a busy box."})
    drain_s: float = field(default=0.5, metadata={"help": "Seconds between switching and unloading the old slot (in-flight requests finish)."})
    standby: bool = field(default=True, metadata={"help": "Keep the previous slot loaded after a swap, so the next swap replaces its weights in place (kdops.hotreload) instead of starting a new stub process."})
    reload_timeout_s: float = field(default=120.0, metadata={"help": "How long an in-place reload may take before the swap loads a fresh stub instead."})
    keep_archive: int = field(default=5, metadata={"help": "Previous artifacts kept beside the repository for rollback."})

    def __post_init__(self) -> None:
        if not self.smoke_texts or self.atol <= 0 or self.drain_s < 0 or self.keep_archive < 1 or self.reload_timeout_s <= 0:
            raise ValueError("smoke_texts must be non-empty, atol > 0, drain_s >= 0, keep_archive >= 1, reload_timeout_s > 0.")


@dataclass
class SwapResult:
    model: str
    slot: str
    version: int
    label: str
    previous_slot: str | None
    previous_label: str | None
    timings_s: dict = field(default_factory=dict)
    method: str = "load"  # "load": a fresh stub; "reload": new weights in the standby slot's running stub

    def to_dict(self) -> dict:
        return asdict(self)


def slot_names(model: str) -> tuple[str, str]:
    return f"{model}__s0", f"{model}__s1"


def _state_path(repo: Path, model: str) -> Path:
    # A file at the repository root: Triton only treats directories as models.
    return repo / f"{model}.kdops-serving.json"


def archive_dir(repo: Path, model: str) -> Path:
    return repo.parent / f"{repo.name}.archive" / model


def read_state(repo: str | Path, model: str) -> dict:
    p = _state_path(Path(repo), model)
    return json.loads(p.read_text()) if p.exists() else {"model": model, "active_slot": None, "version": 0,
                                                          "label": None, "history": []}


def _write_state(repo: Path, model: str, state: dict) -> None:
    p = _state_path(repo, model)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(p)


@contextmanager
def _swap_lock(repo: Path, model: str):
    """One swap per model at a time, across processes (a CLI swap and a flow, say)."""
    with open(repo / f".{model}.swap.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _as_client(target) -> tuple[ServingClient, Path | None]:
    if isinstance(target, ServingClient):
        return target, None
    return ServingClient.for_server(target), getattr(target, "repository", None)


def check_smoke(served, texts, label: str, expected: np.ndarray | None, atol: float) -> None:
    """Raise SwapError unless a smoke answer is well-formed (and equals ``expected`` when given)."""
    p = served.probabilities
    if p.ndim != 2 or p.shape[0] != len(texts):
        raise SwapError(f"smoke batch: expected {len(texts)} rows, got shape {p.shape}")
    if not np.isfinite(p).all() or not np.allclose(p.sum(1), 1.0, atol=1e-3):
        raise SwapError("smoke batch: probabilities are not finite or do not sum to 1")
    if any(v != label for v in served.versions):
        raise SwapError(f"smoke batch answered by {set(served.versions)}, expected {label}")
    if expected is not None:
        if expected.shape != p.shape or np.abs(expected - p).max() > atol:
            raise SwapError(f"smoke batch: served probabilities differ from kdops.predict's (atol {atol})")


def check_lm_smoke(served, prompts, label: str, expected: list[str] | None, max_tokens: int) -> None:
    """Raise SwapError unless a generation model's smoke answer is well-formed (and equals ``expected``)."""
    if len(served.texts) != len(prompts) or len(served.tokens) != len(prompts):
        raise SwapError(f"smoke batch: expected {len(prompts)} completions, got {len(served.texts)}")
    if any(not 0 <= t <= max_tokens for t in served.tokens):
        raise SwapError(f"smoke batch: token counts {served.tokens} outside [0, {max_tokens}]")
    if any(v != label for v in served.versions):
        raise SwapError(f"smoke batch answered by {set(served.versions)}, expected {label}")
    if expected is not None and list(served.texts) != list(expected):
        raise SwapError(f"smoke batch: served greedy completions differ from kdops.lm.predict's: "
                        f"{served.texts[:2]!r} vs {expected[:2]!r}")


def _smoke(client: ServingClient, name: str, kind: str, texts: list[str], label: str, artifact_dir: Path | None,
           cfg: "SwapConfig") -> None:
    """Ask ``name`` the smoke batch; compare with the local prediction of ``artifact_dir`` when given."""
    if kind == "causal-lm":
        expected = None
        if artifact_dir is not None:
            from kdops.lm.predict import LMGenerator

            expected = [g.text for g in LMGenerator.from_dir(artifact_dir).generate(texts, cfg.smoke_tokens, 0.0)]
        check_lm_smoke(client.generate(name, texts, cfg.smoke_tokens, 0.0), texts, label, expected, cfg.smoke_tokens)
        return
    expected = None
    if artifact_dir is not None:
        from kdops.predict import Predictor

        with (_torch_on_this_thread() if cfg.nice_loading else nullcontext()):
            expected = Predictor.from_dir(artifact_dir).predict_proba(texts)
    check_smoke(client.infer(name, texts), texts, label, expected, cfg.atol)


@contextmanager
def _torch_on_this_thread():
    """Run torch ops on the calling thread only (one intra-op thread), then restore the thread count.

    Why: priorities are per thread, and torch's intra-op workers were started by whichever thread first ran a
    parallel op, at its priority. A niced swap thread's local reference forward still ran on those workers at
    nice 0: under 32 clients on 2 cores it lifted the serving p99 from 17 to 23-27 ms while swapping (the same
    swaps without the reference: 15-18 ms). The count is process-wide, so other torch work in this process
    runs single-threaded for the few milliseconds of the reference.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _set_nice(pid: int, value: int) -> None:
    # setpriority(PRIO_PROCESS) acts on one thread on Linux: walk all threads of the stub.
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), value)
        except (PermissionError, ProcessLookupError):
            pass


@contextmanager
def _niced_stub(server, marker: str):
    """While a slot loads, renice its stub process (found by its model.py path) to 19, then back to 0.

    Why: on 2 cores the new stub's torch import and model build (seconds of CPU) competed with the serving
    instance and stretched request latency; at nice 19 it takes only idle CPU.
    """
    stop = threading.Event()
    found: set[int] = set()

    def watch():
        while not stop.is_set():
            for pid in server.pids():
                if pid in found:
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        if marker.encode() in fh.read():
                            found.add(pid)
                    if pid in found:
                        _set_nice(pid, 19)
                except OSError:
                    pass
            for pid in found:  # threads torch starts later inherit, but re-apply to be sure
                try:
                    _set_nice(pid, 19)
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
                _set_nice(pid, 0)
            except OSError:
                pass


def _safe_unload(client: ServingClient, name: str) -> None:
    try:
        client.unload(name)
    except ServingError:
        pass


def hot_swap(target, model: str, artifact_dir: str | Path, repo: str | Path | None = None,
             cfg: SwapConfig = SwapConfig(), note: str = "swap") -> SwapResult:
    """Serve ``artifact_dir`` under ``model`` without stopping traffic; raise SwapError and keep the old one on failure.

    ``target`` is a ``TritonServer`` (embedded) or a ``ServingClient`` with the admin key (then pass ``repo``,
    the server's model repository as seen from here). With ``cfg.nice_loading`` (the default) the swap runs in a
    short-lived thread at nice 19: its own work (export, hashing, the local reference prediction of the smoke
    check) ran on the cores the serving stub needs, and on 2 cores that alone put requests at 2.5x the steady
    p99 (bench/README.md). The calling thread keeps its priority.
    """
    if cfg.nice_loading:
        return run_in_niced_thread(_hot_swap, target, model, artifact_dir, repo, cfg, note)
    return _hot_swap(target, model, artifact_dir, repo, cfg, note)


def _hot_swap(target, model: str, artifact_dir: str | Path, repo: str | Path | None,
              cfg: SwapConfig, note: str) -> SwapResult:
    client, server_repo = _as_client(target)
    repo = Path(repo or server_repo or "")
    if not repo.is_dir():
        raise SwapError(f"model repository {repo} not found (pass repo=)")
    artifact_dir = Path(artifact_dir)
    with _swap_lock(repo, model):
        state = read_state(repo, model)
        old, prev_label = state["active_slot"], state["label"]
        slot = next(s for s in slot_names(model) if s != old)
        version = int(state["version"]) + 1
        try:
            kind = artifact_kind(artifact_dir)
            label = version_label(artifact_dir, version)
        except Exception as e:  # no kdops.json, unreadable metadata: refused before anything is touched
            raise SwapError(f"{artifact_dir}: not a servable artifact ({e}); {old or 'nothing'} still serving") from e
        t = {}
        t0 = time.perf_counter()
        slots = state.setdefault("slots", {})  # slot -> the Triton version its running stub loaded
        method = "reload" if _try_reload(client, repo, slot, slots.get(slot), artifact_dir, version, label, cfg, t,
                                         f"{state['label'] or 'nothing'} still serving") else "load"
        if method == "load":
            _fresh_load(target, client, repo, slot, artifact_dir, version, label, cfg, t, old)
            slots[slot] = version
        try:
            texts = list(cfg.smoke_texts)
            _smoke(client, slot, kind, texts, label, artifact_dir if cfg.verify_local else None, cfg)
            t["smoke"] = time.perf_counter() - t0 - t["export"] - t["load"]
        except Exception as e:  # load error, smoke mismatch, a dead stub: all refuse the version
            _safe_unload(client, slot)
            raise SwapError(f"{model} v{version} ({artifact_dir}) refused: {e}; "
                            f"{state['label'] or 'nothing'} still serving") from e
        io = LM_IO if kind == "causal-lm" else classifier_io(
            len(json.loads(client.parameter(slot, "kdops_label_names") or "[]")) or 2)
        ens_cfg = repo / model / "config.pbtxt"
        previous_ens = ens_cfg.read_text() if ens_cfg.exists() else None
        ts = time.perf_counter()
        try:
            write_ensemble(repo, model, slot, io, cfg.export.max_batch_size,
                           decoupled=kind == "causal-lm" and cfg.export.streaming)
            client.load(model)
            _smoke(client, model, kind, texts[:1], label, None, cfg)
        except Exception as e:
            if previous_ens is not None:  # put the old routing back before giving up
                ens_cfg.write_text(previous_ens)
                try:
                    client.load(model)
                except ServingError:
                    pass
            _safe_unload(client, slot)
            raise SwapError(f"{model}: switching to {slot} failed ({e}); {state['label'] or 'nothing'} still serving") from e
        t["switch"] = time.perf_counter() - ts
        if old and not cfg.standby:
            time.sleep(cfg.drain_s)  # requests the old ensemble already routed finish on the old slot
            _safe_unload(client, old)
            slots.pop(old, None)
        t["total"] = time.perf_counter() - t0
        _archive(repo, model, version, artifact_dir, cfg.keep_archive)
        state["history"].append({"version": version, "label": label, "slot": slot, "artifact": str(artifact_dir.resolve()),
                                 "time": time.time(), "note": note, "method": method})
        state.update(active_slot=slot, version=version, label=label)
        _write_state(repo, model, state)
        return SwapResult(model, slot, version, label, old, prev_label, {k: round(v, 4) for k, v in t.items()}, method)


def _fresh_load(target, client: ServingClient, repo: Path, slot: str, artifact_dir: Path, version: int, label: str,
                cfg: SwapConfig, t: dict, old: str | None) -> None:
    """Export into the idle slot and load it: a new stub process (torch import, model build, warm-up)."""
    t0 = time.perf_counter()
    _safe_unload(client, slot)  # a standby that cannot take these weights, or a leftover of an interrupted swap
    if (repo / slot).exists():
        for d in (repo / slot).iterdir():
            if d.is_dir() and d.name.isdigit():
                shutil.rmtree(d)
    shutil.rmtree(slot_directory(repo, slot), ignore_errors=True)  # a fresh stub must not pick up an old reload
    try:
        export_artifact(artifact_dir, repo, slot, version, cfg.export, version_label=label)
    except Exception as e:
        raise SwapError(f"{artifact_dir}: export failed ({e}); {old or 'nothing'} still serving") from e
    t["export"] = time.perf_counter() - t0
    try:
        niced = cfg.nice_loading and hasattr(target, "pids") and getattr(target, "proc", None) is not None
        if niced and not can_raise_priority():  # a stub left at nice 19 would serve at nice 19
            log.info("%s: loading at normal priority (no permission to renice the stub back)", slot)
            niced = False
        with (_niced_stub(target, f"/{slot}/{version}/model.py") if niced else nullcontext()):
            client.load(slot)
    except Exception as e:
        _safe_unload(client, slot)
        raise SwapError(f"{slot} v{version} ({artifact_dir}) refused: {e}; {old or 'nothing'} still serving") from e
    t["load"] = time.perf_counter() - t0 - t["export"]


def _try_reload(client: ServingClient, repo: Path, slot: str, loaded_version: int | None, artifact_dir: Path,
                version: int, label: str, cfg: SwapConfig, t: dict, serving_note: str) -> bool:
    """Put the new weights into the standby slot's running stub (kdops.hotreload); False when that slot
    cannot take them in place (not loaded, other config or code, no watcher, no answer in time) and a
    fresh load is needed. Raises SwapError when the stub refuses the artifact."""
    if not cfg.standby or loaded_version is None:
        return False
    rdir = slot_directory(repo, slot)
    try:
        if not (read_acks(rdir) and client.model_ready(slot)
                and reload_compatible(artifact_dir, repo, slot, loaded_version, cfg.export)):
            return False
    except Exception as e:  # unreadable artifact metadata and the like: the fresh load reports it properly
        log.debug("in-place reload of %s not possible: %s", slot, e)
        return False
    t0 = time.perf_counter()
    try:
        rel = stage_reload(artifact_dir, repo, slot, version)
    except Exception as e:
        raise SwapError(f"{artifact_dir}: staging failed ({e}); {serving_note}") from e
    t["export"] = time.perf_counter() - t0
    write_request(rdir, version, rel, label)
    try:
        wait_for_acks(rdir, version, cfg.reload_timeout_s)
    except RuntimeError as e:  # the stub could not load it: refuse, and leave no half-state behind
        _safe_unload(client, slot)
        shutil.rmtree(rdir, ignore_errors=True)
        raise SwapError(f"{slot} v{version} ({artifact_dir}) refused: {e}; {serving_note}") from e
    except TimeoutError as e:
        log.warning("%s; loading a fresh stub instead", e)
        return False
    t["load"] = time.perf_counter() - t0 - t["export"]
    return True


def _archive(repo: Path, model: str, version: int, artifact_dir: Path, keep: int) -> None:
    """Keep a copy of each served artifact so a rollback does not depend on the source still existing."""
    root = archive_dir(repo, model)
    dst = root / str(version)
    if not dst.exists():
        shutil.copytree(artifact_dir, dst, ignore=shutil.ignore_patterns("*.partial"))
    kept = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True)
    for v in kept[keep:]:
        shutil.rmtree(root / str(v), ignore_errors=True)


def deploy(target, model: str, artifact_dir: str | Path, repo: str | Path | None = None,
           cfg: SwapConfig = SwapConfig()) -> SwapResult:
    """First deployment and every later one are the same operation."""
    return hot_swap(target, model, artifact_dir, repo, cfg, note="deploy")


def rollback(target, model: str, repo: str | Path | None = None, cfg: SwapConfig = SwapConfig(),
             steps: int = 1) -> SwapResult:
    """Serve the artifact that was live ``steps`` swaps ago, by the same hot swap (as a new version)."""
    _, server_repo = _as_client(target)
    repo = Path(repo or server_repo or "")
    history = read_state(repo, model)["history"]
    if len(history) <= steps:
        raise SwapError(f"{model}: no version {steps} swap(s) back to roll back to")
    prev = history[-1 - steps]
    src = archive_dir(repo, model) / str(prev["version"])
    if not src.exists():
        src = Path(prev["artifact"])
    if not src.exists():
        raise SwapError(f"{model}: the artifact of {prev['label']} is gone (archive and {prev['artifact']})")
    return hot_swap(target, model, src, repo, cfg, note=f"rollback to {prev['label']}")


def serving_status(target, model: str, repo: str | Path | None = None) -> dict:
    """Active slot, version label, history and Triton's view of every slot."""
    client, server_repo = _as_client(target)
    state = read_state(Path(repo or server_repo or ""), model)
    names = {model, *slot_names(model)}
    try:
        index = [m for m in client.index() if m.get("name") in names]
    except ServingError as e:
        index = [{"error": str(e)}]
    return {**state, "ready": client.model_ready(model), "triton": index}
