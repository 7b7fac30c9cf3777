"""A lean decoding loop for any Hugging Face causal LM: prefill once, then one forward per new token on the KV cache.

``transformers``' ``generate`` runs the same forwards, but each step also goes through its logits-processor and
stopping-criteria lists, input preparation and bookkeeping. ``decode`` keeps only what kdops uses: greedy or plain
temperature sampling, one id that may never be produced (a trimmed student's ``<other>``), an EOS that ends a row,
an optional minimum length, left padding, and a per-step callback for streaming. Greedy ``decode`` produces the
ids ``generate`` produces (``tests/test_lm_decode.py``); it exists to take per-token overhead out of the speed
comparison (bench/README.md, ``bench/lm.py``).
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Sequence

import torch


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _cache_kwarg(model) -> str:
    """The forward's name for the KV cache: ``cache`` in recent transformers 5 releases, ``past_key_values`` before
    (still accepted, with a deprecation warning on every call). Looked up once per model class."""
    return _cache_kwarg_of(type(model))


@torch.inference_mode()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int, *,
           pad_id: int = 0, eos_id: int | None = None, temperature: float = 0.0, suppress_id: int | None = None,
           min_new_tokens: int = 0, on_step: Callable[[torch.Tensor], None] | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """New ids (B, n) after left-padded prompts ``input_ids`` (B, T), ``n <= max_new_tokens``; rows that ended
    with ``eos_id`` are padded with ``pad_id`` after it. Decoding stops early once every row has ended.
    ``temperature`` 0 is greedy, else sampling from ``softmax(logits / temperature)``. ``on_step(ids)`` gets each
    step's (B,) ids as they are produced."""
    from transformers import DynamicCache

    B = input_ids.shape[0]
    device = input_ids.device
    if max_new_tokens <= 0:
        return torch.empty((B, 0), dtype=torch.long, device=device)
    if temperature < 0:
        raise ValueError("temperature must be >= 0.")
    padded = attention_mask is not None and not bool(attention_mask.all())
    # Without padding no mask is built at all (the model's causal attention does the job); with left padding the
    # mask grows by one column per step and positions count real tokens only, as generate() does.
    mask = attention_mask.to(device=device, dtype=torch.long) if padded else None
    cache = DynamicCache()  # filled in place by every forward
    kw = {_cache_kwarg(model): cache, "use_cache": True}
    if padded:
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, logits_to_keep=1, **kw)
        next_pos = pos[:, -1:] + 1
    else:
        out = model(input_ids=input_ids, logits_to_keep=1, **kw)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    new: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :].float()
        if suppress_id is not None:
            logits[:, suppress_id] = float("-inf")
        if eos_id is not None and step < min_new_tokens:
            logits[:, eos_id] = float("-inf")
        if temperature > 0:
            tok = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator).squeeze(1)
        else:
            tok = logits.argmax(-1)
        if eos_id is not None:
            tok = tok.masked_fill(done, pad_id)
            done = done | (tok == eos_id)
        new.append(tok)
        if on_step is not None:
            on_step(tok)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if padded:
            mask = torch.cat([mask, mask.new_ones((B, 1))], dim=1)
            out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, **kw)
            next_pos = next_pos + 1
        else:
            out = model(input_ids=tok[:, None], **kw)
    return torch.stack(new, dim=1)


def decode_prompts(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int, eos_id: int | None, *,
                   batch_size: int = 16, to_model: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   from_model: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   on_step: Callable[[int, list[int]], None] | None = None, **decode_kw) -> list[list[int]]:
    """Continuations of ``prompts`` (lists of ids), ``batch_size`` rows at a time, left-padded with ``pad_id``: new
    tokens only, cut after the first ``eos_id``. ``to_model`` / ``from_model`` map ids into and out of the model's
    own vocabulary (a trimmed student's); prompts, ``pad_id``, ``eos_id`` and the result are in outside ids.
    ``on_step(first_row, ids)`` gets every step's tokens of the current chunk (outside ids: token streaming).
    ``decode_kw`` goes to ``decode`` (``temperature``, ``suppress_id``, ...)."""
    from kdops.lm.teacher import pad_batch

    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    to_model = to_model or (lambda t: t)
    from_model = from_model or (lambda t: t)
    m_pad = int(to_model(torch.tensor(pad_id)))
    m_eos = None if eos_id is None else int(to_model(torch.tensor(eos_id)))
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for s in range(0, len(prompts), batch_size):
        ids, mask = pad_batch(prompts[s:s + batch_size], pad_id, left=True)
        step = None if on_step is None else (lambda tok, s=s: on_step(s, from_model(tok).tolist()))
        new = decode(model, to_model(ids.to(device)), mask.to(device), max_new_tokens, pad_id=m_pad, eos_id=m_eos,
                     on_step=step, **decode_kw)
        out += cut_after_eos(from_model(new).tolist(), eos_id)
    return out


def cut_after_eos(rows: list[list[int]], eos_id: int | None) -> list[list[int]]:
    """Each row up to and including its first ``eos_id`` (the padding ``decode`` puts after it dropped)."""
    if eos_id is None:
        return rows
    return [row[: row.index(eos_id) + 1] if eos_id in row else row for row in rows]
