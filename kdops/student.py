"""The student: a small BERT-style encoder classifier, built from a config or carved from a teacher.

Two ways to build one:
- ``StudentModel(StudentConfig(...))``: random init from a shape (layers, hidden, heads, vocabulary).
- ``from_teacher(teacher, layers=...)``: copy a subset of a BERT-family teacher's layers, one of every two
  as DistilBERT did (Sanh et al. 2019) or the first N as layer pruning does, optionally with the word
  embeddings factorised to rank ``embedding_size`` by SVD (ALBERT's factorised embedding, Lan et al. 2019),
  which is where most of a small model's parameters sit.

The module is post-LayerNorm like BERT so that a teacher's weights copy over unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class StudentConfig:
    vocab_size: int = field(metadata={"help": "Tokenizer vocabulary size."})
    num_labels: int = field(metadata={"help": "Number of output classes."})
    hidden_size: int = field(default=256, metadata={"help": "Width of the transformer layers."})
    num_layers: int = field(default=4, metadata={"help": "Number of transformer layers."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads per layer; must divide hidden_size."})
    intermediate_size: int = field(default=1024, metadata={"help": "Width of the feed-forward layer."})
    embedding_size: int | None = field(
        default=None, metadata={"help": "Rank of factorised word embeddings; None means hidden_size (no factorisation)."}
    )
    max_position: int = field(default=512, metadata={"help": "Longest input in tokens."})
    pad_token_id: int = field(default=0, metadata={"help": "Token id of padding."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout on embeddings, attention output and FFN."})
    layer_norm_eps: float = field(default=1e-12, metadata={"help": "LayerNorm epsilon (BERT's default)."})

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}.")
        if self.num_layers < 1 or self.num_labels < 1 or self.vocab_size < 1:
            raise ValueError("num_layers, num_labels and vocab_size must be positive.")
        if self.embedding_size is not None and not 0 < self.embedding_size <= self.hidden_size:
            raise ValueError("embedding_size must be in (0, hidden_size].")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1).")

    def to_json(self) -> str:
        return json.dumps({"model_type": "kdops-student", **asdict(self)}, indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "StudentConfig":
        d = {k: v for k, v in d.items() if k != "model_type"}
        return cls(**d)


class StudentOutput(NamedTuple):
    logits: torch.Tensor  # (B, num_labels)
    hidden_states: tuple[torch.Tensor, ...]  # num_layers + 1 tensors of (B, T, H); empty unless asked
    attentions: tuple[torch.Tensor, ...]  # num_layers tensors of (B, heads, T, T); empty unless asked
    pooled: torch.Tensor  # (B, H) mean of the last layer over real tokens: the sentence embedding


class Block(nn.Module):
    def __init__(self, cfg: StudentConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.attn_out = nn.Linear(h, h)
        self.ln_attn = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(h, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, h)
        self.ln_ffn = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, need_attn: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, H = x.shape
        nh = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, nh, T, H/nh)
            return t.view(B, T, nh, H // nh).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        probs = None
        if need_attn:
            scores = q @ k.transpose(-1, -2) / math.sqrt(H // nh) + bias  # (B, nh, T, T)
            probs = scores.softmax(-1)
            ctx = probs @ v
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        ctx = ctx.transpose(1, 2).reshape(B, T, H)
        x = self.ln_attn(x + self.dropout(self.attn_out(ctx)))
        x = self.ln_ffn(x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(x)))))
        return x, probs


class StudentModel(nn.Module):
    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.config = cfg
        e = cfg.embedding_size or cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, e, padding_idx=cfg.pad_token_id)
        self.embedding_proj = nn.Linear(e, cfg.hidden_size, bias=False) if e != cfg.hidden_size else nn.Identity()
        self.position_embeddings = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.ln_emb = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)
        self.dropout = nn.Dropout(cfg.dropout)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> StudentOutput:
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        pos = torch.arange(T, device=input_ids.device)
        x = self.embedding_proj(self.word_embeddings(input_ids)) + self.position_embeddings(pos)[None]
        x = self.dropout(self.ln_emb(x))
        # additive mask (B, 1, 1, T): 0 for real tokens, a large negative for padding
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        hidden, attns = [x] if output_hidden_states else [], []
        for block in self.blocks:
            x, probs = block(x, bias, output_attentions)
            if output_hidden_states:
                hidden.append(x)
            if output_attentions:
                attns.append(probs)
        logits = self.classifier(self.dropout(torch.tanh(self.pooler(x[:, 0]))))
        m = attention_mask[..., None].to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1.0)
        return StudentOutput(logits, tuple(hidden), tuple(attns), pooled)


# ---------------------------------------------------------------------------------------------
# Carving a student out of a BERT-family teacher


def alternate_layers(num_teacher_layers: int, num_student_layers: int) -> list[int]:
    """Evenly spaced teacher layers, ending at the top one: 6 -> 3 gives [1, 3, 5] (DistilBERT's 'one of two')."""
    step = num_teacher_layers / num_student_layers
    return [round(step * (i + 1)) - 1 for i in range(num_student_layers)]


def first_layers(num_student_layers: int) -> list[int]:
    """The first N teacher layers, as layer pruning from the top does."""
    return list(range(num_student_layers))


def _bert_parts(teacher: nn.Module):
    base = getattr(teacher, "bert", None) or getattr(teacher, "base_model", None)
    emb, enc = getattr(base, "embeddings", None), getattr(base, "encoder", None)
    if emb is None or enc is None or not hasattr(enc, "layer"):
        raise ValueError(
            f"from_teacher needs a BERT-family teacher (embeddings + encoder.layer); got {type(teacher).__name__}. "
            "Build the student from a StudentConfig instead."
        )
    return base, emb, enc


@torch.no_grad()
def from_teacher(
    teacher: nn.Module,
    num_labels: int,
    layers: list[int],
    embedding_size: int | None = None,
    intermediate_size: int | None = None,
    dropout: float = 0.1,
) -> StudentModel:
    """A student initialised from ``layers`` of a BERT-family sequence classifier.

    ``embedding_size`` factorises the (V, H) word embeddings as U_k S_k (V, k) times V_k^T (k, H), the best
    rank-k approximation (Eckart-Young). ``intermediate_size`` keeps the FFN neurons with the largest
    output-weight norms (a simple structured-pruning criterion).
    """
    base, emb, enc = _bert_parts(teacher)
    tcfg = teacher.config
    H, ffn = tcfg.hidden_size, tcfg.intermediate_size
    if max(layers) >= len(enc.layer):
        raise ValueError(f"teacher has {len(enc.layer)} layers; cannot take {layers}.")
    cfg = StudentConfig(
        vocab_size=tcfg.vocab_size,
        num_labels=num_labels,
        hidden_size=H,
        num_layers=len(layers),
        num_heads=tcfg.num_attention_heads,
        intermediate_size=min(intermediate_size or ffn, ffn),  # more neurons than the teacher has cannot be carved
        embedding_size=embedding_size if embedding_size and embedding_size < H else None,
        max_position=tcfg.max_position_embeddings,
        pad_token_id=tcfg.pad_token_id or 0,
        dropout=dropout,
        layer_norm_eps=tcfg.layer_norm_eps,
    )
    s = StudentModel(cfg)
    W = emb.word_embeddings.weight.float()
    if cfg.embedding_size:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        k = cfg.embedding_size
        s.word_embeddings.weight.copy_(U[:, :k] * S[:k])
        s.embedding_proj.weight.copy_(Vh[:k].T)  # Linear(k -> H) weight is (H, k)
    else:
        s.word_embeddings.weight.copy_(W)
    # BERT adds a token-type embedding; students see one segment, so it folds into the positions.
    pos = emb.position_embeddings.weight
    tok_type = emb.token_type_embeddings.weight[0] if hasattr(emb, "token_type_embeddings") else 0.0
    s.position_embeddings.weight.copy_(pos + tok_type)
    s.ln_emb.load_state_dict(emb.LayerNorm.state_dict())
    for block, li in zip(s.blocks, layers):
        t = enc.layer[li]
        block.query.load_state_dict(t.attention.self.query.state_dict())
        block.key.load_state_dict(t.attention.self.key.state_dict())
        block.value.load_state_dict(t.attention.self.value.state_dict())
        block.attn_out.load_state_dict(t.attention.output.dense.state_dict())
        block.ln_attn.load_state_dict(t.attention.output.LayerNorm.state_dict())
        block.ln_ffn.load_state_dict(t.output.LayerNorm.state_dict())
        w_in, b_in, w_out = t.intermediate.dense.weight, t.intermediate.dense.bias, t.output.dense.weight
        keep = torch.arange(ffn)
        if cfg.intermediate_size < ffn:
            keep = w_out.norm(dim=0).topk(cfg.intermediate_size).indices.sort().values
        block.ffn_in.weight.copy_(w_in[keep])
        block.ffn_in.bias.copy_(b_in[keep])
        block.ffn_out.weight.copy_(w_out[:, keep])
        block.ffn_out.bias.copy_(t.output.dense.bias)
    if getattr(base, "pooler", None) is not None:
        s.pooler.load_state_dict(base.pooler.dense.state_dict())
    head = getattr(teacher, "classifier", None)
    if isinstance(head, nn.Linear) and head.out_features == num_labels:
        s.classifier.load_state_dict(head.state_dict())
    return s
