"""The real tritonserver (nvidia-pytriton wheel): deploy, infer, restricted control, bad requests,
hot swap under load, a broken version refused, rollback, prediction log, a served teacher.

One server for the module (start ~2 s, each slot load ~3-10 s on 2 busy cores).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.server

tritonclient = pytest.importorskip("tritonclient.http")


@pytest.fixture(scope="module")
def second_student(tmp_path_factory, tiny_tokenizer):
    from kdops.artifacts import Lineage, save_student
    from kdops.student import from_teacher
    from tests.conftest import make_teacher

    student = from_teacher(make_teacher(tiny_tokenizer, seed=1), num_labels=2, layers=[1], embedding_size=16)
    return save_student(tmp_path_factory.mktemp("students2") / "tiny2", student, tiny_tokenizer, ["neg", "pos"], 32,
                        Lineage()).path


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_student_dir):
    from serving.export import ExportConfig
    from serving.server import ServerConfig, TritonServer
    from serving.swap import SwapConfig, deploy

    root = tmp_path_factory.mktemp("triton")
    cfg = SwapConfig(export=ExportConfig(prediction_log_dir=str(root / "predictions"), max_queue_delay_us=1000))
    with TritonServer(ServerConfig(repository=str(root / "repo"))) as server:
        first = deploy(server, "student", tiny_student_dir, cfg=cfg)
        yield server, cfg, first, root


from tests.conftest import serving_client as _client, traffic  # noqa: E402


def test_infer_matches_local_predictor(served, tiny_student_dir):
    from kdops.predict import Predictor

    server, _, first, _ = served
    texts = ["this movie was good", "awful boring plot", "what city is this"]
    out = _client(server).infer("student", texts)
    expected = Predictor.from_dir(tiny_student_dir).predict_proba(texts)
    np.testing.assert_allclose(out.probabilities, expected, atol=1e-5)
    assert out.versions == [first.label] * 3 and set(out.labels) <= {"neg", "pos"}


def test_in_place_reload_waits_for_every_instance(served, second_student, tiny_student_dir):
    """Two instances per slot: a reload is done only when both stubs answered, and every request after the
    swap, whichever instance serves it, gets the new version."""
    from kdops.hotreload import read_acks, slot_directory
    from serving.export import ExportConfig
    from serving.swap import SwapConfig, deploy, hot_swap

    server = served[0]
    cfg = SwapConfig(export=ExportConfig(instance_count=2, warmup=False))
    deploy(server, "multi", tiny_student_dir, cfg=cfg)
    hot_swap(server, "multi", second_student, cfg=cfg)
    third = hot_swap(server, "multi", tiny_student_dir, cfg=cfg)
    client = _client(server)
    try:
        assert third.method == "reload"
        assert {v for _ in range(20) for v in client.infer("multi", ["good movie"] * 3).versions} == {third.label}
        acks = read_acks(slot_directory(server.repository, third.slot))
        assert len(acks) == 2 and {a["seq"] for a in acks.values()} == {third.version}
    finally:
        for name in ("multi", "multi__s0", "multi__s1"):
            client.unload(name)
            shutil.rmtree(server.repository / name)


def test_dlpack_outputs_match_numpy_outputs(served, tiny_student_dir):
    """The output path NVIDIA's GPU container takes (DLPack tensors, also forced with numpy 2), run on CPU."""
    from kdops.predict import Predictor
    from serving.export import ExportConfig, export_artifact

    server = served[0]
    export_artifact(tiny_student_dir, server.repository, "student_dlpack", 1, ExportConfig(dlpack_outputs=True))
    client = _client(server)
    client.load("student_dlpack")
    try:
        assert client.parameter("student_dlpack", "kdops_dlpack_outputs") == "1"  # what model.py switches on
        texts = ["this movie was good", "awful boring plot"]
        out = client.infer("student_dlpack", texts)
    finally:
        client.unload("student_dlpack")
        shutil.rmtree(server.repository / "student_dlpack")
    np.testing.assert_allclose(out.probabilities, Predictor.from_dir(tiny_student_dir).predict_proba(texts), atol=1e-5)
    assert out.probabilities.dtype == np.float32 and out.probabilities.shape == (2, 2)


def test_model_control_refused_without_key(served):
    from serving.client import ServingClient, ServingError

    server = served[0]
    for anon in (ServingClient(server.url), ServingClient(server.url, grpc_url=server.grpc_url),
                 ServingClient(server.url, "wrong-key", grpc_url=server.grpc_url)):
        with pytest.raises(ServingError, match="restricted"):
            anon.load("student__s1")
        with pytest.raises(ServingError, match="restricted"):
            anon.unload("student")
    assert _client(server).model_ready("student")


def test_bad_requests_get_errors_and_model_keeps_serving(served):
    import tritonclient.http as httpclient

    from serving.client import ServingError

    server = served[0]
    client = _client(server)
    with pytest.raises(ServingError, match="empty"):
        client.infer("student", ["   "])
    with pytest.raises(ServingError, match="limit"):
        client.infer("student", ["x" * 50_000])
    with pytest.raises(ServingError, match="UTF-8"):
        client.infer("student", [b"\xff\xfe\xfa"])
    wrong = httpclient.InferInput("TEXT", [1, 1], "INT32")
    wrong.set_data_from_numpy(np.array([[7]], np.int32))
    with pytest.raises(Exception, match="(?i)datatype|type"):
        client.http.infer("student", [wrong])
    assert client.infer("student", ["still good"]).probabilities.shape == (1, 2)
    # a client's mistake is a 400 over plain HTTP (the backend's INVALID_ARG), not a server fault
    import urllib.error
    import urllib.request

    body = {"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ["  "]}]}
    req = urllib.request.Request(f"http://{server.url}/v2/models/student/infer", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400 and "empty" in err.value.read().decode()


def test_hot_swap_under_load_broken_version_and_rollback(served, second_student, tiny_student_dir, tmp_path):
    from serving.swap import SwapError, hot_swap, rollback, serving_status

    server, cfg, first, _ = served
    seen, anon = set(), _client(server, key=False)
    with traffic(lambda: seen.update(anon.infer("student", ["good movie", "bad plot"]).versions)) as (errors, lat):
        second = hot_swap(server, "student", second_student, cfg=cfg)
        broken = tmp_path / "broken"
        shutil.copytree(second_student, broken)
        data = bytearray((broken / "model.safetensors").read_bytes())
        data[-64:] = b"\x00" * 64
        (broken / "model.safetensors").write_bytes(bytes(data))
        with pytest.raises(SwapError, match="still serving"):
            hot_swap(server, "student", broken, cfg=cfg)
        assert _client(server).infer("student", ["ok"]).versions == [second.label]
        back = rollback(server, "student", cfg=cfg)
    assert errors == []
    assert back.label.split("-")[1] == first.label.split("-")[1]  # same weights as the first version
    assert {first.label, second.label} <= seen
    assert _client(server).infer("student", ["ok"]).versions == [back.label]
    status = serving_status(server, "student")
    assert status["active_slot"] == back.slot and [h["note"] for h in status["history"]][-1].startswith("rollback")
    assert max(lat) < 10.0  # no load-length stall (was 8-13 s with HTTP model control)


def test_swaps_reload_the_standby_slot_in_place_under_load(served, second_student, tiny_student_dir, tmp_path):
    """Once both slots run, a swap puts new weights into the standby slot's running stub: no new process,
    no failed request, each version answering with its own weights; a corrupt artifact is refused there."""
    from kdops.predict import Predictor
    from serving.swap import SwapError, hot_swap, read_state

    server, cfg, _, _ = served
    hot_swap(server, "student", second_student, cfg=cfg)  # both slots now loaded, whatever came before
    stubs = set(server.pids())
    anon = _client(server, key=False)
    threads = torch.get_num_threads()
    assert cfg.nice_loading  # the default: in a thread of its own at nice 19, the local reference on one thread
    plain = replace(cfg, nice_loading=False)  # the middle swap on the calling thread, at its priority
    caller_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with traffic(lambda: anon.infer("student", ["good movie", "bad plot"])) as (errors, _):
        swaps = [hot_swap(server, "student", d, cfg=c)
                 for d, c in ((tiny_student_dir, cfg), (second_student, plain), (tiny_student_dir, cfg))]
        broken = tmp_path / "broken"
        shutil.copytree(second_student, broken)
        (broken / "model.safetensors").write_bytes(b"\x00" * 64)
        with pytest.raises(SwapError, match="could not load the new weights.*still serving"):
            hot_swap(server, "student", broken, cfg=cfg)
    assert errors == []
    assert torch.get_num_threads() == threads  # the niced swaps gave back torch's thread count
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == caller_nice  # and left ours alone
    assert [s.method for s in swaps] == ["reload"] * 3
    assert [s.slot for s in swaps] == [swaps[0].slot, swaps[1].slot, swaps[0].slot] and swaps[0].slot != swaps[1].slot
    assert set(server.pids()) <= stubs  # no process started for any of the reloads
    texts = ["this movie was good", "awful boring plot"]
    out = _client(server).infer("student", texts)
    assert out.versions == [swaps[-1].label] * 2
    np.testing.assert_allclose(out.probabilities, Predictor.from_dir(tiny_student_dir).predict_proba(texts), atol=1e-5)
    assert [h["method"] for h in read_state(server.repository, "student")["history"]][-3:] == ["reload"] * 3


def test_prediction_log_round_trip(served):
    from kdops.prediction_log import read_predictions

    server, _, _, root = served
    t0 = time.time()
    _client(server).infer("student", ["logged sentence one", "logged sentence two"])
    df = read_predictions(root / "predictions", since=t0 - 0.5)
    row = df[df["text"] == "logged sentence two"].iloc[-1]
    assert row["label"] in ("neg", "pos") and len(row["probabilities"]) == 2 and row["model_version"]


def test_served_teacher_matches_local(served, tiny_tokenizer, tiny_teacher, tmp_path):
    from serving.teacher import TritonTeacher, deploy_teacher

    server = served[0]
    hf_dir = tmp_path / "teacher"
    tiny_teacher.config.id2label, tiny_teacher.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    tiny_teacher.save_pretrained(str(hf_dir), safe_serialization=True)
    tiny_tokenizer.save_pretrained(str(hf_dir))
    deploy_teacher(server, hf_dir, "teacher")
    remote = TritonTeacher(server.url, "teacher")
    from kdops.teacher import HFTeacher

    local = HFTeacher(hf_dir)
    texts = ["good movie", "the plot was awful and boring"]
    np.testing.assert_allclose(remote.logits(texts), local.logits(texts), atol=1e-4)
    assert remote.label_names == ["neg", "pos"] and remote.id == local.id


def test_repository_starts_in_a_stock_triton_loading_everything(served):
    """NVIDIA's container loads every folder of its repository by default (--model-control-mode=none) and
    exits if one fails: after swaps and in-place reloads the repository must still hold only models."""
    from serving.server import ServerConfig, TritonServer

    server = served[0]
    stock = TritonServer(ServerConfig(repository=str(server.repository), extra_args=("--model-control-mode=none",)))
    with stock:
        out = _client(stock).infer("student", ["good movie"])
    assert len(out.versions) == 1 and out.probabilities.shape == (1, 2)
