"""Figures for runs and reports: learning curves, per-domain accuracy, reliability diagram.

Figures are built with ``matplotlib.figure.Figure`` directly, never ``pyplot``: a Figure renders with
the Agg canvas when saved, so no GUI backend is ever chosen, nothing global changes (a notebook's own
backend stays as it was), and figures are not kept alive in pyplot's registry (no memory growth in a
long-running flow). Each function returns the Figure and saves a PNG when given ``path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _figure(width: float = 7.0, height: float = 4.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save a figure as PNG (parent directories created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def learning_curves(history: Sequence[dict], keys: Sequence[str] | None = None, path: str | Path | None = None):
    """Per-epoch curves from ``[{"epoch": 1, "train_loss": .., "val_accuracy": ..}, ...]``.

    Keys with "loss" in their name go on the left axis, everything else (accuracies, agreement) on
    the right, because the two live on different scales. The x axis is ``epoch`` (or ``step``) when
    present, else the position in the history.
    """
    history = list(history)
    if not history:
        raise ValueError("history is empty: nothing to plot.")
    xkey = "epoch" if "epoch" in history[0] else ("step" if "step" in history[0] else None)
    x = [h.get(xkey, i) for i, h in enumerate(history, start=1)] if xkey else list(range(1, len(history) + 1))
    if keys is None:
        keys = [k for k in dict.fromkeys(k for h in history for k in h)
                if k not in ("epoch", "step") and any(isinstance(h.get(k), (int, float)) for h in history)]
    losses, others = [k for k in keys if "loss" in k], [k for k in keys if "loss" not in k]
    fig = _figure(9.0 if others and losses else 6.0, 4.0)
    axes = fig.subplots(1, 2 if losses and others else 1, squeeze=False)[0]
    for ax, (group, label) in zip(axes, [(g, lab) for g, lab in ((losses, "loss"), (others, "metric")) if g]):
        for k in group:
            ys = [h.get(k, np.nan) for h in history]
            ax.plot(x, [np.nan if y is None else y for y in ys], marker="o", label=k)
        ax.set_xlabel(xkey or "epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Learning curves")
    if path:
        save(fig, path)
    return fig


def domain_accuracy(reports: dict[str, dict | None], metric: str = "accuracy", path: str | Path | None = None,
                    ylim: tuple[float, float] | None = (0, 1.05)):
    """Grouped bars of ``report["per_domain"][domain][metric]`` for each model (student, teacher, champion).

    ``reports`` maps a model's display name to its EvalReport dict; a missing report (no champion yet)
    or a domain a model was not evaluated on is skipped, not drawn as zero. ``ylim=None`` scales the axis to
    the data (perplexities).
    """
    reports = {k: v for k, v in reports.items() if v}
    if not reports:
        raise ValueError("no reports to plot.")
    domains = sorted({d for r in reports.values() for d in (r.get("per_domain") or {})})
    if "overall" in next(iter(reports.values())):
        domains.append("overall")
    fig = _figure(max(6.0, 1.2 * len(domains) + 2), 4.0)
    ax = fig.subplots()
    width = 0.8 / len(reports)
    xs = np.arange(len(domains))
    for i, (model, report) in enumerate(reports.items()):
        vals = []
        for d in domains:
            block = report.get("overall") if d == "overall" else (report.get("per_domain") or {}).get(d)
            vals.append(np.nan if not block or block.get(metric) is None else float(block[metric]))
        bars = ax.bar(xs + (i - (len(reports) - 1) / 2) * width, vals, width, label=model)
        ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.2f}" for v in vals], fontsize=7)
    ax.set_xticks(xs, domains)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_ylabel(metric)
    ax.set_title(f"Per-domain {metric}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if path:
        save(fig, path)
    return fig


def calibration_bins(probs, labels, n_bins: int = 10) -> dict:
    """Confidence-binned accuracy. ``probs``: (N, C) class probabilities, or (N,) P(class 1) for binary.

    Returns ``{"edges", "confidence", "accuracy", "count", "ece"}``; ECE = Σ_b (n_b/N)·|acc_b − conf_b|
    (Guo et al. 2017, "On Calibration of Modern Neural Networks"). Empty bins hold NaN.
    """
    p = np.asarray(probs, dtype=float)
    y = np.asarray(labels).astype(int)
    if p.ndim == 1:
        p = np.stack([1 - p, p], axis=1)
    if len(p) != len(y) or len(y) == 0:
        raise ValueError(f"need as many labels as rows of probabilities (got {len(y)} and {len(p)}).")
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    correct = (pred == y).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
    ece = float(np.nansum(count / len(y) * np.abs(acc - mean_conf)))
    return {"edges": edges, "confidence": mean_conf, "accuracy": acc, "count": count, "ece": ece}


def reliability_diagram(probs, labels, n_bins: int = 10, title: str = "Reliability", path: str | Path | None = None):
    """Accuracy per confidence bin against the diagonal of perfect calibration, with the bin counts."""
    b = calibration_bins(probs, labels, n_bins)
    fig = _figure(5.0, 5.5)
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    centers = (b["edges"][:-1] + b["edges"][1:]) / 2
    width = 1.0 / n_bins
    top.bar(centers, np.nan_to_num(b["accuracy"]), width * 0.95, edgecolor="black", label="accuracy")
    top.bar(centers, np.nan_to_num(b["confidence"] - b["accuracy"]), width * 0.95,
            bottom=np.nan_to_num(b["accuracy"]), color="tab:red", alpha=0.3, label="gap")
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"{title} (ECE {b['ece']:.3f})")
    top.legend(fontsize=8, loc="upper left")
    bottom.bar(centers, b["count"], width * 0.95, color="gray")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("count")
    if path:
        save(fig, path)
    return fig
