"""The check a new version passes before traffic moves to it: a smoke batch asked of the served model, answered
well-formed, by the expected version, and (when a reference is given) as the artifact answers locally.

Generic over the kind: the spec's ``generates`` flag says whether to ask for greedy completions or for class
probabilities, and ``TaskKind.smoke_reference`` computes what the artifact itself answers.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np

from kdops.artifacts import Artifact
from kdops.kinds import TaskKind
from serving.client import ServingClient
from serving.priority import torch_on_this_thread

SMOKE_TEXTS = ("this movie was good", "a terrible boring plot", "what city is this?", "i really love this phone")


class SmokeError(RuntimeError):
    """The served model answered the smoke batch wrongly."""


def ask(client: ServingClient, name: str, kind: TaskKind, texts: list[str], max_tokens: int):
    """``(answer, versions)``: greedy completions of ``max_tokens`` or class probabilities, checked well-formed."""
    if kind.serving.generates:
        out = client.generate(name, texts, max_tokens, 0.0)  # greedy: comparable with the local reference
        if len(out.texts) != len(texts) or len(out.tokens) != len(texts):
            raise SmokeError(f"expected {len(texts)} completions, got {len(out.texts)}")
        if any(not 0 <= t <= max_tokens for t in out.tokens):
            raise SmokeError(f"token counts {out.tokens} outside [0, {max_tokens}]")
        return list(out.texts), out.versions
    out = client.infer(name, texts)
    p = out.probabilities
    if p.ndim != 2 or p.shape[0] != len(texts):
        raise SmokeError(f"expected {len(texts)} rows, got shape {p.shape}")
    if not np.isfinite(p).all() or not np.allclose(p.sum(1), 1.0, atol=1e-3):
        raise SmokeError("probabilities are not finite or do not sum to 1")
    return p, out.versions


def agrees(served, expected, atol: float) -> bool:
    """Numbers within ``atol`` of each other (same shape); anything else (texts) exactly equal."""
    a, b = np.asarray(served), np.asarray(expected)
    if a.dtype.kind in "fiu" and b.dtype.kind in "fiu":
        return a.shape == b.shape and bool(np.abs(a - b).max(initial=0.0) <= atol)
    return list(served) == list(expected)


def smoke_check(client: ServingClient, name: str, kind: TaskKind, texts: list[str], label: str,
                reference: Artifact | None = None, atol: float = 1e-4, max_tokens: int = 8,
                one_thread: bool = False, onnx: bool = False) -> None:
    """Raise SmokeError unless ``name`` answers ``texts`` well-formed, as ``label``, and (given ``reference``)
    as the artifact does locally (``onnx``: through its ONNX graph, as the served model runs it). ``one_thread``: the local reference runs on this thread alone (a niced swap:
    serving.priority.torch_on_this_thread)."""
    served, versions = ask(client, name, kind, texts, max_tokens)
    if any(v != label for v in versions):
        raise SmokeError(f"answered by {set(versions)}, expected {label}")
    if reference is None:
        return
    with (torch_on_this_thread() if one_thread else nullcontext()):
        expected = kind.smoke_reference(reference, texts, max_tokens, onnx=onnx)
    if not agrees(served, expected, atol):
        raise SmokeError(f"served answers differ from the artifact's own (atol {atol}): "
                         f"{_head(served)!r} vs {_head(expected)!r}")


def _head(x):
    return np.asarray(x)[:2].tolist()
