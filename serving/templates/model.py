"""Triton Python-backend adapter for a kdops classifier student (copied into <repo>/<model>/<version>/).

Text in; class probabilities, the top label and MODEL_VERSION out. Prediction is kdops.predict.Predictor;
settings, threads, the prediction log, in-place reloads and per-request errors are serving.backend's. One
response per request; a bad request gets its own error and never takes the model down. Runs only inside the
server (triton_python_backend_utils); everything worth unit-testing lives in kdops/ and serving/.
"""

import os
import sys

# The stub runs Python isolated, so PYTHONPATH is ignored; serving/server.py puts the kdops repository root
# there (the editable install's .pth finder is not always active), so apply it by hand, first.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

from serving.backend import Batch, Stub, class_outputs  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        from kdops.predict import Predictor

        self.stub = Stub(args)
        s = self.stub.settings

        def load(artifact, version):
            p = Predictor.from_dir(artifact, device=s.device, max_chars=s.max_chars, version=version)
            p.predict_proba(["warm-up", "a warm-up text of two rows"])  # first-call costs paid here
            return p

        self.predictor = self.stub.reloadable(load, self._install)

    def _install(self, predictor):
        # One attribute assignment: a batch in flight finishes on the predictor it started with.
        self.predictor = predictor

    def execute(self, requests):
        predictor, dlpack = self.predictor, self.stub.settings.dlpack  # this batch's, even if a reload lands now

        def run(texts):
            probs = predictor.logits(texts).softmax(-1).float()  # (N, L)
            return probs, [predictor.label_names[k] for k in probs.argmax(-1).tolist()]

        def outputs(result, a, b):
            return class_outputs(*result, predictor.version, a, b, dlpack)

        batch = Batch.gather(requests, self.stub.settings.model, self.stub.read_texts)
        responses, result = batch.respond(run, outputs)
        if result is not None:
            self.stub.log_batch(batch.rows, result[0].cpu().numpy(), result[1], predictor.version)
        return responses

    def finalize(self):
        self.stub.finalize()
