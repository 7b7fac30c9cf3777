"""Where kdops keeps its state. Nothing is created on import: callers ask for a directory and get it."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def home() -> Path:
    """The kdops data directory: ``$KDOPS_HOME`` or ``./.kdops`` (created on first use)."""
    root = Path(os.environ.get("KDOPS_HOME", ".kdops")).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def subdir(name: str, root: Path | None = None) -> Path:
    """A named sub-directory of the data directory (``snapshots``, ``teachers``, ``students`` ...)."""
    path = (root or home()) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_dir(directory: str | Path) -> Iterator[Path]:
    """Build a directory atomically: write into the fresh sibling ``<name>.partial`` this yields; when the block
    ends it replaces ``directory``, and if the block raises it is removed. A crash never leaves a half-written
    model under the real name (which is what the caches and loaders test for)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
