"""Triton Python-backend adapter for a kdops causal-LM student: prompt in, text out (copied into <repo>/<model>/<version>/).

Inputs ``PROMPT`` (string), optional ``MAX_TOKENS`` (int32, default from config) and ``TEMPERATURE`` (fp32,
0 = greedy); outputs ``COMPLETION`` (string), ``TOKENS`` (int32, new tokens) and ``MODEL_VERSION``.
Generation is kdops.lm.predict.LMGenerator; the requests of one dynamic batch are generated together, one
``generate`` per distinct temperature. Settings, threads, the prediction log, in-place reloads and per-request
errors are serving.backend's. Runs only inside the server (triton_python_backend_utils).

Streaming (config ``model_transaction_policy { decoupled: true }``, ExportConfig.streaming): each request
gets a response whenever one of its prompts' text grows (``COMPLETION`` holds the new text of each row, ""
for rows that did not grow; ``TOKENS`` the tokens so far) and its last response carries the final flag. The
responses of a row concatenate to what the non-streaming model returns.
"""

import os
import sys

# The stub runs Python isolated, so PYTHONPATH is ignored; apply it by hand, first (as model.py does).
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

from serving.backend import Batch, Stub, error_response, int32s, strings, values, warn  # noqa: E402


def _outputs(texts, tokens, version):
    return [strings("COMPLETION", texts), int32s("TOKENS", tokens), strings("MODEL_VERSION", [version] * len(texts))]


class TritonPythonModel:
    def initialize(self, args):
        from kdops.lm.predict import LMGenerator

        self.stub = Stub(args)
        s = self.stub.settings
        self.default_tokens = s.number("kdops_default_max_tokens", 32)
        limits = dict(max_chars=s.max_chars, max_prompt_tokens=s.number("kdops_max_prompt_tokens", 256),
                      max_new_tokens_limit=s.number("kdops_max_new_tokens", 256))

        def load(artifact, version):
            g = LMGenerator.from_dir(artifact, device=s.device, version=version, **limits)
            g.generate(["warm-up"], 2, 0.0)  # first-call costs paid here, not by a request
            return g

        self.generator = self.stub.reloadable(load, self._install)

    def _install(self, generator):
        # One attribute assignment: a batch in flight finishes on the generator it started with.
        self.generator = generator

    def _read(self, request, generator):
        """A request's rows: (prompt, token budget, temperature), checked by the generator."""
        p = [x.decode("utf-8") if isinstance(x, bytes) else x for x in values(request, "PROMPT")]
        m = values(request, "MAX_TOKENS") or [self.default_tokens]
        t = values(request, "TEMPERATURE") or [0.0]
        # one value for the whole request, or one per prompt
        return list(zip(*generator.check(p, m * len(p) if len(m) == 1 else m, t * len(p) if len(t) == 1 else t)))

    def execute(self, requests):
        generator = self.generator  # this batch's, even if a reload lands meanwhile
        batch = Batch.gather(requests, self.stub.settings.model, lambda r: self._read(r, generator))
        if self.stub.settings.decoupled:
            self._stream(requests, generator, batch)
            return None
        responses, gens = batch.respond(
            lambda rows: generator.generate_checked(*map(list, zip(*rows))),
            lambda gens, a, b: _outputs([g.text for g in gens[a:b]], [g.tokens for g in gens[a:b]], generator.version))
        if gens is not None:
            self._log(batch, gens, generator)
        return responses

    def _log(self, batch, gens, generator):
        # prompts are what drift monitoring reads; the completion goes in the label column
        self.stub.log_batch([r[0] for r in batch.rows], [[] for _ in gens], [g.text for g in gens], generator.version)

    def _stream(self, requests, generator, batch):
        """Decoupled mode: responses go out through each request's sender as text is generated."""
        import triton_python_backend_utils as pb_utils

        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        senders = [r.get_response_sender() for r in requests]
        for i, msg in batch.errors.items():
            senders[i].send(error_response(msg, client=True), flags=final)
        if not batch.rows:
            return
        owner = {}  # row of the batch -> (request, row within it, rows in it)
        for i, a, b in batch.spans:
            for r in range(a, b):
                owner[r] = (i, r - a, b - a)
        tokens, open_rows = [0] * len(batch.rows), {i: b - a for i, a, b in batch.spans}

        def emit(chunk):
            i, r, n = owner[chunk.row]
            tokens[chunk.row] = chunk.tokens
            if open_rows[i] <= 0:
                return  # closed already: its client went away
            texts = [""] * n
            texts[r] = chunk.text
            a = chunk.row - r
            open_rows[i] -= int(chunk.final)
            try:
                senders[i].send(pb_utils.InferenceResponse(output_tensors=_outputs(texts, tokens[a:a + n], generator.version)),
                                flags=final if open_rows[i] == 0 else 0)
            except Exception as e:  # a cancelled request or a gone client: the other requests go on
                open_rows[i] = 0
                warn(f"{self.stub.settings.model}: streaming response not sent ({e}); request dropped")

        try:
            gens = generator.stream_checked(*map(list, zip(*batch.rows)), emit)
        except Exception as e:
            for i, left in open_rows.items():
                if left > 0:
                    senders[i].send(error_response(f"{self.stub.settings.model}: generation failed: {e}"), flags=final)
            return
        self._log(batch, gens, generator)

    def finalize(self):
        self.stub.finalize()
