"""Triton's Prometheus metrics for one served model, summed over its stable name and its hot-swap slots.

``triton_metrics(metrics_url, model)`` reads ``http://<metrics_url>/metrics`` (the text exposition format) and
returns request successes and failures at the stable name clients call, and from the slot models that run the
model: inferences, executions (so the mean dynamic batch), and the mean queue and compute time per request.
"""

from __future__ import annotations

import re
import urllib.request

_LINE = re.compile(r'^(nv_inference_[a-z_]+)\{([^}]*)\}\s+([0-9.eE+-]+)$')


def parse(text: str) -> dict[tuple[str, str], float]:
    """``{(metric, model): value}`` summed over versions, from Prometheus text."""
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        key = (m.group(1), labels.get("model", ""))
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def summarize(values: dict[tuple[str, str], float], model: str) -> dict:
    """The figures ``kdops status`` shows for ``model`` (its ensemble ``model`` and slots ``model__s*``)."""
    def total(metric: str, slots: bool) -> float:
        return sum(v for (m, name), v in values.items()
                   if m == metric and (name.startswith(f"{model}__s") if slots else name == model))

    ok, failed = total("nv_inference_request_success", False), total("nv_inference_request_failure", False)
    runs, execs = total("nv_inference_request_success", True), total("nv_inference_exec_count", True)
    inferences = total("nv_inference_count", True)
    return {"requests": int(ok), "failed": int(failed), "executions": int(execs),
            "mean_batch": round(inferences / execs, 2) if execs else None,
            "mean_queue_ms": round(total("nv_inference_queue_duration_us", True) / runs / 1000, 3) if runs else None,
            "mean_compute_ms": round(total("nv_inference_compute_infer_duration_us", True) / runs / 1000, 3) if runs else None}


def triton_metrics(metrics_url: str, model: str, timeout_s: float = 5.0) -> dict:
    """``summarize`` of the live server's metrics; raises OSError when the endpoint does not answer."""
    with urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=timeout_s) as r:
        return summarize(parse(r.read().decode("utf-8", "replace")), model)
