"""One causal-LM distillation round and its evaluation: what the LM flow, the CLI and bench/lm.py run.

``run_lm_round``: carve a student from the teacher (first round) or continue the champion (later rounds),
distil it on the new texts plus a replay sample of earlier ones (their teacher top-k are cache hits), fit a
trimmed student's tail (context-free on the training text; the context head, kdops.lm.tail.TailHead, on a
seeded share of the round's sentences against the teacher's full distributions), and save it with lineage.
``evaluate_lm``: perplexity per domain for teacher and student, top-1 agreement and, optionally, generation
speed and peak memory; returns an ``LMReport`` whose summary the LM gate reads.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

from kdops.artifacts import Lineage
from kdops.lm.cache import LMSoftLabelCache
from kdops.lm.distill import LMDistillConfig, distill_round, replay_sample
from kdops.lm.evaluate import (LMEvalConfig, LMReport, measure_generation, measure_generation_paired, perplexity,
                               scores_perplexity, top1_agreement)
from kdops.lm.student import (corpus_vocabulary, layer_influence, load_lm_student, prune_layers, prune_mlp,
                               save_lm_student, select_by_influence, select_layers)
from kdops.lm.tail import TailConfig, fit_tail, fit_tail_head
from kdops.lm.teacher import HFCausalLMTeacher
from kdops.replay import ReplayBuffer, fraction_to_share
from kdops.trainer import processes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LMShape:
    """How a first-round student is carved from the teacher (later rounds keep the champion's shape)."""

    layers: int = field(default=10, metadata={"help": "Teacher decoder layers the student keeps."})
    strategy: str = field(default="influence", metadata={"help": "Which layers: influence (the most influential on the round's text, kdops.lm.student.layer_influence), first_last, first or even."})
    trim_vocab: int | None = field(default=8192, metadata={"help": "Keep the ids seen in the first round's text plus the first N ids (None: full vocabulary)."})
    vocab_share: float = field(default=0.8, metadata={"help": "Share of the first round's text whose ids are kept; ids only in the rest train <other>."})
    tail_rank: int = field(default=64, metadata={"help": "A trimmed student's context tail (kdops.lm.tail.TailHead), refitted every round: rank of its dropped-id softmax (0: context-free tail only)."})
    intermediate: int | None = field(default=None, metadata={"help": "MLP neurons each kept layer keeps, the most active on the round's text (kdops.lm.student.prune_mlp; None: all)."})

    def __post_init__(self) -> None:
        if not 0.0 < self.vocab_share <= 1.0:
            raise ValueError("vocab_share must be in (0, 1].")
        if self.layers < 1 or (self.trim_vocab is not None and self.trim_vocab < 0) or self.tail_rank < 0:
            raise ValueError("layers must be >= 1, trim_vocab >= 0 (or None) and tail_rank >= 0.")
        if self.intermediate is not None and self.intermediate < 1:
            raise ValueError("intermediate must be >= 1 (or None: keep every MLP neuron).")
        if self.strategy not in ("influence", "first_last", "first", "even"):
            raise ValueError(f"strategy must be influence, first_last, first or even; got {self.strategy!r}.")


@dataclass
class LMRoundResult:
    artifact: Path
    history: list[dict]
    info: dict  # cache stats, timings, layers, replay size


def run_lm_round(teacher: HFCausalLMTeacher, cache: LMSoftLabelCache, texts: Sequence[str], out_dir: str | Path,
                 cfg: LMDistillConfig = LMDistillConfig(), shape: LMShape = LMShape(), max_length: int = 48,
                 champion_dir: str | Path | None = None, replay: ReplayBuffer | None = None,
                 lineage: Mapping | None = None, device: str = "cpu", progress: bool = True,
                 tail: TailConfig | None = None, monitor_texts: Sequence[str] = (),
                 checkpoint_dir: str | Path | None = None) -> LMRoundResult:
    """Distil one round into ``out_dir`` (written atomically) and return where it went. ``tail``: how the context
    tail is fitted (default: ``TailConfig(rank=shape.tail_rank)``). ``monitor_texts``: held-out texts (never
    trained on) whose perplexity is followed during distillation (``info["heldout_curve"]``). ``replay``: the
    reservoir the round draws earlier text from (``cfg.replay_fraction`` of every batch). ``checkpoint_dir``: where
    the distillation checkpoints, so that a killed round resumes."""
    t0 = time.perf_counter()
    tail = tail if tail is not None else TailConfig(rank=shape.tail_rank)
    seqs = teacher.encode(list(texts), max_length)
    student = None
    if champion_dir is not None:
        student, _, meta = load_lm_student(champion_dir, device=device)
        layers = meta.lineage.details.get("layers")
    trimmed = student.trimmed if student is not None else shape.trim_vocab is not None
    # The context head is fitted on a seeded share of this round's sentences; with tail.holdout they are also
    # held out of distillation (and out of the kept vocabulary), and the student's perplexity on them is
    # followed during training.
    calibration: list[list[int]] = []
    n_cal = min(tail.calibration_max, int(round(tail.calibration_fraction * len(seqs))))
    if trimmed and tail.rank > 0 and n_cal >= 2 and len(seqs) - n_cal >= 2 and hasattr(teacher, "model"):
        held = set(random.Random(cfg.seed + 1).sample(range(len(seqs)), n_cal))
        calibration = [s for i, s in enumerate(seqs) if i in held]
        if tail.holdout:
            seqs = [s for i, s in enumerate(seqs) if i not in held]
    kd_note = None
    if not hasattr(teacher, "model"):  # served elsewhere (an API): no layers to carve, maybe no top-k to match
        cfg, kd_note = _remote_teacher_cfg(teacher, cfg, seqs)
        if student is None:
            student, layers = teacher.new_student(shape.layers, seed=cfg.seed), list(range(shape.layers))
    if student is None:
        keep = None
        if shape.trim_vocab is not None:
            # The vocabulary comes from a seeded share of the text only: the rest then holds ids the student does
            # not keep, as unseen text will, so <other> is trained at a realistic rate (all text: p(<other>) was
            # 0.2 % where 3 % of held-out tokens needed it).
            vocab_seqs = replay_sample(seqs, max(1, int(round(shape.vocab_share * len(seqs)))), cfg.seed)
            keep = corpus_vocabulary(vocab_seqs, [teacher.start_id, teacher.eos_id, teacher.pad_id], shape.trim_vocab)
        sample = replay_sample(seqs, 128, cfg.seed)  # a seeded calibration sample of the round's text
        if shape.strategy == "influence":
            layers = select_by_influence(layer_influence(teacher.model, sample, teacher.pad_id), shape.layers)
        else:
            layers = select_layers(teacher.model.config.num_hidden_layers, shape.layers, shape.strategy)
        student = prune_layers(teacher.model, layers, keep)
        if shape.intermediate is not None:  # then width: the kept layers' most active MLP neurons
            prune_mlp(student, shape.intermediate, sample, teacher.pad_id)
    drawn = replay.draw(len(seqs), fraction_to_share(cfg.replay_fraction)) if replay is not None else None
    replay_seqs = teacher.encode(drawn["text"].tolist(), max_length) if drawn is not None and len(drawn) else []
    monitor = teacher.encode(list(monitor_texts), max_length) if monitor_texts else []
    heldout = (calibration if tail.holdout else []) + monitor
    res = distill_round(student, teacher, cache, seqs, cfg, replay=replay_seqs, pad_id=teacher.pad_id, device=device,
                        progress=progress, heldout=heldout, heldout_every=max(1, cfg.steps // 8),
                        checkpoint_dir=checkpoint_dir)
    tail_info, head_info = None, None
    if student.trimmed:  # <other>'s spread over the dropped ids, from this round's text and cached teacher top-k
        student.set_head(None)  # a champion's head was fitted to the champion's hidden states
        pool = [list(s) for s in [*seqs, *replay_seqs] if len(s) > 1]
        topk = cache.get_or_compute_topk(teacher, pool, cfg.topk) if cfg.alpha < 1.0 else None
        fit = fit_tail(student.full_vocab_size, student.keep_ids.cpu(), pool, topk, seed=cfg.seed)
        student.set_tail(fit.logprob)
        tail_info = fit.summary()
        if calibration:
            hfit = fit_tail_head(student, teacher.model, calibration, teacher.pad_id, tail,
                                 teacher_embedding=teacher.model.get_input_embeddings().weight.detach(), progress=progress)
            head_info = {**hfit.summary(), "installed": hfit.info["best_step"] > 0}
            if head_info["installed"]:  # it beat the context-free tail on held-out positions
                student.set_tail(hfit.tail_logprob)
                student.set_head(hfit.head)
    lin = dict(lineage or {})
    lin = Lineage(
        teacher_id=teacher.id, snapshot_ids=lin.pop("snapshot_ids", {}), cache_key=lin.pop("cache_key", ""),
        parent_version=lin.pop("parent_version", None), config={"distill": res["config"], "shape": asdict(shape)},
        details={"layers": layers, "trim_vocab": shape.trim_vocab if champion_dir is None else None,
                 "intermediate": int(student.config.intermediate_size),
                 "parent_artifact": str(champion_dir) if champion_dir else None, "sequences": len(seqs),
                 "replay": len(replay_seqs), "tail": tail_info, "tail_head": head_info,
                 "calibration_sequences": len(calibration), "calibration_held_out": tail.holdout,
                 "monitor_sequences": len(monitor_texts), "teacher_kd": kd_note, **lin},
    )
    procs = processes(device)
    if procs.is_main:  # under a launcher every process trained the same weights; the main one writes them
        save_lm_student(out_dir, student.cpu(), teacher.tokenizer, lineage=lin, max_length=max_length)
    info = {k: v for k, v in res.items() if k != "history"}
    info.update(layers=layers, tail=tail_info, tail_head=head_info, calibration_sequences=len(calibration),
                seconds=round(time.perf_counter() - t0, 1))
    return procs.broadcast(LMRoundResult(Path(out_dir), res["history"], info))


def _remote_teacher_cfg(teacher, cfg: LMDistillConfig, seqs) -> tuple[LMDistillConfig, str]:
    """A teacher without local weights: token-level KD over the top-k it can return (at most ``max_topk``) when its
    token ids are ours; else sequence-level KD on its generations only (said in the log and the lineage)."""
    if teacher.token_level_for(seqs[:1]):
        return replace(cfg, topk=min(cfg.topk, teacher.max_topk)), f"token-level (top {min(cfg.topk, teacher.max_topk)}) and sequence-level"
    log.warning("teacher %s: its token ids are not the student's (or it returns no log-probs): sequence-level KD only",
                teacher.id)
    return replace(cfg, alpha=1.0, seq_kd_weight=max(cfg.seq_kd_weight, 1.0)), "sequence-level only (no matching token log-probs)"


def evaluate_lm(student_dir: str | Path, teacher: HFCausalLMTeacher, texts_by_domain: Mapping[str, Sequence[str]],
                max_length: int = 48, speed: bool = False, eval_cfg: LMEvalConfig = LMEvalConfig(),
                device: str = "cpu", cache: LMSoftLabelCache | None = None) -> LMReport:
    """Perplexity per domain (teacher and student on the same tokens), agreement, and optionally speed.
    With ``cache``, the teacher's scores of each sequence come from (and go to) it: a later round evaluating on
    the same held-out text runs only the student."""
    student, _, _ = load_lm_student(student_dir, device=device)

    def score(seqs):
        if cache is None:
            return teacher.scores(seqs)
        return cache.get_or_compute_scores(teacher.id, seqs, teacher.scores)

    by_domain, all_seqs, all_scores = {}, [], []
    t_tot, s_tot = {"nll": 0.0, "tokens": 0}, {"nll": 0.0, "tokens": 0}
    for dom, texts in texts_by_domain.items():
        seqs = teacher.encode(list(texts), max_length)
        if not seqs:
            continue
        scores = score(seqs)
        t, s = scores_perplexity(scores), perplexity(student, seqs, teacher.pad_id)
        all_scores += scores
        by_domain[dom] = {"teacher": t["ppl"], "student": s["ppl"], "tokens": t["tokens"]}
        for tot, r in ((t_tot, t), (s_tot, s)):
            tot["nll"] += r["nll"] * r["tokens"]
            tot["tokens"] += r["tokens"]
        all_seqs += seqs
    if not all_seqs:
        raise ValueError("evaluate_lm needs at least one non-empty text.")
    t_all = {"ppl": math.exp(t_tot["nll"] / max(1, t_tot["tokens"])), "tokens": t_tot["tokens"],
             "params": teacher.num_parameters()}
    s_all = {"ppl": math.exp(s_tot["nll"] / max(1, s_tot["tokens"])), "tokens": s_tot["tokens"],
             "params": student.num_parameters()}
    if speed and getattr(teacher, "directory", None) is None:  # a teacher behind an API: no local speed to compare
        log.info("teacher %s has no local weights: speed not measured", teacher.id)
    elif speed:
        prompts = [s[: eval_cfg.gen_prompt_tokens] for s in all_seqs[: eval_cfg.gen_prompts]]
        # Memory (and each model's speed alone) in one fresh process per model; the reported tokens/s from both
        # models in one process, alternating prompt by prompt, so a slow phase of the machine slows both.
        alone = {kind: measure_generation(kind, where, prompts, eval_cfg.max_new_tokens, device, eval_cfg.threads)
                 for kind, where in (("teacher", teacher.directory), ("student", student_dir))}
        paired = measure_generation_paired(teacher.directory, student_dir, prompts, eval_cfg.max_new_tokens, device,
                                           eval_cfg.threads, eval_cfg.speed_rounds)
        for kind, into in (("teacher", t_all), ("student", s_all)):
            into.update(alone[kind])
            into.update(tokens_per_s_alone=alone[kind]["tokens_per_s"], tokens_per_s=paired[kind]["tokens_per_s"],
                        tokens_per_s_paired=paired[kind]["rates"])
        s_all["speedup_median_of_pairs"] = paired["speedup_median_of_pairs"]
    agree = top1_agreement(None, student, all_seqs[:200], teacher.pad_id, teacher_top1=[x[2] for x in all_scores[:200]])
    return LMReport(teacher=t_all, student=s_all, agreement_top1=agree,
                    ppl_by_domain={d: {"teacher": v["teacher"], "student": v["student"]} for d, v in by_domain.items()})
