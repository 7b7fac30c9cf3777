"""Prediction with a student's ONNX graphs: ONNX Runtime, ``tokenizers`` and numpy, and no torch.

What Triton's CPU model runs (serving/templates/onnx_model.py): without torch a new version loads beside the
serving one in a fraction of a second, and the INT8 graph is several times faster than the torch student on a
CPU. ``kdops.onnx_export`` writes the graphs and records in ``kdops.json`` (``extra.onnx``) which INT8 graph
passed its accuracy gate on which instruction set; ``choose_graph`` reads that and this CPU's flags and picks
the INT8 graph built for it, else the fp32 graph.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdops.artifacts import Artifact, ArtifactError
from kdops.inputs import check_texts

FP32_GRAPH = "model.onnx"
# INT8 graphs by the CPUs they are for. Dynamic quantization computes u8 x s8 products: CPUs with VNNI (and ARM's
# dot-product units) take full 8-bit weights; AVX2/AVX-512 without VNNI saturate on them, so they get 7-bit
# weights (onnxruntime's reduce_range).
INT8_GRAPHS = {"vnni": "model.int8-vnni.onnx", "reduced": "model.int8-reduced.onnx"}
VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


def cpu_flags() -> set[str]:
    """This CPU's feature flags (Linux ``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def int8_family(flags: set[str] | None = None, machine: str | None = None) -> str | None:
    """Which INT8 graph suits this CPU: ``vnni``, ``reduced`` or None (no known integer path: serve fp32)."""
    flags = cpu_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64"):
        return "vnni" if ("asimddp" in flags or machine == "arm64") else None
    if flags & VNNI_FLAGS:
        return "vnni"
    if "avx2" in flags:
        return "reduced"
    return None


@dataclass(frozen=True)
class GraphChoice:
    file: str  # under the artifact directory
    runtime: str  # "onnx-int8" or "onnx-fp32": what the registry and MODEL_VERSION logs call it
    reason: str


def onnx_meta(art: Artifact) -> dict:
    return dict(art.extra.get("onnx") or {})


def choose_graph(art: Artifact, flags: set[str] | None = None, machine: str | None = None) -> GraphChoice | None:
    """The graph to serve ``art`` with on this CPU, or None when the artifact has no ONNX graphs."""
    meta = onnx_meta(art)
    if not meta.get("fp32"):
        return None
    family = int8_family(flags, machine)
    gate = (meta.get("int8_gate") or {}).get(family or "", {})
    if family is None:
        return GraphChoice(meta["fp32"], "onnx-fp32", "no INT8 path known for this CPU")
    if not gate.get("passed"):
        return GraphChoice(meta["fp32"], "onnx-fp32", f"the {family} INT8 graph failed its gate: {gate.get('reason', 'not built')}")
    return GraphChoice(meta["int8"][family], "onnx-int8", f"{family} INT8 graph (agreement {gate['agreement']:.4f})")


def session(path: Path, threads: int = 1):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads and no spinning (spinning threads burn the
    cores the other instances and a loading version need)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_cpu_mem_arena = False  # a session per hot swap: an arena would keep each one's peak buffers
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types for unreadable graphs
        raise ArtifactError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]}).") from e


def load_tokenizer(directory: Path, max_length: int):
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        pad_id = int(json.loads((directory / "student_config.json").read_text()).get("pad_token_id", 0))
    except Exception as e:  # tokenizers raises its own types for broken files
        raise ArtifactError(f"{directory}: tokenizer.json or student_config.json unusable ({e}).") from e
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=pad_id, pad_token=tok.id_to_token(pad_id) or "[PAD]")
    return tok


class OnnxPredictor:
    """The torch-free twin of ``kdops.predict.Predictor``: logits, probabilities and embeddings as numpy."""

    def __init__(self, art: Artifact, graph: GraphChoice, threads: int = 1, max_chars: int = 20_000, version: str = ""):
        self.artifact, self.graph = art, graph
        self.label_names, self.max_chars, self.version = list(art.label_names), max_chars, version
        self.tokenizer = load_tokenizer(art.path, art.max_length or 128)
        self.session = session(art.path / graph.file, threads)
        self.outputs = [o.name for o in self.session.get_outputs()]

    @classmethod
    def from_dir(cls, directory: str | Path, threads: int = 1, verify: bool = True, graph: str | None = None,
                 **kw) -> "OnnxPredictor":
        """``graph``: a file name to force (tests, benchmarks); by default ``choose_graph`` picks."""
        art = Artifact.read(directory)
        choice = choose_graph(art)
        if choice is None:
            raise ArtifactError(f"{directory}: no ONNX graphs (exported by kdops.onnx_export).")
        if graph:
            choice = GraphChoice(graph, "onnx-fp32" if graph == FP32_GRAPH else "onnx-int8", "chosen by the caller")
        if verify:  # what this predictor reads; the safetensors and the other graphs are not its business
            art.verify({choice.file, *(n for n in art.sha256 if not n.endswith((".onnx", ".safetensors")))})
        return cls(art, choice, threads, **kw)

    def _run(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizer.encode_batch(texts)
        ids = np.asarray([e.ids for e in enc], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in enc], dtype=np.int64)
        logits, pooled = self.session.run(self.outputs, {"input_ids": ids, "attention_mask": mask})
        return logits, pooled

    def _batched(self, texts: list[str], which: int, width: int, batch_size: int) -> np.ndarray:
        texts = check_texts(texts, self.max_chars)
        out = np.zeros((len(texts), width), np.float32)
        # Sorted by length so each batch pads little, as the torch predictor does.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for s in range(0, len(texts), batch_size):
            idx = order[s:s + batch_size]
            out[idx] = self._run([texts[i] for i in idx])[which]
        return out

    def logits(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return self._batched(texts, 0, len(self.label_names), batch_size)

    def predict_proba(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return softmax(self.logits(texts, batch_size))

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        width = int(self.session.get_outputs()[1].shape[-1])
        return self._batched(texts, 1, width, batch_size)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)
