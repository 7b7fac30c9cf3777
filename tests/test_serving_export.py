"""serving.export without a server: complete configs, no pickle copied, artifacts checked first."""

from __future__ import annotations

import pytest

from kdops.artifacts import ArtifactError
from serving.export import LM_IO, ExportConfig, classifier_io, ensemble_config, export_student, model_config


def test_export_student_layout(tiny_student_dir, tmp_path):
    (tiny_student_dir / "stray.bin").write_bytes(b"pickle!")  # must never be copied
    try:
        vdir = export_student(tiny_student_dir, tmp_path, "m", 3, ExportConfig(instance_kind="KIND_GPU", gpus=(0,)))
    finally:
        (tiny_student_dir / "stray.bin").unlink()
    assert (vdir / "model.py").exists() and (vdir / "__pycache__").is_dir()
    assert (vdir / "artifact" / "model.safetensors").exists() and not (vdir / "artifact" / "stray.bin").exists()
    text = (tmp_path / "m" / "config.pbtxt").read_text()
    for piece in ('backend: "python"', "TYPE_STRING", "KIND_GPU", "gpus: [ 0 ]", "preferred_batch_size",
                  "max_queue_delay_microseconds", "model_warmup", '"kdops_version"', "3-"):
        assert piece in text
    assert (tmp_path / "m" / "warmup" / "text").read_bytes()[:4] != b"\0\0\0\0"


def test_export_refuses_non_student(tmp_path):
    with pytest.raises(ArtifactError):
        export_student(tmp_path, tmp_path / "repo", "m")


def test_config_validation_and_ensemble():
    with pytest.raises(ValueError):
        ExportConfig(instance_kind="KIND_TPU")
    with pytest.raises(ValueError):
        ExportConfig(max_batch_size=8, preferred_batch_sizes=(16,))
    ens = ensemble_config("m", "m__s1", classifier_io(2), 64)
    assert 'model_name: "m__s1"' in ens and 'output_map { key: "MODEL_VERSION"' in ens
    assert "dynamic_batching" not in model_config("m", ExportConfig(dynamic_batching=False), classifier_io(2), {})
    with pytest.raises(ValueError, match="default_max_tokens"):
        ExportConfig(default_max_tokens=300, max_new_tokens=256)
    lm = model_config("g", ExportConfig(), LM_IO, {})
    assert 'name: "MAX_TOKENS" data_type: TYPE_INT32 dims: [ 1 ] optional: true' in lm
    assert 'key: "MAX_TOKENS" value { data_type: TYPE_INT32' in lm  # warm-up sends a token budget
    assert 'input_map { key: "TEMPERATURE" value: "TEMPERATURE" }' in ensemble_config("g", "g__s0", LM_IO, 8)
    assert "decoupled" not in lm + ensemble_config("g", "g__s0", LM_IO, 8)  # streaming is opt-in
    streaming = model_config("g", ExportConfig(streaming=True), LM_IO, {}, decoupled=True)
    assert "model_transaction_policy { decoupled: true }" in streaming
    assert "model_transaction_policy { decoupled: true }" in ensemble_config("g", "g__s0", LM_IO, 8, decoupled=True)


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

    from serving.swap import _torch_on_this_thread

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"):
        with _torch_on_this_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
