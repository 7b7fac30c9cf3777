"""The causal-LM loop on tiny Llamas with the real servers: Prefect (test harness), SQLite MLflow, tritonserver.

Round 1 carves a student from the teacher, registers it and hot-swaps it in as a generation model; round 2
continues the champion with replay and is gated per domain against it; a rejected round leaves the champion
serving and in the registry.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

pytestmark = [pytest.mark.server, pytest.mark.slow]

A = ["the movie was good", "a great film and a fun story", "the actor was really bad", "the plot was boring"]
B = ["what is the city ?", "where is the country ?", "who is this person ?", "how is the answer ?"]


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def lm_teacher_dir(tmp_path_factory, tiny_lm_tokenizer):
    from tests.conftest import make_tiny_lm

    d = tmp_path_factory.mktemp("lmteacher") / "tiny-llama"
    make_tiny_lm(len(tiny_lm_tokenizer), layers=4, seed=3).save_pretrained(str(d))
    tiny_lm_tokenizer.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    from serving.server import ServerConfig, TritonServer

    with TritonServer(ServerConfig(repository=str(tmp_path_factory.mktemp("triton") / "repo"))) as server:
        yield server


def _rows(texts, domain):
    return pd.DataFrame({"text": texts * 4, "label": None, "domain": domain})


def test_lm_loop_register_serve_continue_and_reject(tmp_path, monkeypatch, harness, lm_teacher_dir, triton):
    from flows.loop import distill_flow
    from flows.tasks import LoopContext, save_snapshot
    from kdops.recipes import LMRecipe
    from kdops.gate import LMGateThresholds
    from kdops.lm.distill import LMDistillConfig
    from kdops.lm.predict import LMGenerator
    from kdops.lm.rounds import LMShape
    from kdops.registry import Champion, Registry
    from serving.client import ServingClient

    home = tmp_path / "home"
    monkeypatch.setenv("KDOPS_HOME", str(home))
    ctx = LoopContext(home=str(home), teacher_dir=str(lm_teacher_dir), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                      triton_url=triton.url, triton_grpc_url=triton.grpc_url, triton_key=triton.admin_key,
                      repository=str(triton.repository), prediction_log=str(tmp_path / "predlog"), model="lm")
    cfg = LMDistillConfig(steps=6, batch_size=4, topk=8, lr=1e-3, replay_fraction=0.25)
    shape = LMShape(layers=2, trim_vocab=0)  # vocabulary trimmed to the text's words: <other> and its tail in play
    loose = LMRecipe(name="tiny", distill=cfg, shape=shape, max_length=16,
                     gate=LMGateThresholds(max_ppl_ratio=1e6, max_domain_ppl_increase=10.0))
    train1 = save_snapshot(ctx, pd.concat([_rows(A, "a"), _rows(B, "b")]), None)
    eval_id = save_snapshot(ctx, pd.concat([_rows(A[:2], "a"), _rows(B[:2], "b")]), None)

    r1 = distill_flow(ctx, train1, eval_id, loose, None)
    assert r1["decision"]["action"] == "promote" and "promotion" in r1
    assert set(r1["report"]["ppl_by_domain"]) == {"a", "b"} and r1["summary"]["param_ratio"] < 1
    reg = Registry(tracking_uri=ctx.tracking_uri)
    assert reg.champion("lm") == r1["version"]
    lineage = reg.lineage("lm", r1["version"])
    assert lineage["details"]["layers"] == [0, 3] and lineage["snapshot_ids"]["train"] == train1
    assert lineage["details"]["tail"]["prior"] == "uniform"  # the dropped-id tail was fitted on the round's text
    prompts = ["the movie was", "where is the"]
    served = ServingClient(triton.url).generate("lm", prompts, max_tokens=5, temperature=0.0)
    assert served.texts == [g.text for g in LMGenerator.from_dir(r1["artifact"]).generate(prompts, 5, 0.0)]
    student, _, meta = reg.load("lm", "champion")  # the registry hands back an LM student, not a classifier
    assert meta.kind == "causal-lm" and student.num_parameters() == r1["report"]["summary"]["student_params"]
    assert student.trimmed and float(student.tail_logprob.exp().sum()) == pytest.approx(
        student.keep_ids.numel() + 1.0, abs=1e-3)  # exp(0) at kept ids, + a distribution over the dropped ones

    # Round 2: new text, continue the champion with replay of round 1; gated per domain against it.
    champion = Champion(r1["version"], Path(r1["artifact"]), r1["summary"])
    train2 = save_snapshot(ctx, _rows(["the story was fun and the film was great", "the phone battery is bad"], "a"), None)
    r2 = distill_flow(ctx, train2, eval_id, loose, champion, replay_ids=[train1])
    assert r2["distill"]["replay_pool"] > 0 and r2["version"] != r1["version"]
    assert reg.lineage("lm", r2["version"])["parent_version"] == r1["version"]
    assert any("student_ppl/a" in reason for reason in r2["decision"]["reasons"])
    assert reg.champion("lm") == r2["version"]

    # A round the gate rejects: nothing is swapped, the champion stays serving and in the registry.
    strict = replace(loose, gate=LMGateThresholds(max_ppl_ratio=1e-6))
    train3 = save_snapshot(ctx, _rows(["a new sentence about the city"], "b"), None)
    champ2 = Champion(r2["version"], Path(r2["artifact"]), r2["summary"])
    r3 = distill_flow(ctx, train3, eval_id, strict, champ2)
    assert r3["decision"]["action"] == "reject" and "promotion" not in r3
    assert reg.champion("lm") == r2["version"]
    label = ServingClient(triton.url).generate("lm", ["ok"], max_tokens=1).versions[0]
    assert label == r2["promotion"]["swap"]["label"]
