"""Export a kdops student (classifier or causal LM) or an HF sequence-classifier teacher as a Triton Python-backend model.

``<repo>/<model>/config.pbtxt`` is complete (the server runs with ``--disable-auto-complete-config``, which
saves a ~5 s auto-complete stub per load, see serving/README.md) and
``<repo>/<model>/<version>/`` holds ``model.py`` (serving/templates/model.py, or lm_model.py for a
generation model) plus ``artifact/``, a copy of the
safetensors + JSON + tokenizer files. Pickle files are never copied and never loaded.
"""

from __future__ import annotations

import json
import py_compile
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

from kdops.artifacts import ArtifactError, file_sha256, read_meta

TEMPLATE = Path(__file__).parent / "templates" / "model.py"
LM_TEMPLATE = Path(__file__).parent / "templates" / "lm_model.py"
LM_TEACHER_TEMPLATE = Path(__file__).parent / "templates" / "lm_teacher_model.py"
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
    dlpack_outputs: bool = field(default=False, metadata={"help": "Classifiers: return probabilities through DLPack even on CPU with numpy 1 (on a GPU or with numpy 2 they always are): lets a CPU run exercise the GPU container's output path."})
    max_new_tokens: int = field(default=256, metadata={"help": "Generation models: the most new tokens a request may ask for."})
    default_max_tokens: int = field(default=32, metadata={"help": "Generation models: new tokens when a request sends no MAX_TOKENS."})
    max_prompt_tokens: int = field(default=256, metadata={"help": "Generation models: longer prompts keep their last tokens."})
    streaming: bool = field(default=False, metadata={"help": "Generation models: a decoupled model that streams text as it is generated (clients: gRPC streams, ServingClient.generate_stream, or HTTP generate_stream); ServingClient.generate reads either kind."})

    def __post_init__(self) -> None:
        if self.instance_kind not in ("KIND_CPU", "KIND_GPU"):
            raise ValueError("instance_kind must be KIND_CPU or KIND_GPU.")
        if self.max_batch_size < 1 or self.instance_count < 1 or self.max_queue_delay_us < 0:
            raise ValueError("max_batch_size and instance_count must be >= 1, max_queue_delay_us >= 0.")
        if not 0 <= self.default_max_tokens <= self.max_new_tokens or self.max_prompt_tokens < 2:
            raise ValueError("need 0 <= default_max_tokens <= max_new_tokens and max_prompt_tokens >= 2.")
        if any(p < 1 or p > self.max_batch_size for p in self.preferred_batch_sizes):
            raise ValueError("preferred_batch_sizes must lie in [1, max_batch_size].")


def _string_warmup_file(texts) -> bytes:
    # Triton's raw format for TYPE_STRING warm-up data: each element is a 4-byte little-endian length + bytes.
    return b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)


def _params(params: dict[str, str]) -> str:
    return "\n".join(f'parameters {{ key: "{k}" value {{ string_value: {json.dumps(str(v))} }} }}'
                     for k, v in params.items())


def _tensor(name: str, dtype: str, dims: int | str = 1, optional: bool = False) -> str:
    opt = " optional: true" if optional else ""
    return f'{{ name: "{name}" data_type: {dtype} dims: [ {dims} ]{opt} }}'


@dataclass(frozen=True)
class ModelIO:
    """The tensors of a served kind: inputs (name, dtype, optional), outputs (name, dtype, dims)."""

    inputs: tuple[tuple[str, str, bool], ...]
    outputs: tuple[tuple[str, str, int], ...]
    warmup: tuple[tuple[str, str, str], ...]  # (input, dtype, warm-up file in <model>/warmup/)

    def pbtxt(self) -> str:
        ins = ", ".join(_tensor(n, d, optional=o) for n, d, o in self.inputs)
        outs = ", ".join(_tensor(n, d, k) for n, d, k in self.outputs)
        return f"input [ {ins} ]\noutput [ {outs} ]"


def classifier_io(num_labels: int, kind: str = "student") -> ModelIO:
    scores = "PROBABILITIES" if kind == "student" else "LOGITS"
    outs = ((scores, "TYPE_FP32", num_labels), ("LABEL", "TYPE_STRING", 1))
    if kind == "student":
        outs += (("MODEL_VERSION", "TYPE_STRING", 1),)
    return ModelIO((("TEXT", "TYPE_STRING", False),), outs, (("TEXT", "TYPE_STRING", "text"),))


# Generation: a prompt in, the continuation out; token budget and temperature are optional per request.
LM_IO = ModelIO(
    (("PROMPT", "TYPE_STRING", False), ("MAX_TOKENS", "TYPE_INT32", True), ("TEMPERATURE", "TYPE_FP32", True)),
    (("COMPLETION", "TYPE_STRING", 1), ("TOKENS", "TYPE_INT32", 1), ("MODEL_VERSION", "TYPE_STRING", 1)),
    (("PROMPT", "TYPE_STRING", "text"), ("MAX_TOKENS", "TYPE_INT32", "max_tokens")),
)


DECOUPLED = "model_transaction_policy { decoupled: true }"


def model_config(name: str, cfg: ExportConfig, io: ModelIO, params: dict[str, str], decoupled: bool = False) -> str:
    """The full config.pbtxt text of a Python-backend model."""
    gpus = f" gpus: [ {', '.join(map(str, cfg.gpus))} ]" if cfg.gpus and cfg.instance_kind == "KIND_GPU" else ""
    batching = ""
    if cfg.dynamic_batching:
        batching = (f"dynamic_batching {{ preferred_batch_size: [ {', '.join(map(str, cfg.preferred_batch_sizes))} ]"
                    f" max_queue_delay_microseconds: {cfg.max_queue_delay_us} }}")
    warmup = ""
    if cfg.warmup:
        # One single-row and one two-row batch: the first real requests then meet a warm model
        # (tokenizer caches, allocator, first-call overheads); a failing warm-up fails the load.
        warmup = "\n".join(
            f'model_warmup [{{ name: "warmup_{n}" batch_size: {n} '
            + " ".join(f'inputs {{ key: "{i}" value {{ data_type: {d} dims: [ 1 ] input_data_file: "{f}" }} }}'
                       for i, d, f in io.warmup) + " }]" for n in (1, 2))
    return "\n".join(x for x in [
        f'name: "{name}"', 'backend: "python"', f"max_batch_size: {cfg.max_batch_size}", io.pbtxt(),
        f"instance_group [ {{ count: {cfg.instance_count} kind: {cfg.instance_kind}{gpus} }} ]",
        DECOUPLED if decoupled else "", batching, warmup, _params(params),
    ] if x) + "\n"


def _copy_artifact(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        if p.is_file() and p.suffix in ALLOWED_SUFFIXES:
            shutil.copy2(p, dst / p.name)


def _write_model(repo: Path, name: str, version: int, src: Path, text: str, template: Path = TEMPLATE) -> Path:
    model_dir = repo / name
    vdir = model_dir / str(version)
    if vdir.exists():
        shutil.rmtree(vdir)
    vdir.mkdir(parents=True)
    shutil.copy2(template, vdir / "model.py")
    # Why: the stub's import would write __pycache__/ into the version dir, which changes its mtime; Triton
    # then sees the slot as modified and re-loads it (a new stub, seconds of CPU) whenever the ensemble
    # in front of it is re-loaded. Compiling here makes that import write nothing (measured, README).
    py_compile.compile(str(vdir / "model.py"), doraise=True)
    _copy_artifact(src, vdir / "artifact")
    warm = model_dir / "warmup"
    warm.mkdir(exist_ok=True)
    (warm / "text").write_bytes(_string_warmup_file(WARMUP_TEXTS[:1]))
    (warm / "max_tokens").write_bytes(struct.pack("<i", 4))  # generation models: a 4-token warm-up
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
    if meta.kind != "classifier":
        raise ArtifactError(f"{src}: a {meta.kind} student; export it with export_lm_student (or export_artifact).")
    if not (src / "model.safetensors").is_file():
        raise ArtifactError(f"{src}: model.safetensors missing.")
    return _write_model(Path(repo), name, version, src, _student_config(src, name, version, cfg, version_label))


def _student_config(src: Path, name: str, version: int, cfg: ExportConfig, version_label: str | None) -> str:
    meta = read_meta(src)
    label = version_label or student_version_label(src, version)
    params = {"kdops_version": label, "kdops_max_chars": cfg.max_chars, "kdops_torch_threads": cfg.torch_threads,
              "kdops_label_names": json.dumps(meta.label_names)}
    if cfg.dlpack_outputs:
        params["kdops_dlpack_outputs"] = "1"
    if cfg.prediction_log_dir:
        params["kdops_prediction_log_dir"] = str(Path(cfg.prediction_log_dir).resolve())
    return model_config(name, cfg, classifier_io(len(meta.label_names)), {"kdops_kind": "student", **params})


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
    text = model_config(name, cfg, classifier_io(len(labels), "teacher"), {"kdops_kind": "teacher", **params})
    return _write_model(Path(repo), name, version, src, text)


def artifact_kind(artifact_dir: str | Path) -> str:
    """``classifier`` or ``causal-lm``, from the artifact's kdops.json (ArtifactError if there is none)."""
    path = Path(artifact_dir) / "kdops.json"
    try:
        kind = json.loads(path.read_text()).get("kind", "classifier")
    except FileNotFoundError as e:
        raise ArtifactError(f"{artifact_dir}: not a kdops artifact (kdops.json missing).") from e
    except (json.JSONDecodeError, AttributeError) as e:
        raise ArtifactError(f"{path} is not a JSON object ({e}).") from e
    return "causal-lm" if kind == "causal-lm" else "classifier"


def lm_version_label(artifact_dir: str | Path, version: int) -> str:
    """MODEL_VERSION of a generation model: the Triton version and the first 8 hex of the weights' SHA-256."""
    meta = json.loads((Path(artifact_dir) / "kdops.json").read_text())
    sha = meta.get("sha256", {}).get("model.safetensors") or file_sha256(Path(artifact_dir) / "model.safetensors")
    return f"{version}-{sha[:8]}"


def export_lm_student(artifact_dir: str | Path, repo: str | Path, name: str, version: int = 1,
                      cfg: ExportConfig = ExportConfig(), version_label: str | None = None) -> Path:
    """Write ``<repo>/<name>/<version>/`` for a causal-LM student (kdops.lm.student.save_lm_student)."""
    src = Path(artifact_dir)
    if artifact_kind(src) != "causal-lm":
        raise ArtifactError(f"{src}: not a causal-LM student (kdops.json kind).")
    if not (src / "model.safetensors").is_file():
        raise ArtifactError(f"{src}: model.safetensors missing.")
    return _write_model(Path(repo), name, version, src, _lm_student_config(src, name, version, cfg, version_label),
                        LM_TEMPLATE)


def _lm_student_config(src: Path, name: str, version: int, cfg: ExportConfig, version_label: str | None) -> str:
    params = {"kdops_kind": "causal-lm", "kdops_version": version_label or lm_version_label(src, version),
              "kdops_max_chars": cfg.max_chars, "kdops_torch_threads": cfg.torch_threads,
              "kdops_max_new_tokens": cfg.max_new_tokens, "kdops_default_max_tokens": cfg.default_max_tokens,
              "kdops_max_prompt_tokens": cfg.max_prompt_tokens}
    if cfg.prediction_log_dir:
        params["kdops_prediction_log_dir"] = str(Path(cfg.prediction_log_dir).resolve())
    return model_config(name, cfg, LM_IO, params, decoupled=cfg.streaming)


def export_lm_teacher(hf_dir: str | Path, repo: str | Path, name: str, version: int = 1,
                      cfg: ExportConfig = ExportConfig()) -> Path:
    """Export a local causal LM (safetensors + tokenizer) as a remote LM teacher: token ids in, top-k next-token
    log-probs (or greedy continuations) out. The client pads and batches itself (``max_batch_size: 0``):
    sequences of one distillation batch have different lengths, which Triton's batcher would not merge."""
    from transformers import AutoConfig, AutoTokenizer

    from kdops.lm.teacher import start_token_id
    from kdops.teacher import directory_id

    src = Path(hf_dir)
    if not (src / "model.safetensors").is_file():
        raise ArtifactError(f"{src}: an LM teacher must be saved as model.safetensors (pickle weights are refused).")
    try:  # config and tokenizer only: the weights are read once, by the server
        config, tok = AutoConfig.from_pretrained(str(src)), AutoTokenizer.from_pretrained(str(src))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{src}: config or tokenizer unusable ({e}).") from e
    start = start_token_id(config, tok)
    params = {"kdops_kind": "lm-teacher", "kdops_teacher_id": directory_id(src), "kdops_vocab_size": int(config.vocab_size),
              "kdops_start_id": start, "kdops_pad_id": start if tok.pad_token_id is None else tok.pad_token_id,
              "kdops_eos_id": -1 if tok.eos_token_id is None else tok.eos_token_id, "kdops_torch_threads": cfg.torch_threads}
    gpus = f" gpus: [ {', '.join(map(str, cfg.gpus))} ]" if cfg.gpus and cfg.instance_kind == "KIND_GPU" else ""
    ins = ", ".join([_tensor("IDS", "TYPE_INT64", "-1, -1"), _tensor("LENGTHS", "TYPE_INT64", "-1"),
                     _tensor("K", "TYPE_INT32", 1), _tensor("MAX_NEW_TOKENS", "TYPE_INT32", 1)])
    outs = ", ".join([_tensor("TOPK_IDS", "TYPE_INT32", "-1, -1, -1"), _tensor("TOPK_LOGPROBS", "TYPE_FP32", "-1, -1, -1"),
                      _tensor("GENERATED", "TYPE_INT64", "-1, -1")])
    text = "\n".join([f'name: "{name}"', 'backend: "python"', "max_batch_size: 0", f"input [ {ins} ]", f"output [ {outs} ]",
                      f"instance_group [ {{ count: {cfg.instance_count} kind: {cfg.instance_kind}{gpus} }} ]",
                      _params(params)]) + "\n"
    return _write_model(Path(repo), name, version, src, text, LM_TEACHER_TEMPLATE)


def version_label(artifact_dir: str | Path, version: int) -> str:
    """MODEL_VERSION for either kind of artifact."""
    if artifact_kind(artifact_dir) == "causal-lm":
        return lm_version_label(artifact_dir, version)
    return student_version_label(artifact_dir, version)


def export_artifact(artifact_dir: str | Path, repo: str | Path, name: str, version: int = 1,
                    cfg: ExportConfig = ExportConfig(), version_label: str | None = None) -> Path:
    """Export a classifier student or a causal-LM student, whichever ``artifact_dir`` holds."""
    fn = export_lm_student if artifact_kind(artifact_dir) == "causal-lm" else export_student
    return fn(artifact_dir, repo, name, version, cfg, version_label)


def reload_compatible(artifact_dir: str | Path, repo: str | Path, name: str, loaded_version: int,
                      cfg: ExportConfig = ExportConfig()) -> bool:
    """Whether the running ``<repo>/<name>`` (Triton version ``loaded_version``) can take ``artifact_dir``'s
    weights in place: the config an export would write now and the one it runs differ at most in the
    version label, and its model.py is today's template. Anything else (other labels, batching,
    limits, code) needs a fresh load."""
    src, model_dir = Path(artifact_dir), Path(repo) / name
    if artifact_kind(src) == "causal-lm":
        text, template = _lm_student_config(src, name, 0, cfg, "-"), LM_TEMPLATE
    else:
        text, template = _student_config(src, name, 0, cfg, "-"), TEMPLATE
    try:
        running = (model_dir / "config.pbtxt").read_text()
        code = (model_dir / str(loaded_version) / "model.py").read_bytes()
    except OSError:
        return False
    unversioned = re.compile(r'(key: "kdops_version" value \{ string_value: )"[^"]*"')
    return unversioned.sub(r"\1-", running) == unversioned.sub(r"\1-", text) and code == template.read_bytes()


def stage_reload(artifact_dir: str | Path, repo: str | Path, name: str, version: int) -> str:
    """Copy an artifact where ``<repo>/<name>``'s reload watcher reads it (kdops.hotreload); return its path
    relative to the watcher's directory. Older staged copies are removed (the running ones hold their
    weights in memory)."""
    from kdops.hotreload import slot_directory

    rdir = slot_directory(repo, name)
    rdir.mkdir(parents=True, exist_ok=True)
    for d in rdir.iterdir():
        if d.is_dir() and d.name.isdigit():
            shutil.rmtree(d)
    _copy_artifact(Path(artifact_dir), rdir / str(version) / "artifact")
    return f"{version}/artifact"


def ensemble_config(name: str, target: str, io: ModelIO, max_batch_size: int, decoupled: bool = False) -> str:
    """A one-step ensemble: the stable name clients call, forwarding to the active slot model.

    Re-pointing it is a reload of a backend-less model (no stub process, milliseconds), which is what
    makes the switch itself stall-free; see serving/swap.py.
    """
    maps = "".join(f' input_map {{ key: "{n}" value: "{n}" }}' for n, _, _ in io.inputs)
    maps += "".join(f' output_map {{ key: "{n}" value: "{n}" }}' for n, _, _ in io.outputs)
    policy = f"{DECOUPLED}\n" if decoupled else ""
    return (f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {max_batch_size}\n{io.pbtxt()}\n{policy}'
            f'ensemble_scheduling {{ step [ {{ model_name: "{target}" model_version: -1{maps} }} ] }}\n')


def write_ensemble(repo: str | Path, name: str, target: str, io: ModelIO, max_batch_size: int,
                   decoupled: bool = False) -> Path:
    model_dir = Path(repo) / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)  # an ensemble still needs a version folder
    tmp = model_dir / "config.pbtxt.tmp"
    tmp.write_text(ensemble_config(name, target, io, max_batch_size, decoupled))
    tmp.replace(model_dir / "config.pbtxt")
    return model_dir
