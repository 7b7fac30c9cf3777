"""A classifier student as ONNX graphs: fp32, and INT8 per CPU family, each INT8 graph gated on accuracy.

``prepare(artifact, rows)`` exports the student (dynamic batch and sequence axes), quantizes it dynamically
(``onnxruntime.quantization``, per-channel weights) once for VNNI-class CPUs and once with 7-bit weights for
AVX2/AVX-512 CPUs without VNNI, and checks every graph against the torch student on ``rows``: the fp32 graph must
match it, and an INT8 graph passes when it agrees on at least 99 % of labels and loses at most 0.5 points of
accuracy on every slice. The graphs and the gate's figures go into the artifact (``extra.onnx``, their digests
in ``sha256``); what serves them is ``kdops.onnx_predict``, which picks this CPU's graph at load time.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kdops.artifacts import Artifact, ArtifactError, add_files
from kdops.onnx_predict import FP32_GRAPH, INT8_GRAPHS, GraphChoice, OnnxPredictor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Int8Config:
    max_drop_points: float = field(default=0.5, metadata={"help": "Largest accuracy loss on any slice, in points."})
    min_agreement: float = field(default=0.99, metadata={"help": "Smallest share of labels the INT8 graph must agree on."})
    min_slice_rows: int = field(default=50, metadata={"help": "Slices with fewer labelled rows are reported, not gated: one row of 20 is 5 points."})
    max_fp32_diff: float = field(default=1e-3, metadata={"help": "Largest logit difference allowed between the fp32 graph and torch."})
    opset: int = field(default=17, metadata={"help": "ONNX opset of the exported graph."})


def export_fp32(art: Artifact, out: Path, opset: int = 17) -> None:
    """The torch student as one ONNX graph: (input_ids, attention_mask) -> (logits, pooled)."""
    import torch

    from kdops.artifacts import load_student

    model, tok, _ = load_student(art, verify=False)

    class Graph(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            o = self.m(input_ids, attention_mask)
            return o.logits, o.pooled

    enc = tok(["a short text", "a somewhat longer text of a few more words"], padding=True, return_tensors="pt")
    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
            "logits": {0: "batch"}, "pooled": {0: "batch"}}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice; its graph is what we check below
        torch.onnx.export(Graph(model.eval()), (enc["input_ids"], enc["attention_mask"]), str(out), dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["logits", "pooled"],
                          dynamic_axes=axes, opset_version=opset)


def quantize(src: Path, out: Path, reduce_range: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)  # "consider pre-processing": advice for static quantization of vision graphs
    try:
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range)
    finally:
        logging.disable(logging.NOTSET)


def slice_accuracy(pred: np.ndarray, rows: pd.DataFrame, names: list[str]) -> dict[str, tuple[float, int]]:
    """{slice: (accuracy, labelled rows)} over ``all`` and each ``domain``; rows with unknown labels left out."""
    index = {n: i for i, n in enumerate(names)}
    y = rows["label"].map(index)
    known = y.notna().to_numpy()
    hits = pd.Series((pred == y.fillna(-1).to_numpy()) & known)
    groups = {"all": np.ones(len(rows), bool)}
    if "domain" in rows:
        groups.update({str(d): (rows["domain"] == d).to_numpy() for d in rows["domain"].dropna().unique()})
    out = {}
    for name, m in groups.items():
        n = int((m & known).sum())
        if n:
            out[name] = (float(hits[m & known].mean()), n)
    return out


def gate_int8(reference: np.ndarray, candidate: np.ndarray, rows: pd.DataFrame, names: list[str],
              cfg: Int8Config) -> dict:
    """The INT8 gate's figures and verdict for one graph's labels against the fp32 student's."""
    agreement = float((reference == candidate).mean()) if len(reference) else 0.0
    ref, cand = slice_accuracy(reference, rows, names), slice_accuracy(candidate, rows, names)
    slices = {s: {"fp32": ref[s][0], "int8": cand[s][0], "drop_points": 100 * (ref[s][0] - cand[s][0]), "rows": n}
              for s, (_, n) in ref.items()}
    gated = {s: v for s, v in slices.items() if v["rows"] >= cfg.min_slice_rows}
    max_drop = max((v["drop_points"] for v in gated.values()), default=0.0)
    reasons = []
    if not len(reference):
        reasons.append("no evaluation rows")
    if agreement < cfg.min_agreement:
        reasons.append(f"label agreement {agreement:.4f} < {cfg.min_agreement}")
    worst = max(gated, key=lambda s: gated[s]["drop_points"], default=None)
    if worst is not None and max_drop > cfg.max_drop_points + 1e-9:
        reasons.append(f"slice {worst} loses {max_drop:.2f} points > {cfg.max_drop_points}")
    return {"passed": not reasons, "reason": "; ".join(reasons) or "ok", "agreement": agreement,
            "max_drop_points": max_drop, "slices": slices, "rows": int(len(reference))}


def prepare(art: Artifact, rows: pd.DataFrame | None, cfg: Int8Config = Int8Config()) -> Artifact:
    """``art`` with its ONNX graphs and their gate (idempotent: an artifact that has them is returned as it is).

    ``rows``: evaluation rows (text, label, optional domain) the INT8 graphs are gated on. A student whose fp32
    graph does not reproduce torch gets no graphs at all (it is served by torch) and the reason is recorded."""
    from kdops.predict import Predictor

    if (art.extra.get("onnx") or {}).get("fp32") or (art.extra.get("onnx") or {}).get("skipped"):
        return art
    if not (art.path / "tokenizer.json").is_file():
        return add_files(art, {}, {"onnx": {"skipped": "no tokenizer.json (a fast tokenizer is needed without torch)"}})
    t0 = time.perf_counter()
    rows = (rows if rows is not None else pd.DataFrame({"text": [], "label": []})).reset_index(drop=True)
    texts = rows["text"].astype(str).tolist()
    with tempfile.TemporaryDirectory(prefix="kdops-onnx-") as tmp:
        tmp = Path(tmp)
        export_fp32(art, tmp / FP32_GRAPH, cfg.opset)
        for family, name in INT8_GRAPHS.items():
            quantize(tmp / FP32_GRAPH, tmp / name, reduce_range=family == "reduced")
        probe = texts[:256] or ["a short text", "another text to check the graph on"]
        threads = min(4, os.cpu_count() or 1)

        def run(name: str, which: list[str]) -> np.ndarray:
            return OnnxPredictor(art, GraphChoice(str(tmp / name), "", ""), threads=threads).logits(which)

        diff = float(np.abs(run(FP32_GRAPH, probe) - Predictor.from_dir(art.path).logits(probe).numpy()).max())
        if diff > cfg.max_fp32_diff:
            reason = f"the fp32 ONNX graph differs from torch by {diff:.2e} > {cfg.max_fp32_diff}"
            log.warning("%s: %s; serving stays on torch", art.path, reason)
            return add_files(art, {}, {"onnx": {"skipped": reason}})
        # The fp32 graph stands in for torch on the rest: it matched above, and runs several times faster.
        reference = run(FP32_GRAPH, texts).argmax(-1) if texts else np.zeros(0, int)
        gates = {}
        for family, name in INT8_GRAPHS.items():
            cand = run(name, texts).argmax(-1) if texts else np.zeros(0, int)
            gates[family] = gate_int8(reference, cand, rows, list(art.label_names), cfg)
        files = {name: (tmp / name).read_bytes() for name in (FP32_GRAPH, *INT8_GRAPHS.values())}
    meta = {"fp32": FP32_GRAPH, "int8": dict(INT8_GRAPHS), "fp32_max_abs_diff": diff, "int8_gate": gates,
            "config": asdict(cfg), "seconds": time.perf_counter() - t0}
    try:
        return add_files(art, files, {"onnx": meta})
    except OSError as e:
        raise ArtifactError(f"{art.path}: could not write the ONNX graphs ({e}).") from e
