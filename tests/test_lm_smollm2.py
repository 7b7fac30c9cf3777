"""The real teacher: SmolLM2-135M-Instruct from the shipped GGUF, materialised as safetensors (slow: ~1 min)."""

from __future__ import annotations

import math

import pytest
import torch


@pytest.mark.slow
def test_smollm2_teacher_topk_generate_and_pruned_student(tmp_path):
    from kdops.lm.evaluate import perplexity
    from kdops.lm.student import prune_layers, select_layers
    from kdops.lm.teacher import HFCausalLMTeacher, smollm2_dir

    torch.set_num_threads(1)
    d = smollm2_dir()  # cached under the kdops home after the first call; never GGUF-loaded again
    assert (d / "model.safetensors").exists() and smollm2_dir() == d
    teacher = HFCausalLMTeacher(d)
    assert teacher.model.config.num_hidden_layers == 30 and teacher.vocab_size == 49152
    assert 130e6 < teacher.num_parameters() < 140e6
    seqs = teacher.encode(["This movie is a delightful surprise.", "The plot is dull and the acting is worse."])
    (ids, lps), _ = teacher.topk(seqs, k=8)
    assert ids.shape == (len(seqs[0]) - 1, 8) and float(lps.max()) <= 0.0
    ppl = perplexity(teacher.model, seqs, teacher.pad_id)["ppl"]
    assert 2 < ppl < 2000  # a real LM, not a random one (random ~ 49,152)
    gen = teacher.generate(seqs[:1], max_new_tokens=5)
    assert 1 <= len(gen[0]) <= 5
    student = prune_layers(teacher.model, select_layers(30, 7))
    assert student.num_parameters() / teacher.num_parameters() < 0.40
    assert math.isfinite(perplexity(student, seqs, teacher.pad_id)["ppl"])
