"""train_teacher: fine-tune a local encoder on labelled rows, early stopping, cache, one-line errors."""

import json
from dataclasses import replace

import pandas as pd
import pytest
import torch

from kdops import corpora
from kdops.data import DataError
from kdops.errors import LabelMismatch, UserError
from kdops.teacher import HFTeacher, TeacherBaseError, TeacherTrainConfig, _cache_key, train_teacher


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A 2-layer, 32-wide BERT saved as a local encoder directory (random weights, built in the test)."""
    from tests.conftest import make_teacher, make_tokenizer

    d = tmp_path_factory.mktemp("tinybase")
    tok = make_tokenizer(d)
    make_teacher(tok, num_labels=2).save_pretrained(str(d))
    return d


def word_rows(n: int = 40) -> pd.DataFrame:
    good, bad = "good great fine love happy".split(), "bad awful terrible hate sad".split()
    return pd.DataFrame({"text": [f"the movie was {(good if i % 2 else bad)[i % 5]}" for i in range(n)],
                         "label": ["pos" if i % 2 else "neg" for i in range(n)]})


@pytest.mark.slow
def test_train_teacher_writes_a_loadable_teacher_and_caches(tmp_path):
    rows = corpora.load("questions", split="train", limit_per_domain=60).rows
    labels = list(corpora.QUESTION_LABELS)
    cfg = TeacherTrainConfig(epochs=1, batch_size=16, max_length=32, limit_per_domain=None)
    seen = []
    res = train_teacher(tmp_path / "t", rows, labels, cfg, progress=False, on_epoch=seen.append)
    assert not res.cached and res.path == tmp_path / "t"
    assert len(res.history) == 1 and seen == res.history
    assert set(res.history[0]) >= {"epoch", "train_loss", "val_accuracy", "seconds"}
    assert 0.0 <= res.best_val_accuracy <= 1.0
    meta = json.loads((res.path / "kdops_teacher.json").read_text())
    assert meta["label_names"] == labels and meta["val_rows"] == 6 and meta["train_rows"] == 54  # seeded 10 % held out
    assert any(p.suffix == ".safetensors" for p in res.path.iterdir())
    teacher = HFTeacher(res.path, max_length=32)
    assert teacher.label_names == labels
    assert teacher.logits(rows["text"].tolist()[:3]).shape == (3, 6)

    again = train_teacher(tmp_path / "t", rows, labels, cfg, progress=False)
    assert again.cached and again.history == res.history and again.best_val_accuracy == res.best_val_accuracy
    changed = train_teacher(tmp_path / "t", rows.iloc[:59], labels, replace(cfg, epochs=0.1), progress=False)
    assert not changed.cached  # other data: trained anew


def test_early_stopping_writes_the_best_check(tmp_path, tiny_base, monkeypatch):
    """Scripted validation scores: the best (0.8, second check) is kept; two checks without a gain stop training."""
    import kdops.teacher as teacher_mod

    scores, snapshots = iter([0.5, 0.8, 0.6, 0.7, 0.9, 0.9]), []

    def scripted(model, *args, **kwargs):
        snapshots.append(model.classifier.weight.detach().clone())
        return next(scores)

    monkeypatch.setattr(teacher_mod, "_val_accuracy", scripted)
    rows = word_rows(40)
    cfg = TeacherTrainConfig(epochs=2, batch_size=4, lr=1e-3, max_length=16, patience=2, eval_every=1, limit_per_domain=None)
    res = train_teacher(tmp_path / "t", rows, ["neg", "pos"], cfg, val_rows=word_rows(8), base=tiny_base, progress=False)
    assert [h["val_accuracy"] for h in res.history] == [0.5, 0.8, 0.6, 0.7]  # stopped at step 4 of 20
    assert res.best_val_accuracy == 0.8 and [h["step"] for h in res.history] == [1, 2, 3, 4]
    saved = HFTeacher(res.path).model.classifier.weight
    assert torch.equal(saved, snapshots[1]) and not torch.equal(saved, snapshots[-1])


def test_patience_zero_trains_every_step_and_keeps_the_last(tmp_path, tiny_base):
    cfg = TeacherTrainConfig(epochs=1, batch_size=8, max_length=16, patience=0, limit_per_domain=None)
    res = train_teacher(tmp_path / "t", word_rows(40), ["neg", "pos"], cfg, base=tiny_base, progress=False)
    meta = json.loads((res.path / "kdops_teacher.json").read_text())
    assert res.history == [] and res.best_val_accuracy is None and meta["train_rows"] == 40  # nothing held out
    assert HFTeacher(res.path).label_names == ["neg", "pos"]


def test_legacy_cache_key_is_unchanged():
    """Teachers trained without validation before early stopping existed stay cache hits."""
    rows = word_rows(10)
    cfg = TeacherTrainConfig()
    legacy = json.dumps({"cfg": {"epochs": 1.0, "batch_size": 32, "lr": 5e-05, "max_length": 64, "seed": 13,
                                 "limit_per_domain": 2000}, "labels": ["neg", "pos"], "n": 10,
                         "data": __import__("hashlib").sha256("\n".join(rows["text"]).encode()).hexdigest()[:16]})
    assert _cache_key(replace(cfg, patience=0), ["neg", "pos"], rows, None, None) == legacy
    assert _cache_key(cfg, ["neg", "pos"], rows, None, None) != legacy


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_bad_labels_and_bases_give_one_line_errors(tmp_path, tiny_base):
    rows = word_rows(10)
    with pytest.raises(LabelMismatch) as e:
        train_teacher(tmp_path / "t", rows, ["neg", "other"], progress=False)
    assert "'pos'" in one_line(e) and "label_names" in one_line(e)
    with pytest.raises(DataError) as e:
        train_teacher(tmp_path / "t", rows.assign(label="pos"), ["neg", "pos"], progress=False)
    assert "at least 2 labels" in one_line(e)
    with pytest.raises(DataError) as e:
        train_teacher(tmp_path / "t", rows.assign(label="pos"), ["pos"], progress=False)
    assert "at least 2 distinct labels" in one_line(e)
    with pytest.raises(DataError) as e:
        train_teacher(tmp_path / "t", rows.rename(columns={"label": "y"}), ["neg", "pos"], progress=False)
    assert "text and label" in one_line(e)

    with pytest.raises(TeacherBaseError) as e:
        train_teacher(tmp_path / "t", rows, ["neg", "pos"], base=tmp_path, progress=False)
    assert "no config.json" in one_line(e) and "encoder directory" in one_line(e)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt = tmp_path / "gpt"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(str(gpt))
    with pytest.raises(UserError) as e:
        train_teacher(tmp_path / "t", rows, ["neg", "pos"], base=gpt, progress=False)
    assert "not an encoder" in one_line(e)
    assert not (tmp_path / "t").exists()
