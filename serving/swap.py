"""Hot swap and rollback of a served artifact (any kind) behind a stable model name: the swap protocol.

Layout: clients call ``<model>`` (an ensemble, no backend, no process) which forwards to one of two slot
models ``<model>__s0`` / ``<model>__s1`` (Python backend). A swap:

1. puts the new artifact into the idle slot: when that slot still runs (the standby, the previous
   version) and its config takes the artifact unchanged, its stub replaces its weights in place
   (kdops.hotreload, ``method="reload"``); otherwise the artifact is exported there (complete config,
   pre-compiled model.py) and loaded: a new stub imports torch, builds the model, runs the warm-up
   (``method="load"``);
2. sends a smoke batch to the slot by name (serving.smoke): well-formed, from the new version, and by
   default the same answers as the artifact gives locally;
3. re-points the ensemble at the slot and re-loads it: a backend-less model, ~1 ms, and Triton keeps
   serving the old ensemble until the new one is ready, so no request sees an unloaded model;
4. keeps the old slot loaded as the next swap's standby (``standby=False``: drain, then unload it).

A failure in 1-2 unloads the new slot and raises ``SwapError``: the ensemble never pointed at it, so the
old version kept serving throughout. Nothing here asks which kind the artifact is: serving.export serves it
by its kind's spec and serving.smoke checks it by the same. Serving state, lock and archive: serving.state;
what runs niced: serving.priority. Why this shape and what it measured: serving/README.md.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kdops import kinds
from kdops.artifacts import Artifact
from kdops.hotreload import read_acks, slot_directory, wait_for_acks, write_request
from kdops.proc import run_in_niced_thread
from serving.client import ServingClient, ServingError, client_for
from serving.export import (ExportConfig, as_artifact, export_artifact, model_version, reload_compatible,
                            served_runtime, served_spec, stage_reload, streams, write_ensemble)
from serving.priority import loading_stub
from serving.smoke import SMOKE_TEXTS, smoke_check
from serving.state import archive, read_state, rollback_source, slot_names, swap_lock, write_state

log = logging.getLogger(__name__)


class SwapError(RuntimeError):
    """A new version was refused; the previous one is still serving."""


@dataclass(frozen=True)
class SwapConfig:
    export: ExportConfig = field(default_factory=ExportConfig, metadata={"help": "How slot models are exported."})
    smoke_texts: tuple[str, ...] = field(default=SMOKE_TEXTS, metadata={"help": "Texts the new slot must answer before traffic moves."})
    verify_local: bool = field(default=True, metadata={"help": "Also compare the slot's answers with the artifact's own, computed locally (kind.smoke_reference)."})
    atol: float = field(default=1e-4, metadata={"help": "Largest allowed |served - local| difference of numeric answers (probabilities)."})
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


@dataclass
class _Swap:
    """One swap in progress: what every step needs."""

    client: ServingClient
    repo: Path
    model: str
    artifact: Artifact
    slot: str
    version: int
    label: str
    cfg: SwapConfig
    serving: str  # what keeps serving if this swap fails, for error messages
    timings: dict = field(default_factory=dict)

    def smoke(self, name: str, texts, reference: bool) -> None:
        smoke_check(self.client, name, kinds.for_artifact(self.artifact), list(texts), self.label,
                    self.artifact if reference else None, self.cfg.atol, self.cfg.smoke_tokens,
                    one_thread=self.cfg.nice_loading, onnx=served_runtime(self.artifact, self.cfg.export) == "onnx")


def _safe_unload(client: ServingClient, name: str) -> None:
    try:
        client.unload(name)
    except ServingError:
        pass


def hot_swap(target, model: str, artifact_dir: Artifact | str | Path, repo: str | Path | None = None,
             cfg: SwapConfig = SwapConfig(), note: str = "swap") -> SwapResult:
    """Serve ``artifact_dir`` under ``model`` without stopping traffic; raise SwapError and keep the old one on failure.

    ``target`` is a ``TritonServer`` (embedded) or a ``ServingClient`` with the admin key (then pass ``repo``,
    the server's model repository as seen from here). With ``cfg.nice_loading`` (the default) the swap runs in a
    short-lived thread at nice 19: its own work (export, hashing, the local reference answers of the smoke
    check) ran on the cores the serving stub needs, and on 2 cores that alone put requests at 2.5x the steady
    p99 (bench/README.md). The calling thread keeps its priority.
    """
    if cfg.nice_loading:
        return run_in_niced_thread(_hot_swap, target, model, artifact_dir, repo, cfg, note)
    return _hot_swap(target, model, artifact_dir, repo, cfg, note)


def _hot_swap(target, model: str, artifact_dir, repo, cfg: SwapConfig, note: str) -> SwapResult:
    client, server_repo = client_for(target)
    repo = Path(repo or server_repo or "")
    if not repo.is_dir():
        raise SwapError(f"model repository {repo} not found (pass repo=)")
    with swap_lock(repo, model):
        state = read_state(repo, model)
        old, prev_label = state["active_slot"], state["label"]
        serving = f"{prev_label or 'nothing'} still serving"
        version = int(state["version"]) + 1
        try:
            art = as_artifact(artifact_dir)
            kinds.for_artifact(art)
            label = model_version(art, version)
        except Exception as e:  # no kdops.json, unreadable metadata, unknown kind: refused before anything is touched
            raise SwapError(f"{artifact_dir}: not a servable artifact ({e}); {serving}") from e
        slot = next(s for s in slot_names(model) if s != old)
        sw = _Swap(client, repo, model, art, slot, version, label, cfg, serving)
        t0 = time.perf_counter()
        slots = state.setdefault("slots", {})  # slot -> the Triton version its running stub loaded
        method = "reload" if _try_reload(sw, slots.get(slot)) else "load"
        if method == "load":
            _fresh_load(target, sw)
            slots[slot] = version
        try:
            sw.smoke(slot, cfg.smoke_texts, reference=cfg.verify_local)
        except Exception as e:  # load error, smoke mismatch, a dead stub: all refuse the version
            _safe_unload(client, slot)
            raise SwapError(f"{model} v{version} ({art.path}) refused: {e}; {serving}") from e
        sw.timings["smoke"] = time.perf_counter() - t0 - sw.timings["export"] - sw.timings["load"]
        _switch(sw)
        if old and not cfg.standby:
            time.sleep(cfg.drain_s)  # requests the old ensemble already routed finish on the old slot
            _safe_unload(client, old)
            slots.pop(old, None)
        sw.timings["total"] = time.perf_counter() - t0
        archive(repo, model, version, art.path, cfg.keep_archive)
        state["history"].append({"version": version, "label": label, "slot": slot, "artifact": str(art.path.resolve()),
                                 "time": time.time(), "note": note, "method": method})
        state.update(active_slot=slot, version=version, label=label)
        write_state(repo, model, state)
        return SwapResult(model, slot, version, label, old, prev_label,
                          {k: round(v, 4) for k, v in sw.timings.items()}, method)


def _switch(sw: _Swap) -> None:
    """Re-point the stable name at the new slot; on failure put the old routing back and refuse the version."""
    spec = served_spec(sw.artifact, sw.cfg.export)
    ens_cfg = sw.repo / sw.model / "config.pbtxt"
    previous = ens_cfg.read_text() if ens_cfg.exists() else None
    t0 = time.perf_counter()
    try:
        write_ensemble(sw.repo, sw.model, sw.slot, spec, sw.cfg.export.max_batch_size, streams(spec, sw.cfg.export))
        sw.client.load(sw.model)
        sw.smoke(sw.model, sw.cfg.smoke_texts[:1], reference=False)
    except Exception as e:
        if previous is not None:  # put the old routing back before giving up
            ens_cfg.write_text(previous)
            try:
                sw.client.load(sw.model)
            except ServingError:
                pass
        _safe_unload(sw.client, sw.slot)
        raise SwapError(f"{sw.model}: switching to {sw.slot} failed ({e}); {sw.serving}") from e
    sw.timings["switch"] = time.perf_counter() - t0


def _fresh_load(target, sw: _Swap) -> None:
    """Export into the idle slot and load it: a new stub process (torch import, model build, warm-up)."""
    t0 = time.perf_counter()
    _safe_unload(sw.client, sw.slot)  # a standby that cannot take these weights, or a leftover of an interrupted swap
    if (sw.repo / sw.slot).exists():
        for d in (sw.repo / sw.slot).iterdir():
            if d.is_dir() and d.name.isdigit():
                shutil.rmtree(d)
    shutil.rmtree(slot_directory(sw.repo, sw.slot), ignore_errors=True)  # a fresh stub must not pick up an old reload
    try:
        export_artifact(sw.artifact, sw.repo, sw.slot, sw.version, sw.cfg.export, version_label=sw.label)
    except Exception as e:
        raise SwapError(f"{sw.artifact.path}: export failed ({e}); {sw.serving}") from e
    sw.timings["export"] = time.perf_counter() - t0
    try:
        with loading_stub(target, f"/{sw.slot}/{sw.version}/model.py", sw.cfg.nice_loading):
            sw.client.load(sw.slot)
    except Exception as e:
        _safe_unload(sw.client, sw.slot)
        raise SwapError(f"{sw.slot} v{sw.version} ({sw.artifact.path}) refused: {e}; {sw.serving}") from e
    sw.timings["load"] = time.perf_counter() - t0 - sw.timings["export"]


def _try_reload(sw: _Swap, loaded_version: int | None) -> bool:
    """Put the new weights into the standby slot's running stub (kdops.hotreload); False when that slot
    cannot take them in place (not loaded, other config or code, no watcher, no answer in time) and a
    fresh load is needed. Raises SwapError when the stub refuses the artifact."""
    if not sw.cfg.standby or loaded_version is None:
        return False
    rdir = slot_directory(sw.repo, sw.slot)
    try:
        if not (read_acks(rdir) and sw.client.model_ready(sw.slot)
                and reload_compatible(sw.artifact, sw.repo, sw.slot, loaded_version, sw.cfg.export)):
            return False
    except Exception as e:  # unreadable artifact metadata and the like: the fresh load reports it properly
        log.debug("in-place reload of %s not possible: %s", sw.slot, e)
        return False
    t0 = time.perf_counter()
    try:
        rel = stage_reload(sw.artifact, sw.repo, sw.slot, sw.version)
    except Exception as e:
        raise SwapError(f"{sw.artifact.path}: staging failed ({e}); {sw.serving}") from e
    sw.timings["export"] = time.perf_counter() - t0
    write_request(rdir, sw.version, rel, sw.label)
    try:
        wait_for_acks(rdir, sw.version, sw.cfg.reload_timeout_s)
    except RuntimeError as e:  # the stub could not load it: refuse, and leave no half-state behind
        _safe_unload(sw.client, sw.slot)
        shutil.rmtree(rdir, ignore_errors=True)
        raise SwapError(f"{sw.slot} v{sw.version} ({sw.artifact.path}) refused: {e}; {sw.serving}") from e
    except TimeoutError as e:
        log.warning("%s; loading a fresh stub instead", e)
        return False
    sw.timings["load"] = time.perf_counter() - t0 - sw.timings["export"]
    return True


def deploy(target, model: str, artifact_dir: Artifact | str | Path, repo: str | Path | None = None,
           cfg: SwapConfig = SwapConfig()) -> SwapResult:
    """First deployment and every later one are the same operation."""
    return hot_swap(target, model, artifact_dir, repo, cfg, note="deploy")


def rollback(target, model: str, repo: str | Path | None = None, cfg: SwapConfig = SwapConfig(),
             steps: int = 1) -> SwapResult:
    """Serve the artifact that was live ``steps`` swaps ago, by the same hot swap (as a new version)."""
    _, server_repo = client_for(target)
    try:
        src, prev = rollback_source(Path(repo or server_repo or ""), model, steps)
    except LookupError as e:
        raise SwapError(str(e)) from e
    return hot_swap(target, model, src, repo, cfg, note=f"rollback to {prev['label']}")


def serving_status(target, model: str, repo: str | Path | None = None) -> dict:
    """Active slot, version label, history and Triton's view of every slot."""
    client, server_repo = client_for(target)
    state = read_state(Path(repo or server_repo or ""), model)
    names = {model, *slot_names(model)}
    try:
        index = [m for m in client.index() if m.get("name") in names]
    except ServingError as e:
        index = [{"error": str(e)}]
    return {**state, "ready": client.model_ready(model), "triton": index}
