"""Prediction with a saved student: the one code path used by evaluation, the CLI and Triton's model.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdops.artifacts import load_student
from kdops.inputs import InputError, check_texts  # noqa: F401  (re-exported)


@dataclass
class Prediction:
    label: str
    probabilities: list[float]


class Predictor:
    """Tokenise, forward, softmax. Thread-compatible (no state changes after construction)."""

    def __init__(self, model, tokenizer, label_names: list[str], max_length: int = 128,
                 device: str | torch.device = "cpu", max_chars: int = 20_000, version: str = ""):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.label_names, self.max_length = list(label_names), max_length
        self.device, self.max_chars, self.version = torch.device(device), max_chars, version

    @classmethod
    def from_dir(cls, directory: str | Path, device: str = "cpu", **kw) -> "Predictor":
        model, tok, meta = load_student(directory, device=device)
        return cls(model, tok, meta.label_names, meta.max_length, device=device, **kw)

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    @torch.inference_mode()
    def logits(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        texts = check_texts(texts, self.max_chars)
        # Sort by length so each batch pads little; restore the order at the end.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        chunks = []
        for s in range(0, len(texts), batch_size):
            idx = order[s:s + batch_size]
            chunks.append(self.model(**self._encode([texts[i] for i in idx])).logits.float())
        if not chunks:
            return torch.empty(0, len(self.label_names))
        out = torch.cat(chunks)
        return out[torch.as_tensor(np.argsort(order))]

    def predict_proba(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return self.logits(texts, batch_size).softmax(-1).cpu().numpy()

    def predict(self, texts: list[str], batch_size: int = 64) -> list[Prediction]:
        probs = self.predict_proba(texts, batch_size)
        return [Prediction(self.label_names[int(p.argmax())], p.tolist()) for p in probs]

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Sentence embeddings (mean of the last layer): what the embedding-drift monitor compares."""
        texts = check_texts(texts, self.max_chars)
        out = [self.model(**self._encode(texts[s:s + batch_size])).pooled.float().cpu() for s in range(0, len(texts), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.config.hidden_size), np.float32)
