"""Stage 5 (LM): perplexity per domain, teacher-student top-1 agreement, generation speed and peak memory.

Perplexity is ``exp(mean NLL)`` over every predicted token of every sequence (token-weighted, not a mean
of per-sentence perplexities), each sequence starting with the model's start token. A trimmed-vocabulary
student is scored over the full vocabulary (see ``kdops.lm.student``), so teacher and student numbers
compare directly.

Speed and memory: peak memory is measured in a fresh subprocess per model (``measure_generation``): the peak
RSS of loading the model and one generation, minus the RSS of the same process before loading (so the imported
libraries do not count); on GPU it is ``torch.cuda.max_memory_allocated``. Generation is greedy, batch 1, with the
decoding loop served generation uses (``kdops.lm.decode``) and no EOS, so both models make exactly
``max_new_tokens`` new tokens: equal work.
The reported tokens/s come from a paired measurement (``measure_generation_paired``): both models loaded
in one fresh process, teacher and student generating prompt by prompt in alternation (who goes first alternates
too), ``speed_rounds`` passes over the prompts; each model's figure is the median of its per-prompt rates.
On a shared machine the same model's speed moves between runs minutes apart: measured in separate runs, that
drift lands on one model and not the other; paired prompt by prompt, it lands on both. Each model's rate measured alone (in its
memory subprocess) is kept as ``tokens_per_s_alone``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kdops.lm.teacher import padded_batches


@dataclass(frozen=True)
class LMEvalConfig:
    batch_size: int = field(default=16, metadata={"help": "Sequences per forward pass when scoring."})
    gen_prompts: int = field(default=8, metadata={"help": "Prompts for the speed test (batch 1, one after another)."})
    gen_prompt_tokens: int = field(default=8, metadata={"help": "Prompt length in tokens (start token included)."})
    max_new_tokens: int = field(default=48, metadata={"help": "New tokens per prompt in the speed test."})
    threads: int = field(default=1, metadata={"help": "torch CPU threads in the speed subprocess (same for both)."})
    speed_rounds: int = field(default=3, metadata={"help": "Passes over the prompts in the paired speed measurement (teacher and student alternate prompt by prompt)."})

    def __post_init__(self) -> None:
        if min(self.batch_size, self.gen_prompts, self.gen_prompt_tokens, self.max_new_tokens, self.threads,
               self.speed_rounds) < 1:
            raise ValueError("all LMEvalConfig fields must be positive.")


def _next_token_logprobs(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, 1:]) (B, T-1) for a plain HF causal LM or an ``LMStudent``."""
    if hasattr(model, "next_token_logprobs"):  # LMStudent: scores over the full vocabulary
        return model.next_token_logprobs(ids, mask)
    return _target_logprobs(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids)


def _target_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, 1:]) (B, T-1) from a plain causal LM's logits (B, T, V)."""
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


@torch.inference_mode()
def perplexity(model, sequences: Sequence[Sequence[int]], pad_id: int = 0, batch_size: int = 16) -> dict:
    """``{"ppl", "nll", "tokens"}`` over all predicted tokens of ``sequences`` (each starts with its start token)."""
    total, count = 0.0, 0
    for _, ids, mask in padded_batches(sequences, pad_id, batch_size, next(model.parameters()).device):
        lp = _next_token_logprobs(model, ids, mask)  # (B, T-1)
        valid = mask[:, 1:].bool()
        total -= lp[valid].double().sum().item()
        count += int(valid.sum())
    nll = total / max(count, 1)
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count}


@torch.inference_mode()
def teacher_scores(model, sequences: Sequence[Sequence[int]], pad_id: int = 0,
                   batch_size: int = 16) -> list[tuple[float, int, np.ndarray]]:
    """Per sequence, from one forward pass of a plain HF causal LM: ``(nll summed over its predicted tokens,
    their count, the top-1 id at each of its positions)``: what perplexity and agreement need of a teacher,
    and what kdops.lm.cache keeps so a later round does not run the teacher on the same text again."""
    out = []
    for s, ids, mask in padded_batches(sequences, pad_id, batch_size, next(model.parameters()).device):
        part = sequences[s:s + batch_size]
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        lp = (_target_logprobs(logits, ids) * mask[:, 1:]).double()
        top1 = logits.argmax(-1).cpu().numpy().astype(np.int32)
        for r, seq in enumerate(part):
            n = len(seq)
            out.append((-float(lp[r, : n - 1].sum()), max(0, n - 1), top1[r, :n].copy()))
    return out


def scores_perplexity(scores: Sequence[tuple[float, int, np.ndarray]]) -> dict:
    """``perplexity``'s dict from per-sequence teacher scores."""
    total, count = sum(x[0] for x in scores), sum(x[1] for x in scores)
    nll = total / max(count, 1)
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count}


@torch.inference_mode()
def top1_agreement(teacher, student, sequences: Sequence[Sequence[int]], pad_id: int = 0, batch_size: int = 16,
                   teacher_top1: Sequence[np.ndarray] | None = None) -> float:
    """Share of positions where teacher and student rank the same next token first (``teacher_top1``: the
    teacher's top-1 ids per sequence, e.g. cached; then ``teacher`` is not run)."""
    if teacher_top1 is None:
        teacher_top1 = [x[2] for x in teacher_scores(teacher, sequences, pad_id, batch_size)]
    same, count = 0, 0
    for s, ids, mask in padded_batches(sequences, pad_id, batch_size, next(student.parameters()).device):
        s_logits = student(ids, mask)
        s_top = (student.top1_full(s_logits) if hasattr(student, "top1_full") else s_logits.argmax(-1)).cpu()
        for r, t_top in enumerate(teacher_top1[s:s + batch_size]):
            n = len(t_top)
            same += int((torch.from_numpy(np.asarray(t_top, np.int64)) == s_top[r, :n]).sum())
            count += n
    return same / max(count, 1)


# ---------------------------------------------------------------------------------------------
# Speed and memory, one model per fresh subprocess


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _generator(kind: str, directory: str, device: str, max_new_tokens: int):
    """``(generate, parameter count)`` for a teacher dir (``kind='teacher'``) or a kdops LM student dir:
    ``generate(prompt ids)`` runs greedy decoding of exactly ``max_new_tokens`` and returns the new ids (1, n)."""
    from kdops.lm.decode import decode
    from kdops.lm.student import load_lm_student
    from kdops.lm.teacher import load_causal_lm

    # Both models decode with the same loop as served generation (kdops.lm.decode), with no EOS: every prompt
    # gets exactly max_new_tokens new tokens, so both do equal work.
    if kind == "teacher":
        model, _ = load_causal_lm(directory, device)

        def gen(p):
            return decode(model, torch.tensor([p], device=device), None, max_new_tokens)
        return gen, sum(p.numel() for p in model.parameters())
    student, _, _ = load_lm_student(directory, device)

    def gen(p):
        return decode(student.model, student.map_ids(torch.tensor([p], device=device)), None, max_new_tokens,
                      suppress_id=student.other_id)
    return gen, student.num_parameters()


def _timed(gen, prompt: list[int]) -> tuple[int, float]:
    """(new tokens, seconds) of one generation."""
    t0 = time.perf_counter()
    n = gen(prompt).shape[1]
    return n, time.perf_counter() - t0


def _measure_here(kind: str, directory: str, prompts: list[list[int]], max_new_tokens: int, device: str, threads: int) -> dict:
    """Load a teacher dir (``kind='teacher'``) or a kdops LM student dir and time greedy generation."""
    import threading

    torch.set_num_threads(threads)
    import transformers  # noqa: F401  (imported before the baseline so the libraries do not count)

    base, peak, stop = _rss_mb(), [0.0], threading.Event()

    def sample() -> None:  # RSS sampled every 5 ms: the peak includes transient load and KV-cache buffers
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    gen, params = _generator(kind, directory, device, max_new_tokens)
    with torch.inference_mode():
        gen(prompts[0])  # warm-up: first-call allocations and lazy initialisation are not speed
        # Memory is sampled over loading and the warm-up (a full generation of the same size as the timed ones);
        # the timed loop runs without the sampler thread, whose 5 ms psutil polls compete with generate's Python
        # loop for the GIL.
        stop.set()
        sampler.join()
        peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else max(peak[0], _rss_mb()) - base
        rates, new, seconds = [], 0, 0.0
        for p in prompts:
            n, dt = _timed(gen, p)
            rates.append(n / dt)
            new, seconds = new + n, seconds + dt
    # The median per-prompt rate is the headline: on a shared machine a burst of other load hits a few prompts,
    # and a median ignores them where a total would not; the mean rate is kept alongside.
    return {"tokens_per_s": float(np.median(rates)), "tokens_per_s_mean": new / seconds, "new_tokens": new, "seconds": seconds, "peak_mem_mb": peak_mb,
            "params": params, "device": device, "threads": threads}


def _measure_paired(teacher_dir: str, student_dir: str, prompts: list[list[int]], max_new_tokens: int, device: str,
                    threads: int, rounds: int) -> dict:
    """Both models in this process, generating prompt by prompt in alternation; per model the median rate."""
    torch.set_num_threads(threads)
    gens = {kind: _generator(kind, d, device, max_new_tokens)[0] for kind, d in (("teacher", teacher_dir),
                                                                                   ("student", student_dir))}
    rates: dict[str, list[float]] = {"teacher": [], "student": []}
    with torch.inference_mode():
        for gen in gens.values():
            gen(prompts[0])  # warm-up
        for r in range(rounds):
            for i, p in enumerate(prompts):
                for kind in (("teacher", "student") if (r + i) % 2 == 0 else ("student", "teacher")):
                    n, dt = _timed(gens[kind], p)
                    rates[kind].append(n / dt)
    pair = [s / t for s, t in zip(rates["student"], rates["teacher"])]
    return {kind: {"tokens_per_s": float(np.median(v)), "rates": v} for kind, v in rates.items()} | {
        "speedup_median_of_pairs": float(np.median(pair)), "rounds": rounds, "prompts": len(prompts)}


def measure_generation(kind: str, directory: str | Path, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                       device: str = "cpu", threads: int = 1) -> dict:
    """Tokens/s and peak memory of one model, measured in a fresh Python process."""
    return _run_measure({"mode": "alone", "kind": kind, "directory": str(directory),
                         "prompts": [list(map(int, p)) for p in prompts], "max_new_tokens": max_new_tokens,
                         "device": device, "threads": threads}, str(directory))


def _run_measure(req: dict, what: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "kdops.lm.evaluate"], input=json.dumps(req), capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"speed measurement of {what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_generation_paired(teacher_dir: str | Path, student_dir: str | Path, prompts: Sequence[Sequence[int]],
                              max_new_tokens: int, device: str = "cpu", threads: int = 1, rounds: int = 3) -> dict:
    """Tokens/s of teacher and student measured together in one fresh Python process, prompt by prompt in
    alternation, so a slow phase of a shared machine slows both: ``{"teacher": {"tokens_per_s", "rates"},
    "student": {...}, "speedup_median_of_pairs", ...}``."""
    return _run_measure({"mode": "paired", "teacher_dir": str(teacher_dir), "student_dir": str(student_dir),
                         "prompts": [list(map(int, p)) for p in prompts], "max_new_tokens": max_new_tokens,
                         "device": device, "threads": threads, "rounds": rounds}, f"{teacher_dir} and {student_dir}")


@dataclass
class LMReport:
    teacher: dict
    student: dict
    agreement_top1: float | None = None
    ppl_by_domain: dict = field(default_factory=dict)  # domain -> {"teacher": ppl, "student": ppl}

    def summary(self) -> dict:
        """Flat, gate-compatible numbers (higher-is-better and lower-is-better named explicitly)."""
        t, s = self.teacher, self.student
        out = {
            "teacher_ppl": t.get("ppl"), "student_ppl": s.get("ppl"),
            "ppl_ratio": s["ppl"] / t["ppl"] if t.get("ppl") and s.get("ppl") else None,
            "teacher_tokens_per_s": t.get("tokens_per_s"), "student_tokens_per_s": s.get("tokens_per_s"),
            "speedup": s["tokens_per_s"] / t["tokens_per_s"] if t.get("tokens_per_s") and s.get("tokens_per_s") else None,
            "teacher_params": t.get("params"), "student_params": s.get("params"),
            "param_ratio": s["params"] / t["params"] if t.get("params") and s.get("params") else None,
            "peak_mem_mb": {"teacher": t.get("peak_mem_mb"), "student": s.get("peak_mem_mb")},
            "agreement_top1": self.agreement_top1,
        }
        for dom, v in self.ppl_by_domain.items():
            out[f"ppl_ratio/{dom}"] = v["student"] / v["teacher"]
            out[f"student_ppl/{dom}"] = v["student"]
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary()}


if __name__ == "__main__":  # the subprocess side of measure_generation and measure_generation_paired
    req = json.loads(sys.stdin.read())
    if req["mode"] == "paired":
        print(json.dumps(_measure_paired(req["teacher_dir"], req["student_dir"], req["prompts"], req["max_new_tokens"],
                                         req["device"], req["threads"], req["rounds"])))
    else:
        print(json.dumps(_measure_here(req["kind"], req["directory"], req["prompts"], req["max_new_tokens"],
                                       req["device"], req["threads"])))
