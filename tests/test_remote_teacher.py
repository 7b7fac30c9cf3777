"""A teacher served by Triton drives the loop: no local teacher weights, the student carved from a local base.

The unit tests check the teacher spec and the kinds' loaders; the server test deploys a tiny classifier teacher on
a real tritonserver and runs two ``distill_flow`` rounds through it (Prefect test harness, SQLite MLflow).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from kdops.errors import UserError
from kdops.kinds import TeacherSpec

POS = ("good", "great", "love", "excellent", "wonderful", "happy", "best", "fun")
NEG = ("bad", "awful", "terrible", "hate", "boring", "worst", "sad", "dull")
THINGS = ("movie", "film", "plot", "story")


def _rows(domain: str = "a") -> pd.DataFrame:
    """64 distinct labelled sentences over the tiny tokenizer's words."""
    rows = [(f"{w} {t}", lab) for ws, lab in ((POS, "pos"), (NEG, "neg")) for w in ws for t in THINGS]
    return pd.DataFrame({"text": [t for t, _ in rows], "label": [lab for _, lab in rows], "domain": domain})


def test_teacher_spec_is_a_directory_or_a_served_model():
    assert TeacherSpec.of("/models/t") == TeacherSpec(path="/models/t") and not TeacherSpec(path="/m").remote
    served = TeacherSpec(url="localhost:8000", model="teacher")
    assert served.remote and str(served) == "teacher at localhost:8000"
    for bad in ({}, {"url": "h:1"}, {"model": "t"}, {"path": "/m", "url": "h:1", "model": "t"}):
        with pytest.raises(UserError):
            TeacherSpec(**bad)


def test_kinds_load_served_teachers_through_the_given_loader():
    from kdops import kinds

    served = TeacherSpec(url="localhost:8000", model="teacher")
    assert kinds.get("classifier").load_teacher(served, remote=lambda spec: ("remote", spec)) == ("remote", served)
    with pytest.raises(UserError, match="no loader"):
        kinds.get("classifier").load_teacher(served)
    with pytest.raises(UserError, match="local teacher directory"):  # an LM student is carved from its teacher
        kinds.get("causal-lm").load_teacher(served, remote=lambda spec: None)


def test_transfer_terms_are_off_for_a_served_teacher():
    from kdops.distill import DistillConfig, LossConfig
    from kdops.rounds import without_teacher_states

    class Served:  # the Teacher protocol alone: logits, no model or tokenizer
        id, label_names = "served", ["neg", "pos"]

        def logits(self, texts):
            return np.zeros((len(texts), 2), np.float32)

    cfg = DistillConfig(loss=LossConfig(feature_weight=1.0, relation_weight=0.5))
    off = without_teacher_states(Served(), cfg)
    assert not off.loss.needs_teacher_states and off.epochs == cfg.epochs
    plain = DistillConfig()
    assert without_teacher_states(Served(), plain) is plain


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    from serving.server import ServerConfig, TritonServer

    with TritonServer(ServerConfig(repository=str(tmp_path_factory.mktemp("triton") / "repo"))) as server:
        yield server


@pytest.fixture(scope="module")
def served_teacher(tmp_path_factory, tiny_tokenizer, tiny_teacher, triton) -> str:
    """The tiny BERT classifier (its own small vocabulary) exported and loaded as a Triton teacher model; the
    directory is removed afterwards, so nothing of the teacher is left here but the server."""
    import shutil

    from serving.teacher import deploy_teacher

    d = tmp_path_factory.mktemp("teacher") / "tiny"
    tiny_teacher.config.id2label, tiny_teacher.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    tiny_teacher.save_pretrained(str(d))
    tiny_tokenizer.save_pretrained(str(d))
    name = deploy_teacher(triton, d, "kdops-teacher")
    shutil.rmtree(d)
    return name


@pytest.mark.server
def test_served_teacher_drives_first_and_second_round(tmp_path, monkeypatch, harness, triton, served_teacher,
                                                      tiny_teacher):
    from transformers import AutoTokenizer

    from flows.loop import distill_flow
    from flows.tasks import LoopContext, save_snapshot
    from kdops import kinds
    from kdops.artifacts import Artifact
    from kdops.distill import DistillConfig, LossConfig
    from kdops.gate import GateThresholds
    from kdops.recipes import ClassifierRecipe
    from kdops.rounds import StudentShape
    from kdops.soft_labels import SoftLabelCache
    from kdops.teacher import base_model_path
    from serving.teacher import TritonTeacher

    calls = []
    logits = TritonTeacher.logits
    monkeypatch.setattr(TritonTeacher, "logits", lambda self, texts: calls.append(len(texts)) or logits(self, texts))
    home = tmp_path / "home"
    monkeypatch.setenv("KDOPS_HOME", str(home))
    ctx = LoopContext(home=str(home), teacher_url=triton.url, teacher_model=served_teacher,
                      tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert ctx.teacher_dir == "" and ctx.has_teacher
    remote = TritonTeacher(triton.url, served_teacher)
    # feature transfer asked for: a served teacher has no hidden states, so the round runs without it
    cfg = DistillConfig(epochs=1, batch_size=16, max_length=16, loss=LossConfig(feature_weight=1.0))
    # full-rank embeddings: factorising MiniLM's (30522, 384) by SVD costs seconds this test need not spend
    shape = StudentShape(layers=1, embedding_size=None, intermediate_size=64)
    recipe = ClassifierRecipe(name="tiny-remote", distill=cfg, shape=shape,
                              gate=GateThresholds(min_retention=0.01, max_slice_drop=1.0))
    labels = ("neg", "pos")
    train_id, eval_id = save_snapshot(ctx, _rows(), labels), save_snapshot(ctx, _rows("b").iloc[::4], labels)

    r1 = distill_flow(ctx, train_id, eval_id, recipe, None, deploy=False)
    art = Artifact.read(r1["artifact"])
    assert art.lineage.teacher_id == remote.id and art.lineage.parent_version is None
    assert art.lineage.details["student_base"] == str(base_model_path())
    assert art.lineage.config["distill"]["loss"]["feature_weight"] == 0.0
    cache = SoftLabelCache(home / "soft_labels.sqlite")
    assert cache.count(remote.id) == len(_rows()) and cache.count() == cache.count(remote.id)
    assert sum(calls) == len(_rows())  # each text went to the server once (the eval rows are training texts too)
    _, tokenizer, _ = kinds.load(art)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(str(base_model_path())).get_vocab()
    # the export recorded the teacher's size: the report has the parameter ratio without local weights
    assert r1["report"]["params"]["teacher"] == sum(p.numel() for p in tiny_teacher.parameters())

    # a second round (another seed: a new student) on the same texts asks the server for nothing
    calls.clear()
    r2 = distill_flow(ctx, train_id, eval_id, replace(recipe, distill=replace(cfg, seed=7)), None, deploy=False)
    assert not r2["distill"]["reused"] and r2["artifact"] != r1["artifact"]
    assert r2["distill"]["cache"]["misses"] == 0 and calls == []
    assert Artifact.read(r2["artifact"]).lineage.teacher_id == remote.id
