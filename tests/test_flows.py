"""The loop end to end on tiny models with the real servers: Prefect (test harness), SQLite MLflow, tritonserver.

Also: a flow killed mid-way and re-run reuses the cached teacher labels and does not register twice; a
failed promotion leaves the previous champion serving.
"""

import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

POS = ["good movie", "great film", "love this story", "best actor", "wonderful plot", "fun and happy"]
NEG = ["bad movie", "awful film", "hate this story", "worst actor", "boring plot", "sad and dull"]


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory, tiny_tokenizer, tiny_teacher):
    d = tmp_path_factory.mktemp("teacher") / "tiny"
    tiny_teacher.config.id2label, tiny_teacher.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    tiny_teacher.save_pretrained(str(d))
    tiny_tokenizer.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    from serving.server import ServerConfig, TritonServer

    repo = tmp_path_factory.mktemp("triton") / "repo"
    with TritonServer(ServerConfig(repository=str(repo))) as server:
        yield server


def _rows(n: int = 32, domain: str = "a", labelled: bool = True) -> pd.DataFrame:
    texts = [f"{w} {x}" for w in POS[:4] + NEG[:4] for x in ("movie", "film", "story", "book")][:n]
    labels = ["pos" if any(p.split()[0] in t for p in POS) else "neg" for t in texts] if labelled else [None] * len(texts)
    return pd.DataFrame({"text": texts, "label": labels, "domain": domain})


@pytest.mark.server
@pytest.mark.slow
def test_loop_end_to_end_and_idempotent_rerun(tmp_path, monkeypatch, harness, tiny_teacher_dir, triton):
    from flows.loop import distill_flow, monitor_flow
    from flows.tasks import LoopContext, save_snapshot
    from kdops.distill import DistillConfig
    from kdops.gate import GateThresholds
    from kdops.predict import Predictor
    from kdops.recipes import ClassifierRecipe
    from kdops.registry import Champion, Registry
    from kdops.rounds import StudentShape
    from kdops.soft_labels import SoftLabelCache
    from serving.client import ServingClient

    home = tmp_path / "home"
    monkeypatch.setenv("KDOPS_HOME", str(home))
    ctx = LoopContext(home=str(home), teacher_dir=str(tiny_teacher_dir), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                      triton_url=triton.url, triton_grpc_url=triton.grpc_url, triton_key=triton.admin_key,
                      repository=str(triton.repository), prediction_log=str(tmp_path / "predlog"))
    shape = StudentShape(layers=1, embedding_size=8, intermediate_size=32)
    cfg = DistillConfig(epochs=1, batch_size=8)
    loose = GateThresholds(min_retention=0.01, max_slice_drop=1.0)
    recipe = ClassifierRecipe(name="tiny", distill=cfg, shape=shape, gate=loose)
    labels = ("neg", "pos")
    train_id, eval_id = save_snapshot(ctx, _rows(), labels), save_snapshot(ctx, _rows(16), labels)
    r1 = distill_flow(ctx, train_id, eval_id, recipe, None)
    assert r1["decision"]["action"] == "promote" and "promotion" in r1
    reg = Registry(tracking_uri=ctx.tracking_uri)
    assert reg.champion(ctx.model) == r1["version"]
    served = ServingClient(triton.url).predict(ctx.model, ["good movie", "awful film"])
    local = Predictor.from_dir(r1["artifact"]).predict_proba(["good movie", "awful film"])
    assert abs(served.probabilities - local).max() < 1e-4

    # re-run of the same round (as after a crash): no retraining, no new version, no teacher calls
    cache = SoftLabelCache(home / "soft_labels.sqlite")
    n_before = cache.count()
    again = distill_flow(ctx, save_snapshot(ctx, _rows(), labels), eval_id, recipe, None, deploy=False)
    assert again["version"] == r1["version"] and again["distill"]["reused"]
    assert cache.count() == n_before and len(reg.versions(ctx.model)) == 1

    # incremental round on unlabelled new-domain traffic, gated against the champion and hot-swapped
    champion = Champion(r1["version"], Path(r1["artifact"]), r1["summary"])
    incremental = replace(recipe, distill=DistillConfig(epochs=1, batch_size=8, replay_share=0.5))
    r2 = distill_flow(ctx, save_snapshot(ctx, _rows(domain="b", labelled=False), labels), eval_id, incremental, champion)
    assert r2["version"] == r1["version"] + 1 and r2["distill"]["replay_rows"] > 0
    assert reg.champion(ctx.model) == r2["version"]
    assert reg.lineage(ctx.model, r2["version"])["parent_version"] == r1["version"]

    # the monitor reads what the server logged
    since = time.time() - 600
    client = ServingClient(triton.url)
    for t in _rows(40)["text"]:
        client.predict(ctx.model, [t])
    from kdops.predict import Predictor as P
    from monitoring import MonitorConfig, profile_reference

    texts = _rows()["text"].tolist()
    p = P.from_dir(r2["artifact"])
    ref = profile_reference(texts * 3, MonitorConfig(window_size=20, max_reference=100), probabilities=p.predict_proba(texts * 3),
                            embeddings=p.embed(texts * 3), label_names=("neg", "pos"))
    deadline = time.time() + 20
    mon = {"rows": 0}
    while time.time() < deadline and mon["rows"] < 40:
        mon = monitor_flow(ctx, ref, since, artifact=r2["artifact"])  # the champion embeds the served window
        time.sleep(1)
    assert mon["rows"] >= 40 and mon["action"] == "ok"  # the traffic is the reference's own texts: no drift
    assert "embedding.classifier" in mon["history"]["tests"]  # embedding drift checked on live traffic
    from kdops.review import ReviewQueue

    asked = ReviewQueue(ctx.paths.review_db).open()  # each window's least confident texts, for people to label
    assert 0 < len(asked) <= 50 and {c["kind"] for c in asked} <= {"low_confidence", "disagreement"}
    assert len({c["payload"]["text"] for c in asked}) == len(asked)


@pytest.mark.server
def test_failed_promotion_keeps_previous_champion(tmp_path, harness, tiny_student_dir, triton):
    from flows.promotion import promote_flow
    from flows.tasks import LoopContext
    from kdops.registry import Registry, Tracking
    from serving.client import ServingClient
    from serving.swap import SwapError, hot_swap

    ctx = LoopContext(home=str(tmp_path), teacher_dir="", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                      triton_url=triton.url, triton_grpc_url=triton.grpc_url, triton_key=triton.admin_key,
                      repository=str(triton.repository), model="guard")
    hot_swap(triton, "guard", tiny_student_dir)
    before = ServingClient(triton.url).predict("guard", ["good movie"]).versions
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(tiny_student_dir, broken)
    (broken / "model.safetensors").write_bytes(b"corrupt")
    reg = Registry(tracking_uri=ctx.tracking_uri)
    with Tracking(store=reg.store).run("broken") as run:
        version = reg.register(broken, run.run_id, "guard")  # registered, so the swap is what refuses it
    with pytest.raises(SwapError):
        promote_flow(ctx, version, str(broken), "test", {})
    after = ServingClient(triton.url).predict("guard", ["good movie"])
    assert after.versions == before  # the previous version kept serving
    assert Registry(tracking_uri=ctx.tracking_uri).champion("guard") is None  # and the registry never moved
