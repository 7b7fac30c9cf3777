"""A student served from its ONNX graph by the real tritonserver: no torch in the stub, the INT8 graph this CPU
gets, the same answers as the local ONNX predictor, a hot swap under traffic with no failed request."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.server

pytest.importorskip("tritonclient.http")

from tests.conftest import serving_client as _client, traffic  # noqa: E402

ROWS = pd.DataFrame({"text": ["this movie was good", "awful boring plot", "what city is this", "so nice"] * 16,
                     "label": ["pos", "neg", "neg", "pos"] * 16})


def _prepared(tmp_path_factory, src, name):
    from kdops.artifacts import Artifact
    from kdops.onnx_export import prepare

    d = tmp_path_factory.mktemp("onnx-students") / name
    shutil.copytree(src, d)
    return prepare(Artifact.read(d), ROWS)


@pytest.fixture(scope="module")
def students(tmp_path_factory, tiny_student_dir, tiny_tokenizer):
    from kdops.artifacts import Lineage, save_student
    from kdops.student import from_teacher
    from tests.conftest import make_teacher

    other = from_teacher(make_teacher(tiny_tokenizer, seed=3), num_labels=2, layers=[1], embedding_size=16)
    second = save_student(tmp_path_factory.mktemp("raw") / "second", other, tiny_tokenizer, ["neg", "pos"], 32, Lineage())
    return _prepared(tmp_path_factory, tiny_student_dir, "first"), _prepared(tmp_path_factory, second.path, "second")


@pytest.fixture(scope="module")
def served(tmp_path_factory, students):
    from serving.export import ExportConfig
    from serving.server import ServerConfig, TritonServer
    from serving.swap import SwapConfig, deploy

    root = tmp_path_factory.mktemp("triton-onnx")
    cfg = SwapConfig(export=ExportConfig(prediction_log_dir=str(root / "predictions"), max_queue_delay_us=1000))
    with TritonServer(ServerConfig(repository=str(root / "repo"))) as server:
        first = deploy(server, "fast", students[0].path, cfg=cfg)
        yield server, cfg, first


def _stub_maps(server) -> list[str]:
    out = []
    for pid in server.pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"fast_" not in fh.read():
                    continue
            with open(f"/proc/{pid}/maps") as fh:
                out.append(fh.read())
        except OSError:
            pass
    return out


def test_served_from_the_onnx_graph_without_torch(served, students):
    from kdops.onnx_predict import OnnxPredictor

    server, _, first = served
    config = (server.repository / first.slot / "config.pbtxt").read_text()
    assert 'key: "kdops_runtime" value { string_value: "onnx" }' in config
    texts = ["this movie was good", "awful boring plot", "what city is this"]
    out = _client(server).infer("fast", texts)
    expected = OnnxPredictor.from_dir(students[0].path).predict_proba(texts)
    np.testing.assert_allclose(out.probabilities, expected, atol=1e-5)
    assert out.versions == [first.label] * 3
    maps = _stub_maps(server)
    assert maps, "no stub process of the fast model found"
    assert all("onnxruntime" in m for m in maps)
    assert not any("libtorch" in m for m in maps), "the ONNX stub loaded torch"


def test_client_errors_and_hot_swap_under_traffic(served, students):
    from serving.client import ServingError
    from serving.swap import hot_swap

    server, cfg, _ = served
    client = _client(server)
    with pytest.raises(ServingError, match="empty"):
        client.infer("fast", [""])
    results = []
    with traffic(lambda: client_infer(server)) as (errors, latencies):
        for artifact in (students[1], students[0], students[1]):
            results.append(hot_swap(server, "fast", artifact.path, cfg=cfg))
    assert errors == [] and len(latencies) > 20
    assert [r.method for r in results[1:]] == ["reload", "reload"]  # the standby stub takes new weights in place
    assert all(r.timings_s["load"] < 5 for r in results[1:]), [r.timings_s for r in results]
    assert client.infer("fast", ["so nice"]).versions == [results[-1].label]


def client_infer(server):
    _client(server).infer("fast", ["a text while swapping"])


def test_prometheus_metrics_summarize_the_served_model(served):
    from serving.metrics import triton_metrics

    server = served[0]
    client = _client(server)
    before = triton_metrics(server.metrics_url, "fast")
    client.infer("fast", ["counted once", "and twice"])
    with pytest.raises(Exception):
        client.infer("fast", [""])
    after = triton_metrics(server.metrics_url, "fast")
    assert after["requests"] == before["requests"] + 1 and after["failed"] >= before["failed"] + 1
    assert after["executions"] > 0 and after["mean_batch"] >= 1.0
    assert after["mean_queue_ms"] is not None and after["mean_compute_ms"] > 0
