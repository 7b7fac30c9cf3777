"""A small Triton client for kdops models.

``tritonclient.http.InferenceServerClient`` is not safe to share across threads (gevent underneath), so
``ServingClient`` keeps one per thread; one ``ServingClient`` can be shared by many threads.
Model-control calls carry the admin header the server was started with (serving/server.py).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from serving.server import ADMIN_HEADER


class ServingError(RuntimeError):
    """A request the server refused or could not answer."""


@dataclass
class ServedPredictions:
    probabilities: np.ndarray  # (N, num_labels) float32 (logits for a teacher model)
    labels: list[str]
    versions: list[str]  # MODEL_VERSION per row; empty strings for a teacher


@dataclass
class ServedGenerations:
    texts: list[str]  # COMPLETION per prompt
    tokens: list[int]  # new tokens per prompt
    versions: list[str]  # MODEL_VERSION per prompt


@dataclass
class StreamedText:
    row: int  # which prompt of the call
    text: str  # text added since this prompt's previous piece
    tokens: int  # new tokens so far for this prompt
    version: str  # MODEL_VERSION that generated it


class ServingClient:
    def __init__(self, url: str, admin_key: str = "", timeout_s: float = 60.0, grpc_url: str = ""):
        self.url, self.admin_key, self.timeout_s, self.grpc_url = url, admin_key, timeout_s, grpc_url
        self._local = threading.local()
        self._streaming: set[str] = set()  # models found to be decoupled (they answer streams only)

    @classmethod
    def for_server(cls, server, **kw) -> "ServingClient":
        """A client for a TritonServer (embedded or attached), with its admin key and gRPC control URL."""
        return cls(server.url, server.admin_key, grpc_url=server.grpc_url, **kw)

    @property
    def grpc(self):
        c = getattr(self._local, "grpc_client", None)
        if c is None:
            import tritonclient.grpc as grpcclient

            c = grpcclient.InferenceServerClient(self.grpc_url)
            self._local.grpc_client = c
        return c

    @property
    def http(self):
        c = getattr(self._local, "client", None)
        if c is None:
            import tritonclient.http as httpclient

            c = httpclient.InferenceServerClient(self.url, connection_timeout=self.timeout_s,
                                                 network_timeout=self.timeout_s)
            self._local.client = c
        return c

    @property
    def admin_headers(self) -> dict[str, str]:
        return {ADMIN_HEADER: self.admin_key} if self.admin_key else {}

    # -- inference ---------------------------------------------------------------------------
    def infer_arrays(self, model: str, arrays: list[tuple[str, str, np.ndarray]], version: str = ""):
        """One HTTP inference with ``(input name, Triton dtype, array)`` inputs; the tritonclient result."""
        import tritonclient.http as httpclient
        from tritonclient.utils import InferenceServerException

        inputs = []
        for name, dtype, arr in arrays:
            inp = httpclient.InferInput(name, list(arr.shape), dtype)
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        try:
            return self.http.infer(model, inputs, model_version=version)
        except InferenceServerException as e:
            raise ServingError(f"{model}: {e.message() if hasattr(e, 'message') else e}") from e

    @staticmethod
    def _strings(values) -> np.ndarray:
        return np.array([[v.encode("utf-8") if isinstance(v, str) else v] for v in values], dtype=object)

    def infer(self, model: str, texts: list[str], version: str = "") -> ServedPredictions:
        res = self.infer_arrays(model, [("TEXT", "BYTES", self._strings(texts))], version)
        names = {o["name"] for o in res.get_response()["outputs"]}
        scores = res.as_numpy("PROBABILITIES" if "PROBABILITIES" in names else "LOGITS")
        labels = [x.decode() for x in res.as_numpy("LABEL").reshape(-1)]
        versions = ([x.decode() for x in res.as_numpy("MODEL_VERSION").reshape(-1)]
                    if "MODEL_VERSION" in names else [""] * len(labels))
        return ServedPredictions(scores.astype(np.float32), labels, versions)

    def _generation_arrays(self, prompts: list[str], max_tokens: int | None, temperature: float | None):
        n = len(prompts)
        arrays = [("PROMPT", "BYTES", self._strings(prompts))]
        if max_tokens is not None:
            arrays.append(("MAX_TOKENS", "INT32", np.full((n, 1), max_tokens, np.int32)))
        if temperature is not None:
            arrays.append(("TEMPERATURE", "FP32", np.full((n, 1), temperature, np.float32)))
        return arrays

    def generate(self, model: str, prompts: list[str], max_tokens: int | None = None,
                 temperature: float | None = None, version: str = "") -> ServedGenerations:
        """Continuations from a generation model; ``None`` leaves an input out (the model's default).
        A streaming (decoupled) model is read through ``generate_stream`` and its pieces joined."""
        if model not in self._streaming:
            try:
                res = self.infer_arrays(model, self._generation_arrays(prompts, max_tokens, temperature), version)
                return ServedGenerations([x.decode("utf-8") for x in res.as_numpy("COMPLETION").reshape(-1)],
                                         [int(x) for x in res.as_numpy("TOKENS").reshape(-1)],
                                         [x.decode() for x in res.as_numpy("MODEL_VERSION").reshape(-1)])
            except ServingError as e:
                if "decoupled" not in str(e):
                    raise
                self._streaming.add(model)  # Triton's HTTP endpoint refuses decoupled models: stream instead
        texts, tokens, versions = [""] * len(prompts), [0] * len(prompts), [""] * len(prompts)
        for piece in self.generate_stream(model, prompts, max_tokens, temperature, version):
            texts[piece.row] += piece.text
            tokens[piece.row], versions[piece.row] = piece.tokens, piece.version
        return ServedGenerations(texts, tokens, versions)

    def generate_stream(self, model: str, prompts: list[str], max_tokens: int | None = None,
                        temperature: float | None = None, version: str = "") -> Iterator[StreamedText]:
        """Text as a streaming generation model (ExportConfig.streaming) produces it, over a gRPC stream: one
        ``StreamedText`` per prompt whose text grew, in order; returns after the model's final response.
        Needs the server's gRPC URL (``grpc_url``); errors raise ServingError."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        if not self.grpc_url:
            raise ServingError(f"{model}: streaming needs the server's gRPC URL (ServingClient(grpc_url=...)).")
        answers: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.grpc_url)  # one stream per client object: a private one
        try:
            client.start_stream(callback=lambda result, error: answers.put((result, error)))
            inputs = []
            for name, dtype, arr in self._generation_arrays(prompts, max_tokens, temperature):
                inp = grpcclient.InferInput(name, list(arr.shape), dtype)
                inp.set_data_from_numpy(arr)
                inputs.append(inp)
            client.async_stream_infer(model, inputs, model_version=version, enable_empty_final_response=True)
            while True:
                try:
                    result, error = answers.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise ServingError(f"{model}: no streamed response within {self.timeout_s} s") from None
                if error is not None:
                    msg = error.message() if isinstance(error, InferenceServerException) else str(error)
                    raise ServingError(f"{model}: {msg}")
                response = result.get_response()
                if response.outputs:
                    texts = result.as_numpy("COMPLETION").reshape(-1)
                    counts = result.as_numpy("TOKENS").reshape(-1)
                    labels = result.as_numpy("MODEL_VERSION").reshape(-1)
                    for row, text in enumerate(texts):
                        if text:
                            yield StreamedText(row, text.decode("utf-8"), int(counts[row]), labels[row].decode())
                        elif not any(texts):  # a final response with no new text still reports the counts
                            yield StreamedText(row, "", int(counts[row]), labels[row].decode())
                final = response.parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    return
        finally:
            try:
                client.stop_stream(cancel_requests=True)
            finally:
                client.close()

    def predict(self, model: str, texts: list[str]) -> ServedPredictions:
        return self.infer(model, texts)

    # -- health and metadata -----------------------------------------------------------------
    def live(self) -> bool:
        try:
            return bool(self.http.is_server_live())
        except Exception:
            return False

    def model_ready(self, model: str, version: str = "") -> bool:
        try:
            return bool(self.http.is_model_ready(model, version))
        except Exception:
            return False

    def model_config(self, model: str) -> dict:
        return self.http.get_model_config(model)

    def parameter(self, model: str, key: str) -> str:
        return self.model_config(model).get("parameters", {}).get(key, {}).get("string_value", "")

    # -- model control (restricted: needs the admin key) -------------------------------------
    # Why gRPC: Triton's HTTP server answers a load on one of its event-loop threads and holds that thread
    # until the load ends; every HTTP connection pinned to the same thread waits with it (measured: requests
    # in flight when a load began took the whole 8-13 s of the load). Control over gRPC leaves the HTTP
    # inference threads alone. HTTP control remains the fallback when no gRPC URL is known.
    def _control(self, name: str, *args):
        from tritonclient.utils import InferenceServerException

        try:
            if self.grpc_url:
                headers = {f"triton-grpc-protocol-{ADMIN_HEADER}": self.admin_key} if self.admin_key else {}
                out = getattr(self.grpc, name)(*args, headers=headers)
                if name == "get_model_repository_index":
                    from google.protobuf.json_format import MessageToDict

                    return MessageToDict(out).get("models", [])
                return out
            return getattr(self.http, name)(*args, headers=self.admin_headers)
        except InferenceServerException as e:
            raise ServingError(str(e)) from e

    def load(self, model: str) -> None:
        """Load (or reload) ``model`` from the repository; returns when it is ready or raises."""
        self._control("load_model", model)

    def unload(self, model: str) -> None:
        self._control("unload_model", model)

    def index(self) -> list[dict]:
        """The repository index: name, version, state (READY, UNAVAILABLE, UNLOADING...), reason."""
        return self._control("get_model_repository_index")


def client_for(target) -> tuple[ServingClient, Path | None]:
    """A client for ``target`` (a TritonServer, embedded or attached, or a ServingClient itself) and the server's
    model repository when the target knows it."""
    if isinstance(target, ServingClient):
        return target, None
    return ServingClient.for_server(target), getattr(target, "repository", None)
