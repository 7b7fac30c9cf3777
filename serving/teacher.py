"""Teachers served by Triton, behind the kdops teacher protocols.

- ``TritonTeacher`` (``Teacher``: ``id``, ``label_names``, ``logits``): an HF sequence classifier exported with
  ``serving.export.export_teacher``; distillation asks it for logits over HTTP in batches. It has no local weights:
  a first round carves its student from a local base encoder (``kdops.rounds.StudentShape.base``).
- ``TritonLMTeacher`` (``kdops.lm.teacher.LMTeacher``: ``id``, ``vocab_size``, ``encode``, ``topk``,
  ``generate``): a causal LM exported with ``export_lm_teacher``; it returns top-k next-token log-probs, so
  the LM top-k cache and ``distill_round`` use it exactly like a local teacher (same ``id``, same cache rows).
  Tokenising happens here, with the teacher's tokenizer files (a student built from a config needs them anyway).
"""

from __future__ import annotations

import json

import numpy as np

from serving.client import ServingClient, client_for
from serving.export import ExportConfig, export_lm_teacher, export_teacher


def _teacher_params(client: ServingClient, model_name: str, role: str) -> dict[str, str]:
    """The served model's kdops parameters; ValueError unless its export made it a ``role`` model."""
    params = {k: v.get("string_value", "") for k, v in client.model_config(model_name).get("parameters", {}).items()}
    if params.get("kdops_kind") != role:
        raise ValueError(f"{model_name} is not a kdops {role} model (kdops_kind={params.get('kdops_kind')!r})")
    return params


class TritonTeacher:
    """``Teacher`` protocol over a Triton model exported by ``export_teacher``."""

    def __init__(self, url: str, model_name: str, batch_size: int = 64, timeout_s: float = 120.0):
        self.client, self.model_name, self.batch_size = ServingClient(url, timeout_s=timeout_s), model_name, batch_size
        params = _teacher_params(self.client, model_name, "teacher")
        self.label_names = json.loads(params["kdops_label_names"])
        # The content id of the exported weights: soft-label caches keyed on it stay valid across servers.
        self.id = params.get("kdops_teacher_id") or f"triton:{model_name}"
        self._params = int(params["kdops_teacher_params"]) if params.get("kdops_teacher_params") else None

    def num_parameters(self) -> int | None:
        """The served weights' size as its export recorded it (None for an export that did not)."""
        return self._params

    def logits(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), len(self.label_names)), np.float32)
        for s in range(0, len(texts), self.batch_size):
            out[s:s + self.batch_size] = self.client.infer(self.model_name, list(texts[s:s + self.batch_size])).probabilities
        return out


def _deploy(export, server_or_client, hf_dir, name: str, repo, version: int, cfg: ExportConfig) -> str:
    from pathlib import Path

    client, server_repo = client_for(server_or_client)
    export(hf_dir, Path(repo or server_repo), name, version, cfg)
    client.load(name)
    return name


def deploy_teacher(server_or_client, hf_dir, name: str, repo=None, version: int = 1,
                   cfg: ExportConfig = ExportConfig()) -> str:
    """Export an HF classifier dir into the repository and load it; returns the model name."""
    return _deploy(export_teacher, server_or_client, hf_dir, name, repo, version, cfg)


class TritonLMTeacher:
    """``LMTeacher`` over a Triton model exported by ``export_lm_teacher``."""

    def __init__(self, url: str, model_name: str, tokenizer_dir=None, batch_size: int = 16, timeout_s: float = 300.0):
        self.client, self.model_name, self.batch_size = ServingClient(url, timeout_s=timeout_s), model_name, batch_size
        params = _teacher_params(self.client, model_name, "lm-teacher")
        self.id = params["kdops_teacher_id"]
        self.vocab_size = int(params["kdops_vocab_size"])
        self.start_id, self.pad_id = int(params["kdops_start_id"]), int(params["kdops_pad_id"])
        eos = int(params["kdops_eos_id"])
        self.eos_id = None if eos < 0 else eos
        self.tokenizer = None
        if tokenizer_dir is not None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))

    def encode(self, texts, max_length: int = 64) -> list[list[int]]:
        if self.tokenizer is None:
            raise ValueError("TritonLMTeacher.encode needs tokenizer_dir (the teacher's tokenizer files).")
        from kdops.lm.teacher import encode_texts

        return encode_texts(self.tokenizer, self.start_id, texts, max_length)

    def _call(self, seqs: list[list[int]], k: int, new: int) -> dict[str, np.ndarray]:
        T = max(len(s) for s in seqs)
        ids = np.full((len(seqs), T), self.pad_id, np.int64)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
        res = self.client.infer_arrays(self.model_name, [
            ("IDS", "INT64", ids), ("LENGTHS", "INT64", np.array([len(s) for s in seqs], np.int64)),
            ("K", "INT32", np.array([k], np.int32)), ("MAX_NEW_TOKENS", "INT32", np.array([new], np.int32))])
        names = {o["name"] for o in res.get_response()["outputs"]}
        return {n: res.as_numpy(n) for n in ("TOPK_IDS", "TOPK_LOGPROBS", "TOKEN_LOGPROBS", "GENERATED") if n in names}

    def topk(self, sequences, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(ids, lps) for ids, lps, _ in self.scored_topk(sequences, k)]

    def scored_topk(self, sequences, k: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """``topk`` plus each actual next token's log-prob (None from an export that predates that output)."""
        seqs = [self.encode([s])[0] if isinstance(s, str) else list(s) for s in sequences]
        out = []
        for s in range(0, len(seqs), self.batch_size):
            part = seqs[s:s + self.batch_size]
            got = self._call(part, k, 0)
            targets = got.get("TOKEN_LOGPROBS")
            out += [(got["TOPK_IDS"][i, : len(q) - 1].copy(), got["TOPK_LOGPROBS"][i, : len(q) - 1].copy(),
                     None if targets is None else targets[i, : len(q) - 1].copy()) for i, q in enumerate(part)]
        return out

    def generate(self, prompts, max_new_tokens: int) -> list[list[int]]:
        out = []
        for s in range(0, len(prompts), self.batch_size):
            gen = self._call([list(p) for p in prompts[s:s + self.batch_size]], 1, max_new_tokens)["GENERATED"]
            out += [[int(x) for x in row if x >= 0] for row in gen]
        return out


def deploy_lm_teacher(server_or_client, hf_dir, name: str, repo=None, version: int = 1,
                      cfg: ExportConfig = ExportConfig()) -> str:
    """Export a causal-LM directory as a remote LM teacher and load it; returns the model name."""
    return _deploy(export_lm_teacher, server_or_client, hf_dir, name, repo, version, cfg)
