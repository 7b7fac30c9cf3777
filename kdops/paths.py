"""Where kdops keeps its state. Nothing is created on import: callers ask for a directory and get it."""

from __future__ import annotations

import os
from pathlib import Path


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
