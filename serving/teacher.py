"""A teacher served by Triton, behind the kdops ``Teacher`` protocol (``id``, ``label_names``, ``logits``).

An expensive teacher (a large HF sequence classifier) is exported with ``serving.export.export_teacher``
and served like a student; distillation then asks it for logits over HTTP in batches.
"""

from __future__ import annotations

import json

import numpy as np

from serving.client import ServingClient
from serving.export import ExportConfig, export_teacher


class TritonTeacher:
    """``Teacher`` protocol over a Triton model exported by ``export_teacher``."""

    def __init__(self, url: str, model_name: str, batch_size: int = 64, timeout_s: float = 120.0):
        self.client = ServingClient(url, timeout_s=timeout_s)
        self.model_name, self.batch_size = model_name, batch_size
        cfg = self.client.model_config(model_name)
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        if params.get("kdops_kind") != "teacher":
            raise ValueError(f"{model_name} is not a kdops teacher model (kdops_kind={params.get('kdops_kind')!r})")
        self.label_names = json.loads(params["kdops_label_names"])
        # The content id of the exported weights: soft-label caches keyed on it stay valid across servers.
        self.id = params.get("kdops_teacher_id") or f"triton:{model_name}"

    def logits(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), len(self.label_names)), np.float32)
        for s in range(0, len(texts), self.batch_size):
            out[s:s + self.batch_size] = self.client.infer(self.model_name, list(texts[s:s + self.batch_size])).probabilities
        return out


def deploy_teacher(server_or_client, hf_dir, name: str, repo=None, version: int = 1,
                   cfg: ExportConfig = ExportConfig()) -> str:
    """Export an HF classifier dir into the repository and load it; returns the model name."""
    from pathlib import Path

    from serving.swap import _as_client

    client, server_repo = _as_client(server_or_client)
    export_teacher(hf_dir, Path(repo or server_repo), name, version, cfg)
    client.load(name)
    return name
