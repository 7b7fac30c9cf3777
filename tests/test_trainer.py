"""The one trainer (kdops.trainer) on tiny models built in the test, and the one replay reservoir (kdops.replay)."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from kdops.replay import ReplayBuffer, fraction_to_share
from kdops.trainer import Trainer, TrainerConfig, learning_rate

X = torch.linspace(-1, 1, 80).reshape(20, 4)
Y = X @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1


class Rows:
    """Batches of row indices; each epoch a seeded permutation (``endless``: one random batch after another)."""

    def __init__(self, n=20, batch_size=4, seed=0, endless=False):
        self.n, self.bs, self.rng, self.endless = n, batch_size, np.random.default_rng(seed), endless
        self.batches_per_epoch = None if endless else math.ceil(n / batch_size)

    def epoch(self, epoch, progress, batch_share):
        if self.endless:
            return self._stream()
        order = self.rng.permutation(self.n)
        return [order[i:i + self.bs] for i in range(0, self.n, self.bs)]

    def _stream(self):
        while True:
            yield self.rng.choice(self.n, self.bs, replace=False)

    def state(self):
        return self.rng.bit_generator.state

    def load_state(self, state):
        self.rng.bit_generator.state = state


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))


def mse(m, idx, progress):
    return torch.nn.functional.mse_loss(m(X[idx]).squeeze(-1), Y[idx]), {"progress": progress}


def fit(cfg, source=None, net=None, **kw):
    net = net if net is not None else model()
    res = Trainer(cfg).fit(net, source or Rows(), mse, progress=False, **kw)
    return net, res


def test_epochs_steps_and_accumulation_count_optimiser_steps():
    _, res = fit(TrainerConfig(epochs=3, lr=1e-2))  # 20 rows, batches of 4: 5 steps an epoch
    assert [r["step"] for r in res.history] == [5, 10, 15] and res.step == 15 and len(res.steps) == 15
    assert res.history[-1]["progress"] == 14 / 15  # logs of the epoch's last step: the progress it trained at
    _, res = fit(TrainerConfig(epochs=3, lr=1e-2, grad_accum=2))  # 5 micro-batches: 2 + 2 + 1 per epoch
    assert [r["step"] for r in res.history] == [3, 6, 9]
    _, res = fit(TrainerConfig(epochs=3, max_steps=8, lr=1e-2))  # capped mid-epoch
    assert [r["step"] for r in res.history] == [5, 8]
    _, res = fit(TrainerConfig(epochs=None, max_steps=12, lr=1e-2))  # step mode over a finite source
    assert [(r["epoch"], r["step"]) for r in res.history] == [(0, 5), (1, 10), (2, 12)]
    _, res = fit(TrainerConfig(epochs=None, max_steps=7, lr=1e-2), Rows(endless=True))  # an endless stream
    assert [(r["epoch"], r["step"]) for r in res.history] == [(0, 7)] and [r["step"] for r in res.steps] == list(range(7))
    with pytest.raises(ValueError, match="needs max_steps"):
        TrainerConfig(epochs=None)


def test_learning_rate_warms_up_then_decays():
    assert [learning_rate(1.0, s, 10, 2, "linear") for s in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5,
                                                                          0.375, 0.25, 0.125]
    cos = [learning_rate(1.0, s, 10, 2, "cosine") for s in range(10)]
    assert cos[:3] == [0.5, 1.0, 1.0] and cos[6] == pytest.approx(0.5) and cos[9] == pytest.approx(0.0380602337)
    _, res = fit(TrainerConfig(epochs=2, lr=0.1, warmup_share=0.2))  # 10 steps, warm-up 2: the same rates x 0.1
    assert [r["lr"] for r in res.steps] == pytest.approx([0.05, 0.1, 0.1, 0.0875, 0.075, 0.0625, 0.05, 0.0375, 0.025, 0.0125])


class Kill(Exception):
    pass


def _state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_resume_after_a_kill_gives_the_uninterrupted_weights(tmp_path):
    cfg = TrainerConfig(epochs=4, lr=1e-2, grad_accum=2)
    full, ref = fit(cfg)

    def die_at_epoch(record):
        if record["epoch"] == 2:
            raise Kill

    with pytest.raises(Kill):  # killed after epoch 2's steps, before its checkpoint: epochs 0 and 1 are kept
        fit(cfg, checkpoint_dir=tmp_path / "ck", on_record=die_at_epoch)
    assert json.loads((tmp_path / "ck" / "state.json").read_text())["epoch"] == 1
    resumed, res = fit(cfg, checkpoint_dir=tmp_path / "ck")  # a fresh process: new model, new source, same seed
    for k, v in _state(full).items():
        assert torch.equal(v, resumed.state_dict()[k]), k  # dropout masks, batch order and Adam moments all restored
    assert res.history == ref.history and res.steps == ref.steps
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "optimizer.safetensors", "rng.safetensors", "state.json", "weights.safetensors"]  # no pickle


def test_resume_mid_stream_in_step_mode(tmp_path):
    cfg = TrainerConfig(epochs=None, max_steps=10, lr=1e-2, checkpoint_every=3)
    full, ref = fit(cfg, Rows(endless=True))
    calls = {"n": 0}

    def dying(m, idx, progress):
        calls["n"] += 1
        if calls["n"] == 8:  # during step 8: the checkpoint of step 6 is the last one
            raise Kill
        return mse(m, idx, progress)

    net = model()  # built before the trainer seeds torch, as fit() does
    with pytest.raises(Kill):
        Trainer(cfg).fit(net, Rows(endless=True), dying, checkpoint_dir=tmp_path / "ck", progress=False)
    assert json.loads((tmp_path / "ck" / "state.json").read_text())["step"] == 6
    resumed, res = fit(cfg, Rows(endless=True), checkpoint_dir=tmp_path / "ck")
    for k, v in _state(full).items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert [r["loss"] for r in res.steps] == [r["loss"] for r in ref.steps]


def test_early_stopping_stops_at_the_expected_epoch_and_keeps_the_best_weights(tmp_path):
    scores, kept = iter([0.5, 0.7, 0.6, 0.65, 0.9, 0.95]), {}

    def validate(net):
        kept[len(kept)] = _state(net)  # the weights each validation saw
        return {"val_score": next(scores)}

    net, res = fit(TrainerConfig(epochs=6, lr=1e-2, early_stopping_patience=2), validate=validate,
                   score=lambda m: m["val_score"], checkpoint_dir=tmp_path / "ck")
    # best at epoch 1 (0.7); epochs 2 and 3 do not beat it: stop after epoch 3, never see 0.9
    assert [r["epoch"] for r in res.history] == [0, 1, 2, 3] and res.best_epoch == 1 and res.best_step == 10
    assert [r["val_score"] for r in res.history] == [0.5, 0.7, 0.6, 0.65]
    for k, v in kept[1].items():
        assert torch.equal(v, net.state_dict()[k]), k  # the best validated weights, not the last
    # a re-run of the stopped run does nothing more and still hands back the best weights (from best.safetensors)
    again, res2 = fit(TrainerConfig(epochs=6, lr=1e-2, early_stopping_patience=2), validate=validate,
                      score=lambda m: m["val_score"], checkpoint_dir=tmp_path / "ck")
    assert len(res2.history) == 4 and res2.step == 20 and len(kept) == 4
    for k, v in kept[1].items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_validation_every_n_steps_in_step_mode():
    seen = []
    _, res = fit(TrainerConfig(epochs=None, max_steps=10, lr=1e-2, eval_every=4), Rows(endless=True),
                 validate=lambda net: seen.append(net.training) or {"n": len(seen)})
    assert res.evals == [{"step": 4, "n": 1}, {"step": 8, "n": 2}, {"step": 10, "n": 3}]
    assert seen == [False, False, False]  # validated in eval mode


def _rows(n, domain, start=0):
    return pd.DataFrame({"id": [f"{domain}{i}" for i in range(start, start + n)], "text": [f"t{i}" for i in range(n)],
                         "label": "pos", "domain": domain})


def test_replay_reservoir_keeps_a_share_per_domain():
    buf = ReplayBuffer(capacity=90, seed=0)
    buf.add(_rows(300, "movie"))
    assert len(buf) == 90 and buf.seen == {"movie": 300}
    buf.add(_rows(60, "tweets"))
    assert buf.rows["domain"].value_counts().to_dict() == {"movie": 45, "tweets": 45}
    buf.add(_rows(30, "nyt"))
    assert buf.rows["domain"].value_counts().to_dict() == {"movie": 30, "tweets": 30, "nyt": 30}
    assert len(buf.draw(n_new=40, share=0.5)) == 20 and len(buf.draw(n_new=40, share=0.0)) == 0
    # a causal LM's text rows (no id, no label) go into the same reservoir
    lm = ReplayBuffer.of([pd.DataFrame({"text": ["a b", "c d", "e f"], "domain": "movie"}),
                          pd.DataFrame({"text": ["g h"], "domain": None})], capacity=10)
    assert len(lm) == 4 and lm.seen == {"movie": 3, "*": 1}
    # the LM's per-batch fraction f draws f / (1 - f) rows per new row: f of all the round's rows
    assert fraction_to_share(0.25) == pytest.approx(1 / 3) and fraction_to_share(0.0) == 0.0


def test_lm_batches_hold_the_replay_fraction():
    from kdops.lm.distill import LMDistillConfig, SequenceBatches

    source = SequenceBatches(n_new=10, n_old=5, n_gens=3, cfg=LMDistillConfig(batch_size=8, replay_fraction=0.25))
    batches = [b for b, _ in zip(source.epoch(0, 0.0, 0.01), range(50))]
    assert {sum(i >= 10 for i in b.idx) for b in batches} == {2}  # round(0.25 * 8) replayed rows in every batch
    assert {len(b.idx) for b in batches} == {8} and {len(b.picks) for b in batches} == {2}


def test_lm_round_resumes_from_its_checkpoint(tmp_path, tiny_lm_tokenizer, monkeypatch):
    import kdops.lm.distill as lm_distill
    from kdops.lm.cache import LMSoftLabelCache
    from kdops.lm.distill import LMDistillConfig, distill_round
    from kdops.lm.student import prune_layers
    from kdops.lm.teacher import HFCausalLMTeacher
    from tests.conftest import WORDS, make_tiny_lm

    make_tiny_lm(len(tiny_lm_tokenizer), layers=3, seed=4).save_pretrained(str(tmp_path / "t"))
    tiny_lm_tokenizer.save_pretrained(str(tmp_path / "t"))
    teacher = HFCausalLMTeacher(tmp_path / "t")
    rng = np.random.default_rng(0)
    seqs = teacher.encode([" ".join(rng.choice(WORDS, 8)) for _ in range(30)], 16)
    cfg = LMDistillConfig(steps=9, batch_size=4, topk=8, lr=1e-3, seq_kd_weight=0.5, seq_kd_new_tokens=4)
    cache = LMSoftLabelCache(tmp_path / "c.sqlite")

    def run(checkpoint_dir=None):
        student = prune_layers(teacher.model, [0, 2])
        out = distill_round(student, teacher, cache, seqs[:20], cfg, replay=seqs[20:], pad_id=teacher.pad_id,
                            progress=False, checkpoint_dir=checkpoint_dir, checkpoint_every=4)
        return student, out

    full, ref = run()
    real, calls = lm_distill.token_kd_loss, {"n": 0}

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 7:  # during step 7: the checkpoint of step 4 is the last one
            raise Kill
        return real(*a, **kw)

    monkeypatch.setattr(lm_distill, "token_kd_loss", dying)
    with pytest.raises(Kill):
        run(tmp_path / "ck")
    monkeypatch.setattr(lm_distill, "token_kd_loss", real)
    resumed, out = run(tmp_path / "ck")
    assert out["history"] == ref["history"] and len(out["history"]) == 9
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_curriculum_hard_share_rises_stage_by_stage_through_the_trainer():
    """distill's batch source with the curriculum on, drawn by the trainer (4 epochs, gradient accumulation 2): the
    realized share of hard rows (teacher entropy above the median) per fifth of training follows 20 % -> 80 %."""
    from kdops.distill import RowBatches
    from kdops.schedules import Curriculum

    n = 400
    difficulty = np.random.default_rng(1).random(n)
    hard = difficulty > np.median(difficulty)
    source = RowBatches(np.full(n, 10), 8, seed=3, difficulty=difficulty, curriculum=Curriculum(0.2, 0.8))
    seen = []

    def recording(m, idx, progress):
        seen.append((progress, hard[idx].mean()))
        return mse(m, np.asarray(idx) % 20, progress)

    Trainer(TrainerConfig(epochs=4, grad_accum=2, device="cpu")).fit(model(), source, recording, progress=False)
    assert len(seen) == 4 * 50  # every micro-batch of every epoch
    share = [float(np.mean([h for _, h in seen[i * 40:(i + 1) * 40]])) for i in range(5)]
    expected = [0.2 + 0.6 * (i + 0.5) / 5 for i in range(5)]  # the schedule at each fifth's middle
    assert np.allclose(share, expected, atol=0.04), share
    assert share == sorted(share) and share[0] < 0.3 and share[-1] > 0.7
    # without a curriculum the same source is a shuffled pass over the rows: half of them hard throughout
    plain = RowBatches(np.full(n, 10), 8, seed=3)
    rows = np.concatenate(plain.epoch(0, 0.0, 0.01))
    assert sorted(rows.tolist()) == list(range(n))
