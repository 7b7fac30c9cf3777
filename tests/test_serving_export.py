"""serving.export without a server: complete configs from the kind's spec, no pickle copied, artifacts checked
first; the stub's settings parsing (serving.backend); the serving state's archive."""

from __future__ import annotations

import json
import re

import pytest

from kdops.artifacts import ArtifactError, Kind
from kdops.kinds import get
from serving.export import (ExportConfig, ensemble_config, export_artifact, model_config, streams,
                            with_label_count)

CLASSIFIER = with_label_count(get(Kind.CLASSIFIER).serving, 2)
LM = get(Kind.CAUSAL_LM).serving


def test_export_student_layout(tiny_student_dir, tmp_path):
    (tiny_student_dir / "stray.bin").write_bytes(b"pickle!")  # must never be copied
    try:
        vdir = export_artifact(tiny_student_dir, tmp_path, "m", 3, ExportConfig(instance_kind="KIND_GPU", gpus=(0,)))
    finally:
        (tiny_student_dir / "stray.bin").unlink()
    assert (vdir / "model.py").exists() and (vdir / "__pycache__").is_dir()
    assert (vdir / "artifact" / "model.safetensors").exists() and not (vdir / "artifact" / "stray.bin").exists()
    text = (tmp_path / "m" / "config.pbtxt").read_text()
    for piece in ('backend: "python"', "TYPE_STRING", "KIND_GPU", "gpus: [ 0 ]", "preferred_batch_size",
                  "max_queue_delay_microseconds", "model_warmup", '"kdops_version"', "3-",
                  'name: "PROBABILITIES" data_type: TYPE_FP32 dims: [ 2 ]', '"kdops_kind" value { string_value: "classifier" }',
                  '"kdops_label_names"'):
        assert piece in text
    assert "kdops_max_new_tokens" not in text and "decoupled" not in text  # generation settings only where it generates
    assert (tmp_path / "m" / "warmup" / "TEXT").read_bytes()[4:] == b"this movie was good"  # length-prefixed string


def test_export_refuses_non_student(tmp_path):
    with pytest.raises(ArtifactError):
        export_artifact(tmp_path, tmp_path / "repo", "m")


def test_config_validation_and_ensemble():
    with pytest.raises(ValueError):
        ExportConfig(instance_kind="KIND_TPU")
    with pytest.raises(ValueError):
        ExportConfig(max_batch_size=8, preferred_batch_sizes=(16,))
    ens = ensemble_config("m", "m__s1", CLASSIFIER, 64)
    assert 'model_name: "m__s1"' in ens and 'output_map { key: "MODEL_VERSION"' in ens
    assert "dynamic_batching" not in model_config("m", ExportConfig(dynamic_batching=False), CLASSIFIER, {})
    with pytest.raises(ValueError, match="default_max_tokens"):
        ExportConfig(default_max_tokens=300, max_new_tokens=256)
    lm = model_config("g", ExportConfig(), LM, {})
    assert 'name: "MAX_TOKENS" data_type: TYPE_INT32 dims: [ 1 ] optional: true' in lm
    assert 'key: "MAX_TOKENS" value { data_type: TYPE_INT32' in lm  # warm-up sends a token budget
    assert 'input_map { key: "TEMPERATURE" value: "TEMPERATURE" }' in ensemble_config("g", "g__s0", LM, 8)
    assert "decoupled" not in lm + ensemble_config("g", "g__s0", LM, 8)  # streaming is opt-in
    streaming = model_config("g", ExportConfig(streaming=True), LM, {}, decoupled=True)
    assert "model_transaction_policy { decoupled: true }" in streaming
    assert "model_transaction_policy { decoupled: true }" in ensemble_config("g", "g__s0", LM, 8, decoupled=True)
    # only a generation model streams, whatever the export config asks
    assert streams(LM, ExportConfig(streaming=True)) and not streams(CLASSIFIER, ExportConfig(streaming=True))


def test_lm_teacher_config_is_unbatched_with_multi_dim_tensors():
    from serving.export import LM_TEACHER_SPEC

    text = model_config("t", ExportConfig(), LM_TEACHER_SPEC, {"kdops_kind": "lm-teacher"}, batched=False)
    assert "max_batch_size: 0" in text and "dynamic_batching" not in text and "model_warmup" not in text
    assert 'name: "IDS" data_type: TYPE_INT64 dims: [ -1, -1 ]' in text
    assert 'name: "TOPK_IDS" data_type: TYPE_INT32 dims: [ -1, -1, -1 ]' in text


def test_stub_settings_parse_what_the_export_wrote(tiny_student_dir, tmp_path):
    """What every model.py starts from (serving.backend.StubSettings), read from an exported config."""
    from serving.backend import StubSettings

    export_artifact(tiny_student_dir, tmp_path, "m__s0", 3, ExportConfig(prediction_log_dir=str(tmp_path / "log"),
                                                                           torch_threads=2))
    text = (tmp_path / "m__s0" / "config.pbtxt").read_text()
    # Triton hands model.py its config as JSON: here, the parameters as the export wrote them
    params = {k: {"string_value": json.loads(v)}
              for k, v in re.findall(r'key: "(\w+)" value \{ string_value: ("(?:[^"\\]|\\.)*") \}', text)}
    args = {"model_config": json.dumps({"input": [{"name": "TEXT"}], "parameters": params}),
            "model_name": "m__s0", "model_instance_name": "m__s0_0_1", "model_repository": str(tmp_path / "m__s0"),
            "model_version": "3", "model_instance_kind": "CPU", "model_instance_device_id": "0"}
    s = StubSettings.from_args(args)
    assert s.inputs == ("TEXT",) and s.device == "cpu" and not s.decoupled
    assert s.version.startswith("3-") and s.number("kdops_torch_threads", 0) == 2
    assert s.artifact == tmp_path / "m__s0" / "3" / "artifact" and (s.artifact / "model.safetensors").exists()
    assert s.param("kdops_prediction_log_dir") == str((tmp_path / "log").resolve())
    assert json.loads(s.param("kdops_label_names")) == ["neg", "pos"] and s.log_source == "m__s0-v3-i1"
    gpu = StubSettings.from_args({**args, "model_instance_kind": "GPU", "model_instance_device_id": "1"})
    assert gpu.device == "cuda:1" and gpu.dlpack


def test_archive_skips_partial_writes_and_keeps_the_newest(tiny_student_dir, tmp_path):
    from serving.state import archive, archive_dir

    (tiny_student_dir / "x.partial-123-abcdef").mkdir()  # a kdops.paths.atomic_dir temporary
    try:
        for v in range(1, 4):
            archive(tmp_path / "repo", "m", v, tiny_student_dir, keep=2)
    finally:
        (tiny_student_dir / "x.partial-123-abcdef").rmdir()
    root = archive_dir(tmp_path / "repo", "m")
    assert sorted(p.name for p in root.iterdir()) == ["2", "3"]
    assert (root / "3" / "kdops.json").exists() and not (root / "3" / "x.partial-123-abcdef").exists()


def test_cli_every_option_has_help():
    import typer.main

    from serving.cli import app

    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        for p in cmd.params:
            if p.param_type_name == "option":
                assert p.help, f"serve {name} {p.name} has no help text"


def test_swap_reference_runs_torch_on_the_calling_thread_and_restores_the_count():
    import torch

    from serving.priority import torch_on_this_thread

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"):
        with torch_on_this_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
