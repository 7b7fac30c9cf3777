"""Export a kdops student (or an HF sequence-classifier teacher) as a Triton Python-backend model.

``<repo>/<model>/config.pbtxt`` is complete (the server runs with ``--disable-auto-complete-config``, which
saves a ~5 s auto-complete stub per load, see serving/README.md) and
``<repo>/<model>/<version>/`` holds ``model.py`` (serving/templates/model.py) plus ``artifact/``, a copy of the
safetensors + JSON + tokenizer files. Pickle files are never copied and never loaded.
"""

from __future__ import annotations

import json
import py_compile
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

from kdops.artifacts import ArtifactError, file_sha256, read_meta

TEMPLATE = Path(__file__).parent / "templates" / "model.py"
# Files an artifact may contain; anything else (a .bin/.pt/.pkl pickle, caches) is left behind.
ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".tiktoken")
WARMUP_TEXTS = ("this movie was good", "a terrible boring plot and a really awful actor")


@dataclass(frozen=True)
class ExportConfig:
    max_batch_size: int = field(default=64, metadata={"help": "Largest batch Triton's dynamic batcher forms."})
    preferred_batch_sizes: tuple[int, ...] = field(
        default=(8, 16, 32, 64), metadata={"help": "Batch sizes the batcher aims for before the delay runs out."})
    max_queue_delay_us: int = field(
        default=2000, metadata={"help": "Longest a request waits for others to join its batch (microseconds)."})
    dynamic_batching: bool = field(default=True, metadata={"help": "Turn the dynamic batcher on (off: one request per execute)."})
    instance_kind: str = field(default="KIND_CPU", metadata={"help": "KIND_CPU or KIND_GPU."})
    instance_count: int = field(default=1, metadata={"help": "Model instances (stub processes) per model."})
    gpus: tuple[int, ...] = field(default=(), metadata={"help": "GPU ids for KIND_GPU (empty: all)."})
    torch_threads: int = field(default=1, metadata={"help": "torch intra-op threads per instance (0: torch default, all cores). One thread per instance, scaled by instance_count: on 2 cores the default 2 threads stalled on any other load (bench/README.md)."})
    max_chars: int = field(default=20_000, metadata={"help": "Longer texts get an error response, not a prediction."})
    warmup: bool = field(default=True, metadata={"help": "Send warm-up requests before the model is marked ready."})
    prediction_log_dir: str = field(default="", metadata={"help": "Directory for the prediction log (empty: off)."})

    def __post_init__(self) -> None:
        if self.instance_kind not in ("KIND_CPU", "KIND_GPU"):
            raise ValueError("instance_kind must be KIND_CPU or KIND_GPU.")
        if self.max_batch_size < 1 or self.instance_count < 1 or self.max_queue_delay_us < 0:
            raise ValueError("max_batch_size and instance_count must be >= 1, max_queue_delay_us >= 0.")
        if any(p < 1 or p > self.max_batch_size for p in self.preferred_batch_sizes):
            raise ValueError("preferred_batch_sizes must lie in [1, max_batch_size].")


def _string_warmup_file(texts) -> bytes:
    # Triton's raw format for TYPE_STRING warm-up data: each element is a 4-byte little-endian length + bytes.
    return b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)


def _params(params: dict[str, str]) -> str:
    return "\n".join(f'parameters {{ key: "{k}" value {{ string_value: {json.dumps(str(v))} }} }}'
                     for k, v in params.items())


def model_config(name: str, cfg: ExportConfig, num_labels: int, kind: str, params: dict[str, str]) -> str:
    """The full config.pbtxt text of a Python-backend model (student: probabilities; teacher: logits)."""
    scores = "PROBABILITIES" if kind == "student" else "LOGITS"
    outputs = [f'{{ name: "{scores}" data_type: TYPE_FP32 dims: [ {num_labels} ] }}',
               '{ name: "LABEL" data_type: TYPE_STRING dims: [ 1 ] }']
    if kind == "student":
        outputs.append('{ name: "MODEL_VERSION" data_type: TYPE_STRING dims: [ 1 ] }')
    gpus = f" gpus: [ {', '.join(map(str, cfg.gpus))} ]" if cfg.gpus and cfg.instance_kind == "KIND_GPU" else ""
    batching = ""
    if cfg.dynamic_batching:
        batching = (f"dynamic_batching {{ preferred_batch_size: [ {', '.join(map(str, cfg.preferred_batch_sizes))} ]"
                    f" max_queue_delay_microseconds: {cfg.max_queue_delay_us} }}")
    warmup = ""
    if cfg.warmup:
        # One single-text and one two-text batch: the first real requests then meet a warm model
        # (tokenizer caches, allocator, first-call overheads); a failing warm-up fails the load.
        warmup = "\n".join(
            f'model_warmup [{{ name: "warmup_{n}" batch_size: {n} inputs {{ key: "TEXT" value {{ '
            f'data_type: TYPE_STRING dims: [ 1 ] input_data_file: "text" }} }} }}]' for n in (1, 2))
    return "\n".join(x for x in [
        f'name: "{name}"', 'backend: "python"', f"max_batch_size: {cfg.max_batch_size}",
        'input [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]',
        "output [ " + ", ".join(outputs) + " ]",
        f"instance_group [ {{ count: {cfg.instance_count} kind: {cfg.instance_kind}{gpus} }} ]",
        batching, warmup, _params({"kdops_kind": kind, **params}),
    ] if x) + "\n"


def _copy_artifact(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        if p.is_file() and p.suffix in ALLOWED_SUFFIXES:
            shutil.copy2(p, dst / p.name)


def _write_model(repo: Path, name: str, version: int, src: Path, text: str) -> Path:
    model_dir = repo / name
    vdir = model_dir / str(version)
    if vdir.exists():
        shutil.rmtree(vdir)
    vdir.mkdir(parents=True)
    shutil.copy2(TEMPLATE, vdir / "model.py")
    # Why: the stub's import would write __pycache__/ into the version dir, which changes its mtime; Triton
    # then sees the slot as modified and re-loads it (a new stub, seconds of CPU) whenever the ensemble
    # in front of it is re-loaded. Compiling here makes that import write nothing (measured, README).
    py_compile.compile(str(vdir / "model.py"), doraise=True)
    _copy_artifact(src, vdir / "artifact")
    warm = model_dir / "warmup"
    warm.mkdir(exist_ok=True)
    (warm / "text").write_bytes(_string_warmup_file(WARMUP_TEXTS[:1]))
    tmp = model_dir / "config.pbtxt.tmp"
    tmp.write_text(text)
    tmp.replace(model_dir / "config.pbtxt")  # atomic: a concurrent load never reads half a config
    return vdir


def student_version_label(artifact_dir: str | Path, version: int) -> str:
    """What MODEL_VERSION returns: the Triton version and the first 8 hex of the weights' SHA-256."""
    meta = read_meta(artifact_dir)
    sha = meta.weights_sha256 or file_sha256(Path(artifact_dir) / "model.safetensors")
    return f"{version}-{sha[:8]}"


def export_student(artifact_dir: str | Path, repo: str | Path, name: str, version: int = 1,
                   cfg: ExportConfig = ExportConfig(), version_label: str | None = None) -> Path:
    """Write ``<repo>/<name>/<version>/`` for a student artifact; return the version directory.

    The artifact is checked (metadata readable, weights present) before anything is written; its
    integrity (checksum, shapes) is checked again by ``load_student`` inside the server at load time.
    """
    src = Path(artifact_dir)
    meta = read_meta(src)  # raises ArtifactError for a non-student directory
    if not (src / "model.safetensors").is_file():
        raise ArtifactError(f"{src}: model.safetensors missing.")
    label = version_label or student_version_label(src, version)
    params = {"kdops_version": label, "kdops_max_chars": cfg.max_chars, "kdops_torch_threads": cfg.torch_threads,
              "kdops_label_names": json.dumps(meta.label_names)}
    if cfg.prediction_log_dir:
        params["kdops_prediction_log_dir"] = str(Path(cfg.prediction_log_dir).resolve())
    text = model_config(name, cfg, len(meta.label_names), "student", params)
    return _write_model(Path(repo), name, version, src, text)


def export_teacher(hf_dir: str | Path, repo: str | Path, name: str, version: int = 1,
                   cfg: ExportConfig = ExportConfig()) -> Path:
    """Export a transformers sequence classifier saved with safetensors (``save_pretrained``)."""
    from kdops.teacher import directory_id

    src = Path(hf_dir)
    if not (src / "model.safetensors").is_file():
        raise ArtifactError(f"{src}: a teacher must be saved as model.safetensors (pickle weights are refused).")
    try:
        hf = json.loads((src / "config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{src}/config.json unusable ({e}).") from e
    id2label = hf.get("id2label") or {str(i): f"LABEL_{i}" for i in range(int(hf.get("num_labels", 2)))}
    labels = [id2label[str(i)] for i in range(len(id2label))]
    params = {"kdops_version": str(version), "kdops_max_chars": cfg.max_chars,
              "kdops_torch_threads": cfg.torch_threads, "kdops_label_names": json.dumps(labels),
              "kdops_teacher_id": directory_id(src)}
    text = model_config(name, cfg, len(labels), "teacher", params)
    return _write_model(Path(repo), name, version, src, text)


def ensemble_config(name: str, target: str, num_labels: int, max_batch_size: int) -> str:
    """A one-step ensemble: the stable name clients call, forwarding to the active slot model.

    Re-pointing it is a reload of a backend-less model (no stub process, milliseconds), which is what
    makes the switch itself stall-free; see serving/swap.py.
    """
    io = {"TEXT": "TEXT", "PROBABILITIES": "PROBABILITIES", "LABEL": "LABEL", "MODEL_VERSION": "MODEL_VERSION"}
    maps = "".join(f' {"input_map" if k == "TEXT" else "output_map"} {{ key: "{k}" value: "{v}" }}'
                   for k, v in io.items())
    return (f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {max_batch_size}\n'
            'input [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]\n'
            f'output [ {{ name: "PROBABILITIES" data_type: TYPE_FP32 dims: [ {num_labels} ] }}, '
            '{ name: "LABEL" data_type: TYPE_STRING dims: [ 1 ] }, '
            '{ name: "MODEL_VERSION" data_type: TYPE_STRING dims: [ 1 ] } ]\n'
            f'ensemble_scheduling {{ step [ {{ model_name: "{target}" model_version: -1{maps} }} ] }}\n')


def write_ensemble(repo: str | Path, name: str, target: str, num_labels: int, max_batch_size: int) -> Path:
    model_dir = Path(repo) / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)  # an ensemble still needs a version folder
    tmp = model_dir / "config.pbtxt.tmp"
    tmp.write_text(ensemble_config(name, target, num_labels, max_batch_size))
    tmp.replace(model_dir / "config.pbtxt")
    return model_dir
