"""Stage 4: evaluation of a student against the teacher (and, through the gate, the serving champion).

``EvalReport`` is plain JSON: accuracy and macro-F1 overall and per domain slice, teacher-student
agreement, knowledge retention (student metric / teacher metric), Jensen-Shannon divergence between their
distributions, expected calibration error, robustness on perturbed inputs, latency and throughput on the
current machine, parameter counts.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float((pred == labels).mean()) if len(labels) else float("nan")


def macro_f1(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    f1s = []
    for c in range(num_classes):
        tp = np.sum((pred == c) & (labels == c))
        fp, fn = np.sum((pred == c) & (labels != c)), np.sum((pred != c) & (labels == c))
        if tp + fp + fn == 0:
            continue  # class absent from both: it does not count (as sklearn's labels=present)
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else float("nan")


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): sum over confidence bins of |accuracy - confidence| weighted by bin size."""
    conf, pred = probs.max(-1), probs.argmax(-1)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs((pred[m] == labels[m]).mean() - conf[m].mean())
    return float(ece)


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Mean Jensen-Shannon divergence (natural log, in [0, ln 2]) between rows of p and q."""
    p, q = np.clip(p, 1e-12, 1), np.clip(q, 1e-12, 1)
    m = (p + q) / 2
    return float(np.mean(0.5 * (p * np.log(p / m)).sum(-1) + 0.5 * (q * np.log(q / m)).sum(-1)))


def perturb(texts: list[str], kind: str, seed: int = 13, rate: float = 0.1) -> list[str]:
    """Robustness probes: ``typos`` swaps two adjacent letters in ~rate of words; ``casing`` upper-cases."""
    rng = random.Random(seed)
    if kind == "casing":
        return [t.upper() for t in texts]
    if kind != "typos":
        raise ValueError(f"unknown perturbation {kind!r}")
    out = []
    for t in texts:
        words = t.split(" ")
        for i, w in enumerate(words):
            if len(w) > 3 and rng.random() < rate:
                j = rng.randrange(len(w) - 1)
                words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
        out.append(" ".join(words))
    return out


def measure_speed(predict_fn, texts: list[str], batch_size: int, max_seconds: float = 4.0, max_batches: int = 200) -> dict:
    """Latency percentiles per batch and throughput (texts/s) of ``predict_fn`` on this machine."""
    batches = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)] or [texts]
    predict_fn(batches[0])  # warm-up
    times, n, start = [], 0, time.perf_counter()
    while time.perf_counter() - start < max_seconds and len(times) < max_batches:
        b = batches[len(times) % len(batches)]
        t = time.perf_counter()
        predict_fn(b)
        times.append((time.perf_counter() - t) * 1000)
        n += len(b)
    total = sum(times) / 1000
    return {"batch_size": batch_size, "p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)),
            "throughput": n / total if total else 0.0, "batches": len(times)}


@dataclass
class EvalReport:
    overall: dict
    per_domain: dict
    teacher: dict
    teacher_per_domain: dict
    agreement: float
    retention: float
    retention_per_domain: dict
    js_divergence: float
    ece: float
    robustness: dict
    latency: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    n: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EvalReport":
        return cls(**d)

    def summary(self) -> str:
        doms = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in self.per_domain.items())
        return (f"accuracy {self.overall['accuracy']:.4f} (teacher {self.teacher['accuracy']:.4f}, retention "
                f"{self.retention:.3f}), agreement {self.agreement:.3f}, ECE {self.ece:.3f}; per domain: {doms}")


def _metrics(probs: np.ndarray, labels: np.ndarray, c: int) -> dict:
    pred = probs.argmax(-1)
    return {"accuracy": accuracy(pred, labels), "macro_f1": macro_f1(pred, labels, c), "n": int(len(labels))}


def evaluate(predictor, rows: pd.DataFrame, teacher_logits: np.ndarray, label_names: list[str],
             speed: bool = True, robustness: bool = True, teacher_params: int | None = None) -> EvalReport:
    """Evaluate ``predictor`` (a kdops Predictor) on labelled ``rows`` against the teacher's logits."""
    index = {n: i for i, n in enumerate(label_names)}
    rows = rows[rows["label"].isin(index)].reset_index(drop=True)
    if rows.empty:
        from kdops.errors import LabelMismatch

        raise LabelMismatch(f"evaluation needs labelled rows with the teacher's labels {list(label_names)}; "
                            "the data has none (check its label column, or map its labels in kdops.toml [task.label_map]).")
    if len(teacher_logits) != len(rows):
        raise ValueError("teacher_logits must align with the labelled rows.")
    labels = rows["label"].map(index).to_numpy()
    texts = rows["text"].tolist()
    c = len(label_names)
    s_probs, t_probs = predictor.predict_proba(texts), softmax(np.asarray(teacher_logits, np.float64))
    overall, teacher = _metrics(s_probs, labels, c), _metrics(t_probs, labels, c)
    per_domain, t_per_domain, ret_dom = {}, {}, {}
    domains = rows["domain"].fillna("all")
    for dom in sorted(domains.unique()):
        m = (domains == dom).to_numpy()
        per_domain[dom], t_per_domain[dom] = _metrics(s_probs[m], labels[m], c), _metrics(t_probs[m], labels[m], c)
        ret_dom[dom] = per_domain[dom]["accuracy"] / max(t_per_domain[dom]["accuracy"], 1e-9)
    robust = {}
    if robustness:
        base_pred = s_probs.argmax(-1)
        for kind in ("typos", "casing"):
            p = predictor.predict_proba(perturb(texts, kind))
            robust[kind] = {"accuracy": accuracy(p.argmax(-1), labels), "consistency": float((p.argmax(-1) == base_pred).mean())}
    lat = {}
    if speed:
        sample = texts[:256]
        lat = {f"batch{b}": measure_speed(lambda x: predictor.predict_proba(x, batch_size=b), sample, b) for b in (1, 32)}
    params = {"student": int(sum(p.numel() for p in predictor.model.parameters()))}
    if teacher_params:
        params["teacher"] = int(teacher_params)
        params["ratio"] = params["student"] / teacher_params
    return EvalReport(
        overall=overall, per_domain=per_domain, teacher=teacher, teacher_per_domain=t_per_domain,
        agreement=float((s_probs.argmax(-1) == t_probs.argmax(-1)).mean()),
        retention=overall["accuracy"] / max(teacher["accuracy"], 1e-9), retention_per_domain=ret_dom,
        js_divergence=js_divergence(s_probs, t_probs), ece=expected_calibration_error(s_probs, labels),
        robustness=robust, latency=lat, params=params, n=len(rows),
    )


@torch.inference_mode()
def teacher_speed(teacher, texts: list[str]) -> dict:
    """Latency and throughput of a local teacher at batch sizes 1 and 32, measured like the student's."""
    return {f"batch{b}": measure_speed(lambda x: teacher.logits(x), texts[:256], b) for b in (1, 32)}
