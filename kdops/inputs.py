"""What a prediction request must be: non-empty UTF-8 strings under a length limit.

Standard library only: the torch-free ONNX predictor inside Triton imports it as the torch one does.
"""

from __future__ import annotations


class InputError(ValueError):
    """A request that cannot be predicted (empty text, too long, wrong type)."""


def check_texts(texts, max_chars: int) -> list[str]:
    if not isinstance(texts, (list, tuple)):
        raise InputError(f"expected a list of strings, got {type(texts).__name__}")
    out = []
    for i, t in enumerate(texts):
        if isinstance(t, bytes):
            try:
                t = t.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"text {i} is not valid UTF-8") from e
        if not isinstance(t, str):
            raise InputError(f"text {i} is {type(t).__name__}, not a string")
        if not t.strip():
            raise InputError(f"text {i} is empty")
        if len(t) > max_chars:
            raise InputError(f"text {i} has {len(t)} characters; the limit is {max_chars}")
        out.append(t)
    return out
