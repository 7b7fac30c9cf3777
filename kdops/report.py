"""The demo's end report: a table per round and plots, in one self-contained HTML file (PNG inlined)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def accuracy_plot(rounds: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    domains = sorted({d for r in rounds for d in r.get("student_acc_after", {})})
    xs = list(range(len(rounds)))
    for dom in domains:
        ax.plot(xs, [r.get("student_acc_after", {}).get(dom) for r in rounds], marker="o", label=f"student {dom}")
        ax.plot(xs, [r.get("teacher_acc", {}).get(dom) for r in rounds], ls=":", alpha=0.6)
    ax.set_xticks(xs, [f"{i}: {r['domain']}" for i, r in enumerate(rounds)], rotation=15)
    ax.set_ylabel("accuracy (dotted: teacher)")
    ax.set_title("Student accuracy per domain after each round")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return fig


def drift_plot(history: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    keys = sorted({k for h in history for k in h.get("scores", {})})
    for k in keys:
        ax.plot([h["window"] for h in history], [h.get("scores", {}).get(k) for h in history], marker=".", label=k)
    for h in history:
        if h.get("verdict") not in (None, "ok"):
            ax.axvline(h["window"], color="red", alpha=0.25)
    ax.set_xlabel("traffic window (red: verdict != ok)")
    ax.set_ylabel("drift score")
    ax.set_title("Drift scores over time")
    if keys:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def latency_plot(samples: list[tuple[float, float, bool]], swaps: list[float]):
    """samples: (seconds since start, latency ms, ok); swaps: seconds at which a swap completed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    if samples:
        t, ms, ok = zip(*samples)
        ax.scatter(t, ms, s=2, c=["tab:blue" if o else "red" for o in ok])
    for s in swaps:
        ax.axvline(s, color="green", alpha=0.5)
    ax.set_yscale("log")
    ax.set_xlabel("seconds (green: hot swap done, red: failed request)")
    ax.set_ylabel("request latency ms")
    ax.set_title("Client latency through Triton during the run")
    ax.grid(alpha=0.3)
    return fig


def render(summary: dict, path: Path, latency_samples=None, swap_times=None, drift_history=None) -> Path:
    rounds = summary["rounds"]
    figs = [accuracy_plot(rounds)]
    if drift_history:
        figs.append(drift_plot(drift_history))
    if latency_samples is not None:
        figs.append(latency_plot(latency_samples, swap_times or []))
    cols = ["domain", "drift_detected", "verdict", "decision", "version", "student_acc_before", "student_acc_after",
            "teacher_acc", "retention", "swap_failed", "detect_to_serve_s"]

    def cell(v) -> str:
        if isinstance(v, dict):
            return "<br>".join(f"{k}: {x:.3f}" if isinstance(x, float) else f"{k}: {x}" for k, x in v.items())
        if isinstance(v, float):
            return f"{v:.3f}"
        return html.escape(str(v))

    rows = "".join("<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rounds)
    links = "".join(f"<li>{html.escape(k)}: <code>{html.escape(str(v))}</code></li>" for k, v in summary.get("links", {}).items())
    imgs = "".join(f'<img src="data:image/png;base64,{_png(f)}" style="max-width:100%"><br>' for f in figs)
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>kdops demo</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}td,th{{border:1px solid #ccc;padding:4px;font-size:12px;vertical-align:top}}
table{{border-collapse:collapse}}</style></head><body>
<h1>kdops: continuous distillation run</h1>
<p>Total failed requests: <b>{summary.get('total_failed_requests')}</b> of {summary.get('total_requests')};
wall time {summary.get('seconds', 0):.0f} s.</p>
<table><tr>{''.join(f'<th>{c}</th>' for c in cols)}</tr>{rows}</table>
<h2>Plots</h2>{imgs}<h2>Where to look</h2><ul>{links}</ul></body></html>"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc)
    return path
