"""Where kdops keeps its state. Nothing is created on import: callers ask for a directory and get it.

``Home`` names every path under ``$KDOPS_HOME`` once, so no caller rebuilds ``Path(home) / "..."`` strings;
``atomic_write`` and ``atomic_dir`` are the one way a file or a directory is replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Home:
    """Every path under one kdops data directory. Properties name paths; nothing is created until written."""

    root: Path

    @classmethod
    def from_env(cls) -> "Home":
        return cls(home())

    @classmethod
    def at(cls, root: str | Path) -> "Home":
        return cls(Path(root).expanduser().resolve())

    def __str__(self) -> str:
        return str(self.root)

    # data and caches
    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def soft_labels(self) -> Path:
        """The classifier teachers' logits cache (SQLite), per (teacher id, text hash)."""
        return self.root / "soft_labels.sqlite"

    @property
    def lm_soft_labels(self) -> Path:
        """The causal-LM teachers' top-k and generations cache (SQLite), per (teacher id, sequence)."""
        return self.root / "lm_soft_labels.sqlite"

    @property
    def api_answers(self) -> Path:
        """API teachers' answers (SQLite), per (base URL, model, prompt template, input), and their spend."""
        return self.root / "api_answers.sqlite"

    @property
    def replay(self) -> Path:
        return self.root / "replay"

    @property
    def teachers(self) -> Path:
        return self.root / "teachers"

    def students(self, kind_dir: str = "students") -> Path:
        """Where a kind's round artifacts go (``students``, ``lm_students``), one directory per round key."""
        return self.root / kind_dir

    def checkpoints(self, key: str) -> Path:
        return self.root / "checkpoints" / key

    # servers and stores
    @property
    def mlflow(self) -> Path:
        return self.root / "mlflow"

    @property
    def tracking_uri(self) -> str:
        """``$MLFLOW_TRACKING_URI``, else the embedded SQLite store under this home."""
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.mlflow / 'mlflow.db'}"

    def downloads(self, model: str, version: int) -> Path:
        return self.mlflow / "downloads" / model / f"v{version}"

    @property
    def prefect(self) -> Path:
        return self.root / "prefect"

    @property
    def triton(self) -> Path:
        return self.root / "triton"

    @property
    def triton_repo(self) -> Path:
        return self.root / "triton-repo"

    def predictions(self, suffix: str = "") -> Path:
        return self.root / f"predictions{suffix}"

    # the loop
    @property
    def monitoring(self) -> Path:
        return self.root / "monitoring"

    @property
    def review_db(self) -> Path:
        return self.root / "review.sqlite"

    def loop_state(self, model: str) -> Path:
        """What the monitor remembers about one served model (champion seen, time checked up to, round started)."""
        return self.root / "loop" / model / "state.json"

    def reference(self, model: str, version: int) -> Path:
        """A champion's cached monitoring reference profile (versions are numbered per registered model)."""
        return self.root / "loop" / "reference" / model / f"v{version}"

    @property
    def sources(self) -> Path:
        """Watched-directory ingestion: files seen, snapshots queued for the next scheduled round, the last round."""
        return self.root / "sources"

    @property
    def service(self) -> Path:
        """What a running ``kdops up`` announces (its Prefect API, its pid), for ``kdops status``."""
        return self.root / "up.json"

    @property
    def demo(self) -> Path:
        return self.root / "demo"


def atomic_write(path: str | Path, data: str | bytes | dict | list) -> Path:
    """Replace ``path`` with ``data`` (text, bytes, or a JSON value) through a unique temporary sibling: a
    reader or a crash never sees half a file, and two writers never share a temporary name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, (dict, list)):
        data = json.dumps(data, indent=2, default=str)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks (model weights and data files can be large)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: str | Path, default=None):
    """A JSON file's value, or ``default`` when the file does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else default


@contextmanager
def atomic_dir(directory: str | Path) -> Iterator[Path]:
    """Build a directory atomically: write into a fresh, unique sibling ``<name>.partial-<id>`` this yields;
    when the block ends it replaces ``directory``, and if the block raises it is removed. A crash never leaves
    a half-written model under the real name, and two processes never write into the same temporary."""
    directory = Path(directory)
    tmp = directory.with_name(f"{directory.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
