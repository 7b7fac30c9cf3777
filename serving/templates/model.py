"""Triton Python-backend adapter for a kdops student or an HF teacher (copied into <repo>/<model>/<version>/).

Thin on purpose: names, dtypes and settings come from config.pbtxt; prediction is kdops.predict (student)
or kdops.teacher.HFTeacher (teacher); one response per request; a bad request gets its own error
response (pb_utils.TritonError) and never takes the model down. It imports triton_python_backend_utils,
so it only runs inside the server; everything worth unit-testing lives in kdops/ and serving/.
"""

import json
import os
import sys
from pathlib import Path

# The stub runs Python isolated, so PYTHONPATH is ignored; serving/server.py puts the kdops repository root
# there (the editable install's .pth finder is not always active), so apply it by hand, first.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


def _param(cfg, key, default=""):
    return cfg.get("parameters", {}).get(key, {}).get("string_value", default)


class TritonPythonModel:
    def initialize(self, args):
        import torch

        from kdops.predict import check_texts

        self.check_texts = check_texts
        cfg = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        self.kind = _param(cfg, "kdops_kind", "student")
        self.version = _param(cfg, "kdops_version", args["model_version"])
        self.max_chars = int(_param(cfg, "kdops_max_chars", "20000"))
        threads = int(_param(cfg, "kdops_torch_threads", "0"))
        if threads > 0:
            # Why: on a small CPU box intra-op threads of several instances (and of a slot being loaded
            # during a hot swap) oversubscribe the cores; the export config bounds them.
            torch.set_num_threads(threads)
        on_gpu = args["model_instance_kind"] == "GPU"
        self.device = f"cuda:{args['model_instance_device_id']}" if on_gpu else "cpu"
        # numpy-2 outputs come back empty from this backend version (shared NOTES): use DLPack there.
        self.use_dlpack = (on_gpu or int(np.__version__.split(".")[0]) >= 2
                           or _param(cfg, "kdops_dlpack_outputs", "0") == "1")
        self.in_name = cfg["input"][0]["name"]
        outs = {o["name"]: o for o in cfg["output"]}
        self.out_scores = next(n for n in outs if outs[n]["data_type"] == "TYPE_FP32")
        self.out_label = "LABEL"
        self.out_version = "MODEL_VERSION" if "MODEL_VERSION" in outs else None
        here = Path(args["model_repository"]) / args["model_version"]
        if self.kind == "teacher":
            from kdops.teacher import HFTeacher

            self.teacher = HFTeacher(here / "artifact", device=self.device)
            self.label_names = self.teacher.label_names
            self.watcher = None
        else:
            from kdops.hotreload import start_reloadable
            from kdops.predict import Predictor

            def load(artifact, version):
                p = Predictor.from_dir(artifact, device=self.device, max_chars=self.max_chars, version=version)
                p.predict_proba(["warm-up", "a warm-up text of two rows"])  # first-call costs paid here
                return p

            # A hot swap may replace the weights in place (kdops.hotreload).
            self.predictor, self.watcher = start_reloadable(
                Path(args["model_repository"]).parent, self.model_name, args["model_instance_name"],
                here / "artifact", self.version, load, self._install, pb_utils.Logger.log_warn)
            self.version, self.label_names = self.predictor.version, self.predictor.label_names
        self.log = None
        log_dir = _param(cfg, "kdops_prediction_log_dir")
        if log_dir:
            from kdops.prediction_log import PredictionLogWriter

            source = f"{self.model_name}-v{args['model_version']}-i{args['model_instance_name'].split('_')[-1]}"
            self.log = PredictionLogWriter(log_dir, source.replace("/", "_"))

    def _install(self, predictor):
        # One attribute assignment: a batch in flight finishes on the predictor it started with.
        self.predictor = predictor

    def _scores(self, texts, predictor):
        """(N, num_labels) float32 torch tensor: probabilities (student) or logits (teacher)."""
        import torch

        if self.kind == "teacher":
            return torch.from_numpy(self.teacher.logits(texts))
        return predictor.logits(texts).softmax(-1).float()

    def execute(self, requests):
        # Validate per request so one bad request fails alone; run the good ones as one batch.
        texts, spans, errors = [], [], {}
        for i, request in enumerate(requests):
            try:
                arr = pb_utils.get_input_tensor_by_name(request, self.in_name).as_numpy().reshape(-1)
                batch = self.check_texts(list(arr), self.max_chars)
            except Exception as e:  # InputError and anything odd in the tensor: an error response
                errors[i] = f"{self.model_name}: bad request: {e}"
                continue
            spans.append((i, len(texts), len(texts) + len(batch)))
            texts.extend(batch)
        responses = [None] * len(requests)
        for i, msg in errors.items():
            responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(msg))
        if not texts:
            return responses
        predictor = self.predictor if self.kind != "teacher" else None  # this batch's, even if a reload lands now
        label_names = predictor.label_names if predictor is not None else self.label_names
        version = predictor.version if predictor is not None else self.version
        try:
            scores = self._scores(texts, predictor)  # (N, L)
        except Exception as e:
            for i, _, _ in spans:
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{self.model_name}: inference failed: {e}"))
            return responses
        top = scores.argmax(-1).tolist()
        labels = [label_names[k] for k in top]
        for i, a, b in spans:
            part = scores[a:b].contiguous()
            if self.use_dlpack:
                from torch.utils.dlpack import to_dlpack

                t_scores = pb_utils.Tensor.from_dlpack(self.out_scores, to_dlpack(part))
            else:
                t_scores = pb_utils.Tensor(self.out_scores, part.cpu().numpy().astype(np.float32))
            outs = [t_scores, pb_utils.Tensor(self.out_label, np.array([[x.encode()] for x in labels[a:b]], object))]
            if self.out_version:
                outs.append(pb_utils.Tensor(self.out_version, np.array([[version.encode()]] * (b - a), object)))
            responses[i] = pb_utils.InferenceResponse(output_tensors=outs)
        if self.log is not None:
            try:  # a full disk must not fail predictions: count and carry on
                self.log.write_batch(texts, scores.cpu().numpy(), labels, self.model_name, version)
            except OSError as e:
                pb_utils.Logger.log_warn(f"prediction log write failed: {e}")
        return responses

    def finalize(self):
        if self.watcher is not None:
            self.watcher.stop()
        if self.log is not None:
            self.log.close()
