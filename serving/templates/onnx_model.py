"""Triton Python-backend adapter for a kdops classifier student's ONNX graph (copied into <repo>/<model>/<version>/).

The CPU twin of model.py: the same tensors, errors, prediction log and in-place reloads (serving.backend), but
prediction is kdops.onnx_predict.OnnxPredictor (ONNX Runtime, tokenizers, numpy), so the stub never imports
torch and a new version loads in a fraction of a second. The INT8 graph for this CPU is picked at load time
(the fp32 graph where no INT8 graph passed its gate for this CPU's family); MODEL_VERSION says which.
"""

import os
import sys

# The stub runs Python isolated, so PYTHONPATH is ignored; serving/server.py puts the kdops repository root
# there (the editable install's .pth finder is not always active), so apply it by hand, first.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

from serving.backend import Batch, Stub, class_outputs, warn  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        from kdops.onnx_predict import OnnxPredictor

        self.stub = Stub(args)
        s = self.stub.settings
        threads = s.number("kdops_onnx_threads", 1)

        def load(artifact, version):
            p = OnnxPredictor.from_dir(artifact, threads=threads, max_chars=s.max_chars, version=version)
            p.predict_proba(["warm-up", "a warm-up text of two rows"])  # first-call costs paid here
            warn(f"{s.model} {version}: {p.graph.runtime} ({p.graph.reason})")
            return p

        self.predictor = self.stub.reloadable(load, self._install)

    def _install(self, predictor):
        # One attribute assignment: a batch in flight finishes on the predictor it started with.
        self.predictor = predictor

    def execute(self, requests):
        predictor = self.predictor  # this batch's, even if a reload lands now

        def run(texts):
            probs = predictor.predict_proba(texts)  # (N, L) float32
            return probs, [predictor.label_names[k] for k in probs.argmax(-1).tolist()]

        def outputs(result, a, b):
            return class_outputs(*result, predictor.version, a, b)

        batch = Batch.gather(requests, self.stub.settings.model, self.stub.read_texts)
        responses, result = batch.respond(run, outputs)
        if result is not None:
            self.stub.log_batch(batch.rows, result[0], result[1], predictor.version)
        return responses

    def finalize(self):
        self.stub.finalize()
