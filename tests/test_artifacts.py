"""The one artifact value: today's layout round-trips, and both layouts written before it load, migrated."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file
import torch

from kdops.artifacts import Artifact, ArtifactError, Kind, Lineage, file_sha256, write_artifact


def _weights(d, name="model.safetensors"):
    d.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.ones(2, 2)}, str(d / name))
    return file_sha256(d / name)


def test_write_then_read_is_the_same_value(tmp_path):
    sha = _weights(tmp_path / "a")
    lin = Lineage(teacher_id="t1", snapshot_ids={"train": "s1"}, cache_key="k", parent_version=3, code_version="abc",
                  config={"distill": {"epochs": 2}}, details={"replay_rows": 5})
    written = write_artifact(tmp_path / "a", Kind.CLASSIFIER, lin, ("neg", "pos"), 64, {"num_parameters": 4})
    read = Artifact.read(tmp_path / "a")
    assert read == written and read.weights_sha256 == sha and read.lineage.parent_version == 3
    assert json.loads((tmp_path / "a" / "kdops.json").read_text())["schema"] == 2
    read.verify()
    (tmp_path / "a" / "model.safetensors").write_bytes(b"other bytes")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        read.verify()


def test_a_schema_1_classifier_loads_migrated(tmp_path):
    sha = _weights(tmp_path / "old")
    (tmp_path / "old" / "kdops.json").write_text(json.dumps({
        "kind": "classifier", "label_names": ["neg", "pos"], "max_length": 32, "weights_sha256": sha,
        "lineage": {"teacher_id": "t", "snapshot_ids": {"train": "s"}, "soft_label_cache_key": "ck", "parent": "/x",
                    "parent_version": "4", "incremental": True, "replay_rows": 7, "distill_config": {"epochs": 1},
                    "student_shape": None, "code_version": "c0ffee"}}))
    art = Artifact.read(tmp_path / "old")
    assert art.kind is Kind.CLASSIFIER and art.label_names == ("neg", "pos") and art.max_length == 32
    assert art.sha256 == {"model.safetensors": sha}
    assert art.lineage == Lineage(teacher_id="t", snapshot_ids={"train": "s"}, cache_key="ck", parent_version=4,
                                  code_version="c0ffee", config={"epochs": 1},
                                  details={"parent": "/x", "incremental": True, "replay_rows": 7, "student_shape": None})


def test_an_old_lm_student_loads_migrated(tmp_path):
    sha = _weights(tmp_path / "lm")
    (tmp_path / "lm" / "kdops.json").write_text(json.dumps({
        "kind": "causal-lm", "full_vocab_size": 100, "trimmed_vocab": False, "num_parameters": 4,
        "sha256": {"model.safetensors": sha},
        "lineage": {"teacher_id": "t", "layers": [0, 2], "parent_artifact": None, "distill": {"steps": 5},
                    "max_length": 48, "snapshot_ids": {"train": "s", "replay": []}}}))
    art = Artifact.read(tmp_path / "lm")
    assert art.kind is Kind.CAUSAL_LM and art.max_length == 48 and art.weights_sha256 == sha
    assert art.extra == {"full_vocab_size": 100, "trimmed_vocab": False, "num_parameters": 4}
    assert art.lineage.config == {"steps": 5} and art.lineage.details["layers"] == [0, 2]
    assert art.lineage.parent_version is None and art.lineage.snapshot_ids == {"train": "s", "replay": []}


@pytest.mark.parametrize("text, reason", [("", "not valid JSON"), ("[1]", "not a JSON object"),
                                          ('{"kind": "speech"}', "unknown kind 'speech'"),
                                          ('{"kind": "classifier"}', "no label_names")])
def test_unusable_metadata_is_refused_with_the_reason(tmp_path, text, reason):
    (tmp_path / "kdops.json").write_text(text)
    with pytest.raises(ArtifactError, match=reason):
        Artifact.read(tmp_path)
    with pytest.raises(ArtifactError, match="not a kdops artifact"):
        Artifact.read(tmp_path / "missing")
