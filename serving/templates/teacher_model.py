"""Triton Python-backend adapter for an HF sequence-classifier teacher (copied into <repo>/<model>/<version>/).

Text in; logits and the top label out. The work is kdops.teacher.HFTeacher's; settings, threads and
per-request errors are serving.backend's. Runs only inside the server (triton_python_backend_utils).
"""

import os
import sys

# The stub runs Python isolated, so PYTHONPATH is ignored; apply it by hand, first (as model.py does).
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

from serving.backend import Batch, Stub, floats, strings  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        from kdops.teacher import HFTeacher

        self.stub = Stub(args)
        self.teacher = HFTeacher(self.stub.settings.artifact, device=self.stub.settings.device)

    def execute(self, requests):
        import torch

        names, dlpack = self.teacher.label_names, self.stub.settings.dlpack

        def run(texts):
            logits = torch.from_numpy(self.teacher.logits(texts))  # (N, L)
            return logits, [names[k] for k in logits.argmax(-1).tolist()]

        batch = Batch.gather(requests, self.stub.settings.model, self.stub.read_texts)
        return batch.respond(run, lambda r, a, b: [floats("LOGITS", r[0][a:b], dlpack), strings("LABEL", r[1][a:b])])[0]

    def finalize(self):
        self.stub.finalize()
