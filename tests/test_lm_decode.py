"""kdops.lm.decode against transformers' generate on a tiny random Llama: same greedy ids, padding, EOS, suppression."""

from __future__ import annotations

import pytest
import torch

from kdops.lm.decode import decode
from kdops.lm.teacher import pad_batch
from tests.test_lm import tiny_llama


def _hf(model, ids, mask, n, **kw):
    model.generation_config.eos_token_id = None  # the tiny config's EOS (2) only where a test passes one
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                          **kw)[:, ids.shape[1]:]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_matches_generate_batch_of_one(seed):
    model = tiny_llama(layers=3, seed=seed)
    ids = torch.tensor([[1, 7, 33, 12, 9]])
    want = _hf(model, ids, torch.ones_like(ids), 12, min_new_tokens=12)
    assert torch.equal(decode(model, ids, None, 12), want)
    assert torch.equal(decode(model, ids, torch.ones_like(ids), 12), want)  # an all-ones mask is no padding


def test_left_padded_batch_matches_generate_and_each_row_alone():
    model = tiny_llama(layers=3, seed=4)
    prompts = [[1, 5, 8], [1, 40, 41, 42, 43, 44, 45], [1, 9]]
    ids, mask = pad_batch(prompts, 0, left=True)
    got = decode(model, ids, mask, 10)
    assert torch.equal(got, _hf(model, ids, mask, 10, min_new_tokens=10))
    for row, p in enumerate(prompts):  # padding does not change a row's continuation
        assert torch.equal(got[row], decode(model, torch.tensor([p]), None, 10)[0])


def test_eos_ends_rows_pads_them_and_stops_when_all_ended():
    model = tiny_llama(layers=2, seed=0)
    prompts = [[1, 5, 8], [1, 40, 41, 42]]
    ids, mask = pad_batch(prompts, 0, left=True)
    free = decode(model, ids, mask, 8)
    eos = int(free[0, 2])  # the id row 0 produces third: make it the EOS
    got = decode(model, ids, mask, 8, eos_id=eos)
    assert torch.equal(got, _hf(model, ids, mask, 8, eos_token_id=eos))
    first = (got[0] == eos).nonzero()[0, 0]
    assert first <= 2 and bool((got[0, first + 1:] == 0).all())
    alone = decode(model, ids[:1, -3:], None, 8, eos_id=eos)  # one row: decoding stops at its EOS
    assert alone.shape[1] == int(first) + 1 and int(alone[0, -1]) == eos


def test_suppressed_id_and_min_new_tokens():
    model = tiny_llama(layers=2, seed=3)
    ids = torch.tensor([[1, 5, 8, 13]])
    free = decode(model, ids, None, 6)
    banned = int(free[0, 0])
    got = decode(model, ids, None, 6, suppress_id=banned)
    assert banned not in got[0].tolist()
    assert torch.equal(got, _hf(model, ids, None, 6, suppress_tokens=[banned]))
    eos = int(free[0, 0])  # would end the row at once; min_new_tokens forbids it for 4 steps
    held = decode(model, ids, None, 6, eos_id=eos, min_new_tokens=4)
    assert held.shape[1] >= 5 and eos not in held[0, :4].tolist()


def test_sampling_uses_temperature_and_generator_and_streams_each_step():
    model = tiny_llama(layers=2, seed=0)
    ids = torch.tensor([[1, 5, 8]])
    steps = []
    a = decode(model, ids, None, 20, temperature=1.5, generator=torch.Generator().manual_seed(7), on_step=steps.append)
    b = decode(model, ids, None, 20, temperature=1.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.equal(a, decode(model, ids, None, 20))
    assert torch.equal(torch.stack(steps, 1), a)
    assert decode(model, ids, None, 0).shape == (1, 0)
    with pytest.raises(ValueError):
        decode(model, ids, None, 3, temperature=-1.0)
