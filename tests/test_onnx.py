"""The student's ONNX graphs: export, INT8 per CPU family, the INT8 gate, the torch-free predictor."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from kdops.artifacts import Artifact, ArtifactError
from kdops.onnx_export import Int8Config, gate_int8, prepare
from kdops.onnx_predict import FP32_GRAPH, INT8_GRAPHS, OnnxPredictor, choose_graph, int8_family

TEXTS = ["this movie was good", "awful boring plot", "what city is this", "i really love this phone",
         "a terrible film", "nice", "the plot was thin but the actors were great", "why"] * 8


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_student_dir):
    """A copy of the tiny student with its graphs (the session fixture itself stays torch-only)."""
    d = tmp_path_factory.mktemp("onnx") / "student"
    shutil.copytree(tiny_student_dir, d)
    rows = pd.DataFrame({"text": TEXTS, "label": (["neg", "pos"] * 32), "domain": ["a"] * 32 + ["b"] * 32})
    return prepare(Artifact.read(d), rows)


def test_prepare_writes_graphs_with_digests_and_gate(prepared):
    meta = prepared.extra["onnx"]
    assert meta["fp32"] == FP32_GRAPH and meta["int8"] == INT8_GRAPHS
    assert meta["fp32_max_abs_diff"] < 1e-4
    for name in (FP32_GRAPH, *INT8_GRAPHS.values()):
        assert (prepared.path / name).stat().st_size > 0 and name in prepared.sha256
    assert set(meta["int8_gate"]) == {"vnni", "reduced"}
    for g in meta["int8_gate"].values():
        assert g["rows"] == 64 and set(g["slices"]) == {"all", "a", "b"}
        assert g["passed"] == (g["agreement"] >= 0.99 and g["max_drop_points"] <= 0.5)
    Artifact.read(prepared.path).verify()  # kdops.json on disk says the same
    assert Artifact.read(prepared.path).extra["onnx"]["int8_gate"] == meta["int8_gate"]


def test_prepare_is_idempotent(prepared):
    before = {n: (prepared.path / n).stat().st_mtime_ns for n in prepared.sha256}
    again = prepare(Artifact.read(prepared.path), None)
    assert again.extra["onnx"] == prepared.extra["onnx"]
    assert {n: (prepared.path / n).stat().st_mtime_ns for n in prepared.sha256} == before


def test_fp32_graph_matches_torch_and_int8_stays_close(prepared):
    from kdops.predict import Predictor

    expected = Predictor.from_dir(prepared.path).predict_proba(TEXTS)
    fp32 = OnnxPredictor.from_dir(prepared.path, graph=FP32_GRAPH)
    np.testing.assert_allclose(fp32.predict_proba(TEXTS), expected, atol=1e-5)
    np.testing.assert_allclose(fp32.embed(TEXTS[:3]), Predictor.from_dir(prepared.path).embed(TEXTS[:3]), atol=1e-4)
    int8 = OnnxPredictor.from_dir(prepared.path, graph=INT8_GRAPHS["vnni"]).predict_proba(TEXTS)
    assert np.abs(int8 - expected).max() < 0.05 and np.allclose(int8.sum(1), 1.0, atol=1e-5)


def test_int8_family_by_cpu_flags():
    assert int8_family({"avx2", "avx512f", "avx512_vnni"}, "x86_64") == "vnni"
    assert int8_family({"avx2", "avx_vnni"}, "x86_64") == "vnni"
    assert int8_family({"avx2", "avx512f", "avx512bw"}, "x86_64") == "reduced"  # no VNNI: 7-bit weights
    assert int8_family({"sse4_2"}, "x86_64") is None
    assert int8_family({"asimd", "asimddp"}, "aarch64") == "vnni"
    assert int8_family({"asimd"}, "aarch64") is None


def test_choose_graph_falls_back_to_fp32_when_the_gate_failed(prepared):
    flags = {"avx2", "avx512_vnni"}
    gates = {f: {**g, "passed": f == "reduced", "reason": "label agreement 0.9 < 0.99"}
             for f, g in prepared.extra["onnx"]["int8_gate"].items()}
    art = Artifact(prepared.path, prepared.kind, prepared.sha256, extra={"onnx": {**prepared.extra["onnx"], "int8_gate": gates}})
    vnni = choose_graph(art, flags, "x86_64")
    assert (vnni.file, vnni.runtime) == (FP32_GRAPH, "onnx-fp32") and "failed its gate" in vnni.reason
    reduced = choose_graph(art, {"avx2"}, "x86_64")
    assert (reduced.file, reduced.runtime) == (INT8_GRAPHS["reduced"], "onnx-int8")
    assert choose_graph(art, {"sse4_2"}, "x86_64").runtime == "onnx-fp32"
    assert choose_graph(Artifact(prepared.path, prepared.kind, prepared.sha256), flags, "x86_64") is None


def test_gate_fails_on_a_slice_drop_or_low_agreement():
    rows = pd.DataFrame({"label": ["neg"] * 100 + ["pos"] * 100, "domain": ["a"] * 100 + ["b"] * 100,
                         "text": ["t"] * 200})
    ref = np.array([0] * 100 + [1] * 100)
    cand = ref.copy()
    cand[:1] = 1  # one row of slice a: 1 point there, 0.5 overall; agreement 0.995
    g = gate_int8(ref, cand, rows, ["neg", "pos"], Int8Config())
    assert not g["passed"] and "slice a loses 1.00 points" in g["reason"] and g["agreement"] == 0.995
    cand2 = ref.copy()
    cand2[100:103] = 0  # 3 rows of slice b: agreement 0.985
    g2 = gate_int8(ref, cand2, rows, ["neg", "pos"], Int8Config(max_drop_points=5))
    assert not g2["passed"] and "agreement 0.9850" in g2["reason"]
    assert gate_int8(ref, ref, rows, ["neg", "pos"], Int8Config())["passed"]
    small = gate_int8(ref[:20], np.r_[1, ref[1:20]], rows[:20], ["neg", "pos"], Int8Config(min_agreement=0.9))
    assert small["passed"] and small["slices"]["a"]["drop_points"] == pytest.approx(5.0)  # 20 rows: reported only


def test_a_corrupt_graph_is_refused_with_a_clear_error(prepared, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(prepared.path, d)
    (d / INT8_GRAPHS["vnni"]).write_bytes(b"not an onnx graph")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        OnnxPredictor.from_dir(d, graph=INT8_GRAPHS["vnni"])
    with pytest.raises(ArtifactError, match="ONNX Runtime cannot load it"):
        OnnxPredictor.from_dir(d, graph=INT8_GRAPHS["vnni"], verify=False)


def test_the_served_code_path_imports_no_torch(prepared):
    """What the ONNX model.py imports and runs (predictor, backend, reload watcher, prediction log) without torch."""
    code = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("m", "serving/templates/onnx_model.py")
spec.loader.exec_module(importlib.util.module_from_spec(spec))
import kdops.hotreload, kdops.prediction_log
from kdops.onnx_predict import OnnxPredictor
p = OnnxPredictor.from_dir({str(prepared.path)!r})
print(p.predict_proba(["a text"]).shape, p.graph.runtime)
assert "torch" not in sys.modules and "transformers" not in sys.modules, "torch imported"
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("(1, 2)")


def test_registry_tags_say_what_serves(prepared):
    from kdops.registry.versions import INT8_TAG, RUNTIME_TAG, serving_tags

    tags = serving_tags(prepared)
    assert tags[RUNTIME_TAG] == choose_graph(prepared).runtime
    assert set(json.loads(tags[INT8_TAG])) == {"vnni", "reduced"}
    assert serving_tags(Artifact(prepared.path, prepared.kind, {})) == {RUNTIME_TAG: "torch"}


def test_a_registered_version_says_what_serves_it(prepared, tiny_tokenizer, tmp_path, monkeypatch):
    """Registered in a real (SQLite) MLflow store: each version row names what serves it."""
    from kdops.artifacts import Lineage, save_student
    from kdops.registry import Registry, Tracking
    from kdops.student import from_teacher
    from tests.conftest import make_teacher

    other = from_teacher(make_teacher(tiny_tokenizer, seed=5), num_labels=2, layers=[1], embedding_size=16)
    torch_only = save_student(tmp_path / "torch-only", other, tiny_tokenizer, ["neg", "pos"], 32, Lineage()).path

    monkeypatch.setenv("KDOPS_HOME", str(tmp_path / "home"))
    reg = Registry(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "artifacts"))
    with Tracking(store=reg.store).run("r") as run:
        pass
    v_onnx = reg.register(prepared.path, run.run_id, "rt")
    v_torch = reg.register(torch_only, run.run_id, "rt")
    rows = {r["version"]: r["serving_runtime"] for r in reg.versions("rt")}
    assert rows == {v_onnx: choose_graph(prepared).runtime, v_torch: "torch"}
    downloaded = reg.download("rt", v_onnx, dst=tmp_path / "dl")
    assert {FP32_GRAPH, *INT8_GRAPHS.values()} <= {p.name for p in downloaded.iterdir()}  # the graphs travel with it


def test_quantize_command_reports_the_gate_and_a_corrupt_artifact_in_one_line(tiny_student_dir, tmp_path):
    from test_project import kdops, one_line_error

    d = tmp_path / "student"
    shutil.copytree(tiny_student_dir, d)
    pd.DataFrame({"text": TEXTS, "label": ["neg", "pos"] * 32}).to_csv(tmp_path / "test.csv", index=False)
    res = kdops("quantize", str(d), "--data", str(tmp_path / "test.csv"), "--json", str(tmp_path / "gate.json"),
                cwd=tmp_path, home=tmp_path / "home")
    assert res.returncode == 0, res.stderr
    assert "model.int8-vnni.onnx" in res.stdout and "served here: model." in res.stdout
    assert set(json.loads((tmp_path / "gate.json").read_text())["int8_gate"]) == {"vnni", "reduced"}
    (d / "kdops.json").write_text("{not json")
    err = one_line_error(kdops("quantize", str(d), "--data", str(tmp_path / "test.csv"), cwd=tmp_path, home=tmp_path / "home"))
    assert "kdops.json is not valid JSON" in err
