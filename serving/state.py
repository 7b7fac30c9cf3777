"""What a served model's swaps keep on disk: the serving state (active slot, version, history), the swap
lock, and the archive of served artifacts a rollback reads.

Beside the model folders, never in one: Triton treats every directory of its repository as a model.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

from kdops.paths import atomic_dir, atomic_write


def slot_names(model: str) -> tuple[str, str]:
    return f"{model}__s0", f"{model}__s1"


def _state_path(repo: Path, model: str) -> Path:
    # A file at the repository root: Triton only treats directories as models.
    return Path(repo) / f"{model}.kdops-serving.json"


def read_state(repo: str | Path, model: str) -> dict:
    p = _state_path(Path(repo), model)
    return json.loads(p.read_text()) if p.exists() else {"model": model, "active_slot": None, "version": 0,
                                                          "label": None, "history": []}


def write_state(repo: str | Path, model: str, state: dict) -> None:
    atomic_write(_state_path(Path(repo), model), state)


@contextmanager
def swap_lock(repo: Path, model: str):
    """One swap per model at a time, across processes (a CLI swap and a flow, say)."""
    with open(Path(repo) / f".{model}.swap.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def archive_dir(repo: Path, model: str) -> Path:
    repo = Path(repo)
    return repo.parent / f"{repo.name}.archive" / model


# What an artifact directory may hold that is not the artifact: kdops.paths.atomic_dir temporaries of a write
# in progress (``<name>.partial-<pid>-<id>``) and caches.
_NOT_ARTIFACT = shutil.ignore_patterns("*.partial-*", "*.partial", "__pycache__")


def archive(repo: Path, model: str, version: int, artifact_dir: Path, keep: int) -> Path:
    """Keep a copy of each served artifact so a rollback does not depend on the source still existing; the
    ``keep`` newest stay. Written whole or not at all (a crash mid-copy leaves no half artifact to roll back to)."""
    root = archive_dir(repo, model)
    dst = root / str(version)
    if not dst.exists():
        with atomic_dir(dst) as tmp:
            shutil.copytree(artifact_dir, tmp, ignore=_NOT_ARTIFACT, dirs_exist_ok=True)
    kept = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True)
    for v in kept[keep:]:
        shutil.rmtree(root / str(v), ignore_errors=True)
    return dst


def rollback_source(repo: Path, model: str, steps: int) -> tuple[Path, dict]:
    """The artifact that was live ``steps`` swaps ago (its archived copy, else where it was swapped in from) and
    its history entry; LookupError says why there is none."""
    history = read_state(repo, model)["history"]
    if len(history) <= steps:
        raise LookupError(f"{model}: no version {steps} swap(s) back to roll back to")
    prev = history[-1 - steps]
    for src in (archive_dir(repo, model) / str(prev["version"]), Path(prev["artifact"])):
        if src.exists():
            return src, prev
    raise LookupError(f"{model}: the artifact of {prev['label']} is gone (archive and {prev['artifact']})")
