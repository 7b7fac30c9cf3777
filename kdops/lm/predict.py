"""Generation with a saved LM student: the one code path for the CLI, the swap check and Triton's model.py.

``LMGenerator.generate(prompts, max_new_tokens, temperature)`` validates every argument first (empty or
huge prompts, negative or too many tokens, a bad temperature raise ``InputError`` naming the row), keeps
the *last* ``max_prompt_tokens`` tokens of a long prompt (the end is what a continuation depends on),
runs one batched ``generate`` per distinct temperature, and cuts each row to its own token budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from kdops.lm.student import LMStudent, load_lm_student
from kdops.lm.teacher import start_token_id
from kdops.predict import InputError, check_texts


@dataclass
class Generation:
    text: str  # the decoded continuation (special tokens dropped)
    tokens: int  # new tokens generated, EOS included


@dataclass
class StreamChunk:
    row: int  # which prompt of the call
    text: str  # text added since this prompt's previous chunk
    tokens: int  # new tokens generated so far for this prompt
    final: bool  # the prompt is done (EOS or its token budget)


def _per_row(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise InputError(f"{name}: {len(value)} values for {n} prompts")
        return list(value)
    return [value] * n


class LMGenerator:
    """Tokenise, generate, decode. One generator per process (a Triton instance, a CLI run)."""

    def __init__(self, student: LMStudent, tokenizer, device: str | torch.device = "cpu", max_chars: int = 20_000,
                 max_prompt_tokens: int = 256, max_new_tokens_limit: int = 256, version: str = ""):
        self.student, self.tokenizer = student.eval(), tokenizer
        self.device, self.max_chars, self.version = torch.device(device), max_chars, version
        self.max_prompt_tokens, self.max_new_tokens_limit = max_prompt_tokens, max_new_tokens_limit
        self.start_id = start_token_id(student.config, tokenizer)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.start_id

    @classmethod
    def from_dir(cls, directory: str | Path, device: str = "cpu", **kw) -> "LMGenerator":
        student, tok, _ = load_lm_student(directory, device=device)
        return cls(student, tok, device=device, **kw)

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        keep = self.max_prompt_tokens - 1
        return [[self.start_id] + list(x)[-keep:] if keep > 0 else [self.start_id] for x in ids]

    def check(self, prompts, max_new_tokens, temperature) -> tuple[list[str], list[int], list[float]]:
        """Validated ``(prompts, budgets, temperatures)``; InputError names the first bad row."""
        prompts = check_texts(prompts, self.max_chars)
        n = len(prompts)
        budgets, temps = _per_row(max_new_tokens, n, "max_new_tokens"), _per_row(temperature, n, "temperature")
        for i, m in enumerate(budgets):
            if isinstance(m, bool) or int(m) != m or not 0 <= int(m) <= self.max_new_tokens_limit:
                raise InputError(f"max_new_tokens of prompt {i} is {m}; allowed: an integer in [0, {self.max_new_tokens_limit}]")
        for i, t in enumerate(temps):
            if not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 <= t <= 10:
                raise InputError(f"temperature of prompt {i} is {t}; allowed: a number in [0, 10] (0 = greedy)")
        return prompts, [int(m) for m in budgets], [round(float(t), 4) for t in temps]

    def generate(self, prompts: Sequence[str], max_new_tokens: int | Sequence[int] = 32,
                 temperature: float | Sequence[float] = 0.0) -> list[Generation]:
        return self.generate_checked(*self.check(prompts, max_new_tokens, temperature))

    @torch.inference_mode()
    def generate_checked(self, prompts: list[str], budgets: list[int], temps: list[float]) -> list[Generation]:
        """``generate`` on what ``check`` returned (Triton's model.py checks each request, then generates the
        batch once)."""
        ids = self.encode(prompts)
        out: list[Generation | None] = [None] * len(prompts)
        for t in sorted(set(temps)):  # one batched generate per temperature (usually one)
            rows = [i for i in range(len(prompts)) if temps[i] == t]
            gen = self.student.generate([ids[i] for i in rows], max(budgets[i] for i in rows), self.pad_id, self.eos_id,
                                        batch_size=max(1, len(rows)), temperature=t)
            for i, new in zip(rows, gen):
                new = new[: budgets[i]]
                out[i] = Generation(self.tokenizer.decode(new, skip_special_tokens=True), len(new))
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def stream_checked(self, prompts: list[str], budgets: list[int], temps: list[float],
                       emit: Callable[[StreamChunk], None]) -> list[Generation]:
        """``generate_checked``, calling ``emit`` as text becomes final: one chunk per prompt whenever its decoded
        text grows (a token that ends inside a UTF-8 character waits for the next), and a ``final`` chunk when
        the prompt is done. The chunks of a prompt concatenate to its ``Generation.text``; the returned list
        equals what ``generate_checked`` returns for the same arguments (greedy)."""
        ids = self.encode(prompts)
        tokens: list[list[int]] = [[] for _ in prompts]
        sent = [""] * len(prompts)
        done = [b == 0 for b in budgets]
        for i in (i for i, d in enumerate(done) if d):
            emit(StreamChunk(i, "", 0, True))

        def flush(i: int, final: bool) -> None:
            text = self.tokenizer.decode(tokens[i], skip_special_tokens=True)
            if not final and text.endswith("\ufffd"):
                return  # a multi-byte character split across tokens: wait for the rest
            delta = text[len(sent[i]):]
            if delta or final:
                sent[i] = text
                emit(StreamChunk(i, delta, len(tokens[i]), final))

        for t in sorted(set(temps)):
            rows = [i for i in range(len(prompts)) if temps[i] == t and not done[i]]
            if not rows:
                continue

            def on_step(_first: int, step: list[int], rows=rows) -> None:
                for i, tok in zip(rows, step):
                    if done[i]:
                        continue
                    tokens[i].append(tok)
                    done[i] = tok == self.eos_id or len(tokens[i]) >= budgets[i]
                    flush(i, done[i])

            self.student.generate([ids[i] for i in rows], max(budgets[i] for i in rows), self.pad_id, self.eos_id,
                                  batch_size=len(rows), temperature=t, on_step=on_step)
            for i in rows:
                if not done[i]:  # generation stopped early for every row: close what is still open
                    done[i] = True
                    flush(i, True)
        return [Generation(self.tokenizer.decode(tk, skip_special_tokens=True), len(tk)) for tk in tokens]
