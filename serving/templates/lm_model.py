"""Triton Python-backend adapter for a kdops causal-LM student: prompt in, text out (copied into <repo>/<model>/<version>/).

Inputs ``PROMPT`` (string), optional ``MAX_TOKENS`` (int32, default from config) and ``TEMPERATURE`` (fp32,
0 = greedy); outputs ``COMPLETION`` (string), ``TOKENS`` (int32, new tokens) and ``MODEL_VERSION``.
Generation is kdops.lm.predict.LMGenerator; the requests of one dynamic batch are generated together, one
``generate`` per distinct temperature. A bad request gets its own error response and never takes the model
down. It imports triton_python_backend_utils, so it only runs inside the server.

Streaming (config ``model_transaction_policy { decoupled: true }``, ExportConfig.streaming): each request
gets a response whenever one of its prompts' text grows (``COMPLETION`` holds the new text of each row, ""
for rows that did not grow; ``TOKENS`` the tokens so far) and its last response carries the final flag. The
responses of a row concatenate to what the non-streaming model returns.
"""

import json
import os
import sys
from pathlib import Path

# The stub runs Python isolated, so PYTHONPATH is ignored; serving/server.py puts the kdops repository root
# there, so apply it by hand, first (as serving/templates/model.py does).
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


def _param(cfg, key, default=""):
    return cfg.get("parameters", {}).get(key, {}).get("string_value", default)


def _values(request, name):
    """An optional input's values as a list, or None when the request left it out."""
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy().reshape(-1).tolist()


class TritonPythonModel:
    def initialize(self, args):
        import torch

        from kdops.hotreload import start_reloadable
        from kdops.lm.predict import LMGenerator

        cfg = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        self.decoupled = bool(cfg.get("model_transaction_policy", {}).get("decoupled", False))
        self.version = _param(cfg, "kdops_version", args["model_version"])
        self.default_tokens = int(_param(cfg, "kdops_default_max_tokens", "32"))
        threads = int(_param(cfg, "kdops_torch_threads", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        on_gpu = args["model_instance_kind"] == "GPU"
        device = f"cuda:{args['model_instance_device_id']}" if on_gpu else "cpu"
        here = Path(args["model_repository"]) / args["model_version"]
        limits = dict(max_chars=int(_param(cfg, "kdops_max_chars", "20000")),
                      max_prompt_tokens=int(_param(cfg, "kdops_max_prompt_tokens", "256")),
                      max_new_tokens_limit=int(_param(cfg, "kdops_max_new_tokens", "256")))

        def load(artifact, version):
            g = LMGenerator.from_dir(artifact, device=device, version=version, **limits)
            g.generate(["warm-up"], 2, 0.0)  # first-call costs paid here, not by a request
            return g

        # A hot swap may replace the weights in place (kdops.hotreload), as in serving/templates/model.py.
        self.generator, self.watcher = start_reloadable(
            Path(args["model_repository"]).parent, self.model_name, args["model_instance_name"],
            here / "artifact", self.version, load, self._install, pb_utils.Logger.log_warn)
        self.version = self.generator.version
        self.log = None
        log_dir = _param(cfg, "kdops_prediction_log_dir")
        if log_dir:
            from kdops.prediction_log import PredictionLogWriter

            source = f"{self.model_name}-v{args['model_version']}-i{args['model_instance_name'].split('_')[-1]}"
            self.log = PredictionLogWriter(log_dir, source.replace("/", "_"))

    def _install(self, generator):
        # One attribute assignment: a batch in flight finishes on the generator it started with.
        self.generator = generator

    def execute(self, requests):
        # Validate per request so one bad request fails alone; generate the good ones as one batch.
        generator = self.generator  # this batch's, even if a reload lands meanwhile
        prompts, budgets, temps, spans, errors = [], [], [], [], {}
        for i, request in enumerate(requests):
            try:
                p = [x.decode("utf-8") if isinstance(x, bytes) else x
                     for x in pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy().reshape(-1)]
                m = _values(request, "MAX_TOKENS") or [self.default_tokens]
                t = _values(request, "TEMPERATURE") or [0.0]
                # one value for the whole request, or one per prompt
                p, m, t = generator.check(p, m * len(p) if len(m) == 1 else m, t * len(p) if len(t) == 1 else t)
            except Exception as e:  # InputError, undecodable bytes, odd tensors: an error response
                errors[i] = f"{self.model_name}: bad request: {e}"
                continue
            spans.append((i, len(prompts), len(prompts) + len(p)))
            prompts.extend(p)
            budgets.extend(m)
            temps.extend(t)
        if self.decoupled:
            self._stream(requests, generator, prompts, budgets, temps, spans, errors)
            return None
        responses = [None] * len(requests)
        for i, msg in errors.items():
            responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(msg))
        if not prompts:
            return responses
        try:
            gens = generator.generate_checked(prompts, budgets, temps)
        except Exception as e:
            for i, _, _ in spans:
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{self.model_name}: generation failed: {e}"))
            return responses
        for i, a, b in spans:
            part = gens[a:b]
            outs = [pb_utils.Tensor("COMPLETION", np.array([[g.text.encode("utf-8")] for g in part], object)),
                    pb_utils.Tensor("TOKENS", np.array([[g.tokens] for g in part], np.int32)),
                    pb_utils.Tensor("MODEL_VERSION", np.array([[generator.version.encode()]] * (b - a), object))]
            responses[i] = pb_utils.InferenceResponse(output_tensors=outs)
        self._log(prompts, gens, generator)
        return responses

    def _log(self, prompts, gens, generator):
        if self.log is not None:
            try:  # prompts are what drift monitoring reads; the completion goes in the label column
                self.log.write_batch(prompts, [[] for _ in prompts], [g.text for g in gens], self.model_name, generator.version)
            except OSError as e:
                pb_utils.Logger.log_warn(f"prediction log write failed: {e}")

    def _stream(self, requests, generator, prompts, budgets, temps, spans, errors):
        """Decoupled mode: responses go out through each request's sender as text is generated."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        senders = [r.get_response_sender() for r in requests]
        for i, msg in errors.items():
            senders[i].send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(msg)), flags=final)
        if not prompts:
            return
        owner = {}  # row of the batch -> (request, row within it, rows in it)
        for i, a, b in spans:
            for r in range(a, b):
                owner[r] = (i, r - a, b - a)
        tokens, open_rows = [0] * len(prompts), {i: b - a for i, a, b in spans}
        version = generator.version.encode()

        def emit(chunk):
            i, r, n = owner[chunk.row]
            tokens[chunk.row] = chunk.tokens
            if open_rows[i] <= 0:
                return  # closed already: its client went away
            texts = [b""] * n
            texts[r] = chunk.text.encode("utf-8")
            a = chunk.row - r
            outs = [pb_utils.Tensor("COMPLETION", np.array([[t] for t in texts], object)),
                    pb_utils.Tensor("TOKENS", np.array([[tokens[a + k]] for k in range(n)], np.int32)),
                    pb_utils.Tensor("MODEL_VERSION", np.array([[version]] * n, object))]
            open_rows[i] -= int(chunk.final)
            try:
                senders[i].send(pb_utils.InferenceResponse(output_tensors=outs), flags=final if open_rows[i] == 0 else 0)
            except Exception as e:  # a cancelled request or a gone client: the other requests go on
                open_rows[i] = 0
                pb_utils.Logger.log_warn(f"{self.model_name}: streaming response not sent ({e}); request dropped")

        try:
            gens = generator.stream_checked(prompts, budgets, temps, emit)
        except Exception as e:
            for i, left in open_rows.items():
                if left > 0:
                    senders[i].send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                        f"{self.model_name}: generation failed: {e}")), flags=final)
            return
        self._log(prompts, gens, generator)

    def finalize(self):
        if self.watcher is not None:
            self.watcher.stop()
        if self.log is not None:
            self.log.close()
