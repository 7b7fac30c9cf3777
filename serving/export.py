"""Export a kdops artifact (any kind) or a teacher as a Triton Python-backend model.

``<repo>/<model>/config.pbtxt`` is complete (the server runs with ``--disable-auto-complete-config``, which
saves a ~5 s auto-complete stub per load, see serving/README.md) and ``<repo>/<model>/<version>/`` holds
``model.py`` (a template from serving/templates/) plus ``artifact/``, a copy of the safetensors + JSON +
tokenizer files. Pickle files are never copied and never loaded.

What an artifact is served as (template, tensors, warm-up, kind-specific parameters) is its kind's
``ServingSpec`` and ``serving_params`` (``kdops.kinds``): nothing here asks which kind it is.
"""

from __future__ import annotations

import json
import py_compile
import re
import shutil
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

from kdops import kinds
from kdops.artifacts import WEIGHTS, Artifact, ArtifactError, file_sha256
from kdops.kinds import ServingSpec, Tensor
from kdops.paths import atomic_write

TEMPLATES = Path(__file__).parent / "templates"
# Files an artifact may contain; anything else (a .bin/.pt/.pkl pickle, caches) is left behind.
ALLOWED_SUFFIXES = (".safetensors", ".onnx", ".json", ".txt", ".model", ".tiktoken")
WARMUP_TEXTS = ("this movie was good", "a terrible boring plot and a really awful actor")

# A transformers sequence classifier serving soft labels: text in, logits out.
TEACHER_SPEC = ServingSpec(
    template="teacher_model.py", inputs=(Tensor("TEXT", "TYPE_STRING"),),
    outputs=(Tensor("LOGITS", "TYPE_FP32", 0), Tensor("LABEL", "TYPE_STRING")),
    warmup=(("TEXT", "TYPE_STRING", WARMUP_TEXTS[0]),))
# A causal-LM teacher: right-padded token ids in, top-k next-token log-probs or greedy continuations out.
LM_TEACHER_SPEC = ServingSpec(
    template="lm_teacher_model.py",
    inputs=(Tensor("IDS", "TYPE_INT64", (-1, -1)), Tensor("LENGTHS", "TYPE_INT64", (-1,)), Tensor("K", "TYPE_INT32"),
            Tensor("MAX_NEW_TOKENS", "TYPE_INT32")),
    outputs=(Tensor("TOPK_IDS", "TYPE_INT32", (-1, -1, -1)), Tensor("TOPK_LOGPROBS", "TYPE_FP32", (-1, -1, -1)),
             Tensor("TOKEN_LOGPROBS", "TYPE_FP32", (-1, -1)), Tensor("GENERATED", "TYPE_INT64", (-1, -1))),
    warmup=())


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
    prediction_log_max_mb: int = field(default=1024, metadata={"help": "The prediction log's size limit: older shards are removed past it (0: no limit)."})
    prediction_log_max_days: float = field(default=30.0, metadata={"help": "Shards older than this are removed (0: kept)."})
    prediction_log_redact: bool = field(default=False, metadata={"help": "Log each text's SHA-256 instead of the text (text-based drift checks then have nothing to read)."})
    dlpack_outputs: bool = field(default=False, metadata={"help": "Return float outputs through DLPack even on CPU with numpy 1 (on a GPU or with numpy 2 they always are): lets a CPU run exercise the GPU container's output path."})
    max_new_tokens: int = field(default=256, metadata={"help": "Generation models: the most new tokens a request may ask for."})
    default_max_tokens: int = field(default=32, metadata={"help": "Generation models: new tokens when a request sends no MAX_TOKENS."})
    max_prompt_tokens: int = field(default=256, metadata={"help": "Generation models: longer prompts keep their last tokens."})
    runtime: str = field(default="auto", metadata={"help": "auto: a CPU model whose artifact has ONNX graphs runs them (ONNX Runtime, INT8 where its gate passed, no torch in the stub); torch: always the torch student."})
    onnx_threads: int = field(default=1, metadata={"help": "ONNX Runtime intra-op threads per instance, scaled by instance_count as torch_threads is."})
    streaming: bool = field(default=False, metadata={"help": "Generation models: a decoupled model that streams text as it is generated (clients: gRPC streams, ServingClient.generate_stream, or HTTP generate_stream); ServingClient.generate reads either kind."})

    def __post_init__(self) -> None:
        if self.instance_kind not in ("KIND_CPU", "KIND_GPU"):
            raise ValueError("instance_kind must be KIND_CPU or KIND_GPU.")
        if self.max_batch_size < 1 or self.instance_count < 1 or self.max_queue_delay_us < 0:
            raise ValueError("max_batch_size and instance_count must be >= 1, max_queue_delay_us >= 0.")
        if not 0 <= self.default_max_tokens <= self.max_new_tokens or self.max_prompt_tokens < 2:
            raise ValueError("need 0 <= default_max_tokens <= max_new_tokens and max_prompt_tokens >= 2.")
        if self.runtime not in ("auto", "torch"):
            raise ValueError("runtime must be auto or torch.")
        if any(p < 1 or p > self.max_batch_size for p in self.preferred_batch_sizes):
            raise ValueError("preferred_batch_sizes must lie in [1, max_batch_size].")


def as_artifact(artifact: Artifact | str | Path) -> Artifact:
    return artifact if isinstance(artifact, Artifact) else Artifact.read(artifact)


def model_version(artifact: Artifact | str | Path, version: int) -> str:
    """What MODEL_VERSION returns: the Triton version and the first 8 hex of the weights' SHA-256."""
    art = as_artifact(artifact)
    return f"{version}-{(art.weights_sha256 or file_sha256(art.path / WEIGHTS))[:8]}"


# -- config.pbtxt ----------------------------------------------------------------------------------------


def with_label_count(spec: ServingSpec, num_labels: int) -> ServingSpec:
    """``spec`` with its "one per label" dims (0) filled in."""
    def fill(tensors):
        return tuple(replace(t, dims=num_labels) if t.dims == 0 else t for t in tensors)

    return replace(spec, inputs=fill(spec.inputs), outputs=fill(spec.outputs))


def served_runtime(artifact: Artifact, cfg: ExportConfig = ExportConfig()) -> str:
    """``onnx`` when ``artifact`` is served from its ONNX graphs (a CPU instance, a kind with an ONNX template, graphs
    exported by kdops.onnx_export), else ``torch``."""
    from kdops.onnx_predict import choose_graph

    onnx = (cfg.runtime == "auto" and cfg.instance_kind == "KIND_CPU" and kinds.for_artifact(artifact).serving.onnx_template
            and choose_graph(artifact) is not None)
    return "onnx" if onnx else "torch"


def served_spec(artifact: Artifact, cfg: ExportConfig = ExportConfig()) -> ServingSpec:
    """The tensors and template ``artifact`` is served with: its kind's spec, sized to its labels."""
    spec = kinds.for_artifact(artifact).serving
    if served_runtime(artifact, cfg) == "onnx":
        spec = replace(spec, template=spec.onnx_template)
    return with_label_count(spec, len(artifact.label_names))


def streams(spec: ServingSpec, cfg: ExportConfig) -> bool:
    """Whether the model (and the ensemble in front of it) is decoupled: a generation model asked to stream."""
    return spec.generates and cfg.streaming


def _tensor(t: Tensor) -> str:
    dims = ", ".join(map(str, t.dims)) if isinstance(t.dims, tuple) else t.dims
    opt = " optional: true" if t.optional else ""
    return f'{{ name: "{t.name}" data_type: {t.dtype} dims: [ {dims} ]{opt} }}'


def io_pbtxt(spec: ServingSpec) -> str:
    return (f"input [ {', '.join(_tensor(t) for t in spec.inputs)} ]\n"
            f"output [ {', '.join(_tensor(t) for t in spec.outputs)} ]")


def _params(params: dict) -> str:
    return "\n".join(f'parameters {{ key: "{k}" value {{ string_value: {json.dumps(str(v))} }} }}'
                     for k, v in params.items())


DECOUPLED = "model_transaction_policy { decoupled: true }"


def model_config(name: str, cfg: ExportConfig, spec: ServingSpec, params: dict, decoupled: bool = False,
                 batched: bool = True) -> str:
    """The full config.pbtxt text of a Python-backend model. ``batched=False``: the client sends whole batches
    (``max_batch_size: 0``, no batcher, no warm-up)."""
    gpus = f" gpus: [ {', '.join(map(str, cfg.gpus))} ]" if cfg.gpus and cfg.instance_kind == "KIND_GPU" else ""
    batching = warmup = ""
    if batched and cfg.dynamic_batching:
        batching = (f"dynamic_batching {{ preferred_batch_size: [ {', '.join(map(str, cfg.preferred_batch_sizes))} ]"
                    f" max_queue_delay_microseconds: {cfg.max_queue_delay_us} }}")
    if batched and cfg.warmup and spec.warmup:
        # One single-row and one two-row batch: the first real requests then meet a warm model
        # (tokenizer caches, allocator, first-call overheads); a failing warm-up fails the load.
        warmup = "\n".join(
            f'model_warmup [{{ name: "warmup_{n}" batch_size: {n} '
            + " ".join(f'inputs {{ key: "{i}" value {{ data_type: {d} dims: [ 1 ] input_data_file: "{i}" }} }}'
                       for i, d, _ in spec.warmup) + " }]" for n in (1, 2))
    return "\n".join(x for x in [
        f'name: "{name}"', 'backend: "python"', f"max_batch_size: {cfg.max_batch_size if batched else 0}",
        io_pbtxt(spec), f"instance_group [ {{ count: {cfg.instance_count} kind: {cfg.instance_kind}{gpus} }} ]",
        DECOUPLED if decoupled else "", batching, warmup, _params(params),
    ] if x) + "\n"


def _warmup_bytes(dtype: str, value) -> bytes:
    # Triton's raw warm-up data: a TYPE_STRING element is a 4-byte little-endian length + its bytes.
    if dtype == "TYPE_STRING":
        data = str(value).encode()
        return struct.pack("<I", len(data)) + data
    return struct.pack({"TYPE_INT32": "<i", "TYPE_INT64": "<q", "TYPE_FP32": "<f"}[dtype], value)


def artifact_config(artifact: Artifact, name: str, label: str, cfg: ExportConfig) -> str:
    """The config.pbtxt of ``artifact`` served as ``name`` with MODEL_VERSION ``label``."""
    spec = served_spec(artifact, cfg)
    params = {"kdops_kind": artifact.kind.value, "kdops_version": label, "kdops_max_chars": cfg.max_chars,
              "kdops_runtime": served_runtime(artifact, cfg), "kdops_torch_threads": cfg.torch_threads,
              **kinds.for_artifact(artifact).serving_params(artifact)}
    if params["kdops_runtime"] == "onnx":
        params["kdops_onnx_threads"] = cfg.onnx_threads
    if spec.generates:
        params.update(kdops_max_new_tokens=cfg.max_new_tokens, kdops_default_max_tokens=cfg.default_max_tokens,
                      kdops_max_prompt_tokens=cfg.max_prompt_tokens)
    if cfg.dlpack_outputs:
        params["kdops_dlpack_outputs"] = "1"
    if cfg.prediction_log_dir:
        params.update(kdops_prediction_log_dir=str(Path(cfg.prediction_log_dir).resolve()),
                      kdops_prediction_log_max_mb=cfg.prediction_log_max_mb,
                      kdops_prediction_log_max_days=cfg.prediction_log_max_days,
                      kdops_prediction_log_redact=int(cfg.prediction_log_redact))
    return model_config(name, cfg, spec, params, decoupled=streams(spec, cfg))


# -- the model folder ------------------------------------------------------------------------------------


def _copy_artifact(src: Path, dst: Path) -> None:
    # Copies, not hard links: a new link changes the shared inode's ctime, and Triton then takes every slot holding
    # that file for modified and re-loads it with a fresh stub when the ensemble in front is re-loaded.
    dst.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        if p.is_file() and p.suffix in ALLOWED_SUFFIXES:
            shutil.copy2(p, dst / p.name)


def _write_model(repo: Path, name: str, version: int, src: Path, text: str, spec: ServingSpec) -> Path:
    model_dir = repo / name
    vdir = model_dir / str(version)
    if vdir.exists():
        shutil.rmtree(vdir)
    vdir.mkdir(parents=True)
    shutil.copy2(TEMPLATES / spec.template, vdir / "model.py")
    # Why: the stub's import would write __pycache__/ into the version dir, which changes its mtime; Triton
    # then sees the slot as modified and re-loads it (a new stub, seconds of CPU) whenever the ensemble
    # in front of it is re-loaded. Compiling here makes that import write nothing (serving/README.md).
    py_compile.compile(str(vdir / "model.py"), doraise=True)
    _copy_artifact(src, vdir / "artifact")
    if spec.warmup:
        (model_dir / "warmup").mkdir(exist_ok=True)
        for i, dtype, value in spec.warmup:
            (model_dir / "warmup" / i).write_bytes(_warmup_bytes(dtype, value))
    atomic_write(model_dir / "config.pbtxt", text)  # a concurrent load never reads half a config
    return vdir


def export_artifact(artifact: Artifact | str | Path, repo: str | Path, name: str, version: int = 1,
                    cfg: ExportConfig = ExportConfig(), version_label: str | None = None) -> Path:
    """Write ``<repo>/<name>/<version>/`` for a kdops artifact of any kind; return the version directory.

    The artifact is checked (metadata readable, weights present) before anything is written; its integrity
    (checksums, shapes) is checked again by the kind's loader inside the server at load time.
    """
    art = as_artifact(artifact)
    if not (art.path / WEIGHTS).is_file():
        raise ArtifactError(f"{art.path}: {WEIGHTS} missing.")
    label = version_label or model_version(art, version)
    return _write_model(Path(repo), name, version, art.path, artifact_config(art, name, label, cfg), served_spec(art, cfg))


def reload_compatible(artifact: Artifact | str | Path, repo: str | Path, name: str, loaded_version: int,
                      cfg: ExportConfig = ExportConfig()) -> bool:
    """Whether the running ``<repo>/<name>`` (Triton version ``loaded_version``) can take ``artifact``'s
    weights in place: the config an export would write now and the one it runs differ at most in the
    version label, and its model.py is today's template. Anything else (another kind, other labels,
    batching, limits, code) needs a fresh load."""
    art = as_artifact(artifact)
    model_dir = Path(repo) / name
    try:
        running = (model_dir / "config.pbtxt").read_text()
        code = (model_dir / str(loaded_version) / "model.py").read_bytes()
    except OSError:
        return False
    unversioned = re.compile(r'(key: "kdops_version" value \{ string_value: )"[^"]*"')
    wanted = artifact_config(art, name, "-", cfg)
    return (unversioned.sub(r"\1-", running) == unversioned.sub(r"\1-", wanted)
            and code == (TEMPLATES / served_spec(art, cfg).template).read_bytes())


def stage_reload(artifact: Artifact | str | Path, repo: str | Path, name: str, version: int) -> str:
    """Copy an artifact where ``<repo>/<name>``'s reload watcher reads it (kdops.hotreload); return its path
    relative to the watcher's directory. Older staged copies are removed (the running ones hold their
    weights in memory)."""
    from kdops.hotreload import slot_directory

    rdir = slot_directory(repo, name)
    rdir.mkdir(parents=True, exist_ok=True)
    for d in rdir.iterdir():
        if d.is_dir() and d.name.isdigit():
            shutil.rmtree(d)
    _copy_artifact(as_artifact(artifact).path, rdir / str(version) / "artifact")
    return f"{version}/artifact"


# -- the stable name in front of the slots ----------------------------------------------------------------


def ensemble_config(name: str, target: str, spec: ServingSpec, max_batch_size: int, decoupled: bool = False) -> str:
    """A one-step ensemble: the stable name clients call, forwarding to the active slot model.

    Re-pointing it is a reload of a backend-less model (no stub process, milliseconds), which is what
    makes the switch itself stall-free; see serving/swap.py.
    """
    maps = "".join(f' input_map {{ key: "{t.name}" value: "{t.name}" }}' for t in spec.inputs)
    maps += "".join(f' output_map {{ key: "{t.name}" value: "{t.name}" }}' for t in spec.outputs)
    policy = f"{DECOUPLED}\n" if decoupled else ""
    return (f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {max_batch_size}\n{io_pbtxt(spec)}\n{policy}'
            f'ensemble_scheduling {{ step [ {{ model_name: "{target}" model_version: -1{maps} }} ] }}\n')


def write_ensemble(repo: str | Path, name: str, target: str, spec: ServingSpec, max_batch_size: int,
                   decoupled: bool = False) -> Path:
    model_dir = Path(repo) / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)  # an ensemble still needs a version folder
    atomic_write(model_dir / "config.pbtxt", ensemble_config(name, target, spec, max_batch_size, decoupled))
    return model_dir


# -- teachers ---------------------------------------------------------------------------------------------


def _teacher_dir(hf_dir: str | Path) -> Path:
    src = Path(hf_dir)
    if not (src / WEIGHTS).is_file():
        raise ArtifactError(f"{src}: a teacher must be saved as {WEIGHTS} (pickle weights are refused).")
    return src


def _safetensors_numel(path: Path) -> int:
    """Values stored in a safetensors file, read from its header alone (8-byte length, then JSON)."""
    import math

    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def export_teacher(hf_dir: str | Path, repo: str | Path, name: str, version: int = 1,
                   cfg: ExportConfig = ExportConfig()) -> Path:
    """Export a transformers sequence classifier saved with safetensors (``save_pretrained``)."""
    from kdops.teacher import directory_id

    src = _teacher_dir(hf_dir)
    try:
        hf = json.loads((src / "config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{src}/config.json unusable ({e}).") from e
    id2label = hf.get("id2label") or {str(i): f"LABEL_{i}" for i in range(int(hf.get("num_labels", 2)))}
    labels = [id2label[str(i)] for i in range(len(id2label))]
    params = {"kdops_kind": "teacher", "kdops_version": str(version), "kdops_max_chars": cfg.max_chars,
              "kdops_torch_threads": cfg.torch_threads, "kdops_label_names": json.dumps(labels),
              "kdops_teacher_id": directory_id(src), "kdops_teacher_params": _safetensors_numel(src / WEIGHTS)}
    spec = with_label_count(TEACHER_SPEC, len(labels))
    return _write_model(Path(repo), name, version, src, model_config(name, cfg, spec, params), spec)


def export_lm_teacher(hf_dir: str | Path, repo: str | Path, name: str, version: int = 1,
                      cfg: ExportConfig = ExportConfig()) -> Path:
    """Export a local causal LM (safetensors + tokenizer) as a remote LM teacher: token ids in, top-k next-token
    log-probs (or greedy continuations) out. The client pads and batches itself (``max_batch_size: 0``):
    sequences of one distillation batch have different lengths, which Triton's batcher would not merge."""
    from transformers import AutoConfig, AutoTokenizer

    from kdops.lm.teacher import start_token_id
    from kdops.teacher import directory_id

    src = _teacher_dir(hf_dir)
    try:  # config and tokenizer only: the weights are read once, by the server
        config, tok = AutoConfig.from_pretrained(str(src)), AutoTokenizer.from_pretrained(str(src))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{src}: config or tokenizer unusable ({e}).") from e
    start = start_token_id(config, tok)
    params = {"kdops_kind": "lm-teacher", "kdops_teacher_id": directory_id(src), "kdops_vocab_size": int(config.vocab_size),
              "kdops_start_id": start, "kdops_pad_id": start if tok.pad_token_id is None else tok.pad_token_id,
              "kdops_eos_id": -1 if tok.eos_token_id is None else tok.eos_token_id, "kdops_torch_threads": cfg.torch_threads}
    text = model_config(name, cfg, LM_TEACHER_SPEC, params, batched=False)
    return _write_model(Path(repo), name, version, src, text, LM_TEACHER_SPEC)
