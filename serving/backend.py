"""What every kdops ``model.py`` does inside Triton's Python-backend stub, written once.

The templates under serving/templates/ (copied into each version folder by serving.export) are thin adapters:
they build their predictor and turn its answers into output tensors. The rest is here: the settings the
export wrote into config.pbtxt, torch's thread count, the device, the prediction log, the in-place reload
watcher (kdops.hotreload), gathering a dynamic batch's good rows while each bad request gets its own error
response, and building tensors.

Why a module of serving/ rather than a file copied beside each model.py or a kdops/ module: it builds Triton
responses (only serving/ talks to Triton), and the stub imports it the way it imports kdops (the repository
root on PYTHONPATH, serving/server.py), so one copy serves every model and is tested like any module.
``triton_python_backend_utils`` exists only inside the server: it is imported where a response or a tensor is
built, so the parsing here runs (and is unit-tested) anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


def _pb():
    import triton_python_backend_utils as pb_utils

    return pb_utils


def warn(message: str) -> None:
    _pb().Logger.log_warn(message)


@dataclass(frozen=True)
class StubSettings:
    """One model instance's start-up facts: Triton's ``initialize`` arguments and its config.pbtxt, parsed."""

    model: str
    instance: str
    model_dir: Path  # <repository>/<model>
    triton_version: str
    device: str
    params: dict[str, str]
    inputs: tuple[str, ...]
    decoupled: bool

    @classmethod
    def from_args(cls, args: dict) -> "StubSettings":
        cfg = json.loads(args["model_config"])
        on_gpu = args["model_instance_kind"] == "GPU"
        return cls(model=args["model_name"], instance=args["model_instance_name"],
                   model_dir=Path(args["model_repository"]), triton_version=str(args["model_version"]),
                   device=f"cuda:{args['model_instance_device_id']}" if on_gpu else "cpu",
                   params={k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()},
                   inputs=tuple(t["name"] for t in cfg.get("input", [])),
                   decoupled=bool(cfg.get("model_transaction_policy", {}).get("decoupled", False)))

    def param(self, key: str, default: str = "") -> str:
        return self.params.get(key) or default

    def number(self, key: str, default: int) -> int:
        return int(self.param(key, str(default)))

    @property
    def max_chars(self) -> int:
        return self.number("kdops_max_chars", 20_000)

    @property
    def artifact(self) -> Path:
        return self.model_dir / self.triton_version / "artifact"

    @property
    def version(self) -> str:
        """MODEL_VERSION until a reload says otherwise: the export's label, else Triton's version."""
        return self.param("kdops_version", self.triton_version)

    @property
    def log_source(self) -> str:
        return f"{self.model}-v{self.triton_version}-i{self.instance.split('_')[-1]}".replace("/", "_")

    @property
    def dlpack(self) -> bool:
        """Float outputs through DLPack: numpy-2 outputs come back empty from this backend version (shared
        NOTES), and on a GPU it keeps tensors there."""
        import numpy as np

        return (self.device != "cpu" or int(np.__version__.split(".")[0]) >= 2
                or self.param("kdops_dlpack_outputs", "0") == "1")


class Stub:
    """The machinery one model instance shares with every other: settings, threads, prediction log, reloads."""

    def __init__(self, args: dict):
        self.settings = s = StubSettings.from_args(args)
        threads = s.number("kdops_torch_threads", 0)
        if threads > 0 and s.param("kdops_runtime", "torch") == "torch":  # an ONNX model never imports torch
            import torch

            # Why: on a small CPU box the intra-op threads of several instances (and of a slot being loaded
            # during a hot swap) oversubscribe the cores; the export config bounds them.
            torch.set_num_threads(threads)
        self.watcher = None
        self.log = None
        if s.param("kdops_prediction_log_dir"):
            from kdops.prediction_log import PredictionLogWriter

            mb, days = s.number("kdops_prediction_log_max_mb", 0), float(s.param("kdops_prediction_log_max_days", "0"))
            self.log = PredictionLogWriter(s.param("kdops_prediction_log_dir"), s.log_source,
                                           max_total_bytes=mb << 20 if mb else None, max_age_s=days * 86400 if days else None,
                                           redact=s.param("kdops_prediction_log_redact", "0") == "1")

    def reloadable(self, load: Callable[[Path, str], Any], install: Callable[[Any], None]) -> Any:
        """Build the predictor with ``load(artifact, version)`` (from the last in-place reload when its artifact is
        still staged) and watch for reloads, which ``install`` the next one; returns the first."""
        from kdops.hotreload import start_reloadable

        s = self.settings
        predictor, self.watcher = start_reloadable(s.model_dir.parent, s.model, s.instance, s.artifact, s.version,
                                                   load, install, warn)
        return predictor

    def read_texts(self, request) -> list[str]:
        """A text model's request: the strings of its input, checked (kdops.predict.check_texts)."""
        from kdops.inputs import check_texts

        return check_texts(values(request, self.settings.inputs[0]), self.settings.max_chars)

    def log_batch(self, texts, probabilities, labels, version: str) -> None:
        if self.log is None:
            return
        try:  # a full disk must not fail predictions: say so and carry on
            self.log.write_batch(texts, probabilities, labels, self.settings.model, version)
        except OSError as e:
            warn(f"prediction log write failed: {e}")

    def finalize(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.log is not None:
            self.log.close()


@dataclass
class Batch:
    """The rows of a dynamic batch's good requests, flattened; each bad request keeps its own error."""

    model: str
    size: int  # requests
    rows: list = field(default_factory=list)
    spans: list[tuple[int, int, int]] = field(default_factory=list)  # (request, first row, end row)
    errors: dict[int, str] = field(default_factory=dict)

    @classmethod
    def gather(cls, requests, model: str, read: Callable[[Any], list]) -> "Batch":
        """``read(request)`` gives a request's rows (validated) or raises: then that request alone fails."""
        batch = cls(model, len(requests))
        for i, request in enumerate(requests):
            try:
                rows = read(request)
            except Exception as e:  # InputError, undecodable bytes, odd tensors: an error response
                batch.errors[i] = f"{model}: bad request: {e}"
                continue
            batch.spans.append((i, len(batch.rows), len(batch.rows) + len(rows)))
            batch.rows.extend(rows)
        return batch

    def respond(self, run: Callable[[list], Any], outputs: Callable[[Any, int, int], list]) -> tuple[list, Any]:
        """One response per request: ``result = run(rows)`` once for the batch, then ``outputs(result, a, b)``
        for each good request's rows ``[a, b)``. A failing ``run`` fails every good request with its message.
        Returns ``(responses, result)``; ``result`` is None when nothing ran."""
        pb = _pb()
        responses = [error_response(self.errors[i], client=True) if i in self.errors else None for i in range(self.size)]
        if not self.rows:
            return responses, None
        try:
            result = run(self.rows)
        except Exception as e:
            for i, _, _ in self.spans:
                responses[i] = error_response(f"{self.model}: inference failed: {e}")
            return responses, None
        for i, a, b in self.spans:
            responses[i] = pb.InferenceResponse(output_tensors=outputs(result, a, b))
        return responses, result


def error_response(message: str, client: bool = False):
    """An error response: ``client`` for a request that cannot be answered as sent (Triton's INVALID_ARG, HTTP 400),
    otherwise a server fault (INTERNAL, HTTP 500)."""
    pb = _pb()
    code = pb.TritonError.INVALID_ARG if client else pb.TritonError.INTERNAL
    return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(message, code))


def values(request, name: str) -> list | None:
    """An input's values as a flat list, or None when the request left an optional input out."""
    t = _pb().get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy().reshape(-1).tolist()


def strings(name: str, values) -> Any:
    """A TYPE_STRING output of one string per row."""
    import numpy as np

    return _pb().Tensor(name, np.array([[v.encode("utf-8") if isinstance(v, str) else v] for v in values], object))


def int32s(name: str, values) -> Any:
    import numpy as np

    return _pb().Tensor(name, np.array([[v] for v in values], np.int32))


def class_outputs(probabilities, labels, version: str, a: int, b: int, dlpack: bool = False) -> list:
    """A classifier's outputs for rows ``[a, b)`` of its batch: PROBABILITIES, LABEL and MODEL_VERSION."""
    return [floats("PROBABILITIES", probabilities[a:b], dlpack), strings("LABEL", labels[a:b]),
            strings("MODEL_VERSION", [version] * (b - a))]


def floats(name: str, tensor, dlpack: bool) -> Any:
    """A TYPE_FP32 output from a torch tensor or a numpy array (N, ...); a torch tensor goes through DLPack when
    ``dlpack``."""
    import numpy as np

    if isinstance(tensor, np.ndarray):
        return _pb().Tensor(name, np.ascontiguousarray(tensor, dtype=np.float32))
    part = tensor.contiguous()
    if dlpack:
        from torch.utils.dlpack import to_dlpack

        return _pb().Tensor.from_dlpack(name, to_dlpack(part))
    return _pb().Tensor(name, part.cpu().numpy().astype(np.float32))
