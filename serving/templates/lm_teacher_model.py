"""Triton Python-backend adapter for a causal-LM teacher (copied into <repo>/<model>/<version>/).

Inputs: ``IDS`` (B, T) int64 right-padded token ids, ``LENGTHS`` (B,), ``K`` [1] and ``MAX_NEW_TOKENS`` [1].
``MAX_NEW_TOKENS`` 0: ``TOPK_IDS`` / ``TOPK_LOGPROBS`` (B, T-1, K) are the teacher's top-k next-token log-probs
and ``TOKEN_LOGPROBS`` (B, T-1) the log-prob of each actual next token (rows past a sequence's length are
padding); otherwise ``GENERATED`` (B, N) holds greedy continuations padded
with -1. The other outputs are empty. The work is kdops.lm.teacher.HFCausalLMTeacher's own topk / generate;
settings, threads and error responses are serving.backend's.
"""

import os
import sys

# The stub runs Python isolated, so PYTHONPATH is ignored; apply it by hand, first (as model.py does).
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from serving.backend import Stub, error_response  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        from kdops.lm.teacher import HFCausalLMTeacher

        self.stub = Stub(args)
        self.teacher = HFCausalLMTeacher(self.stub.settings.artifact, device=self.stub.settings.device)

    def _one(self, request):
        ids = pb_utils.get_input_tensor_by_name(request, "IDS").as_numpy()
        lengths = pb_utils.get_input_tensor_by_name(request, "LENGTHS").as_numpy().reshape(-1)
        k = int(pb_utils.get_input_tensor_by_name(request, "K").as_numpy().reshape(-1)[0])
        new = int(pb_utils.get_input_tensor_by_name(request, "MAX_NEW_TOKENS").as_numpy().reshape(-1)[0])
        if ids.ndim != 2 or len(lengths) != ids.shape[0] or (lengths < 1).any() or (lengths > ids.shape[1]).any():
            raise ValueError(f"IDS {ids.shape} and LENGTHS {lengths.tolist()} do not match")
        if not 1 <= k <= self.teacher.vocab_size or not 0 <= new <= 1024:
            raise ValueError(f"K must be in [1, vocab], MAX_NEW_TOKENS in [0, 1024]; got {k}, {new}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.teacher.vocab_size):
            raise ValueError("token ids outside the teacher's vocabulary")
        seqs = [ids[i, : int(n)].tolist() for i, n in enumerate(lengths)]
        B, T = ids.shape
        top_ids = np.zeros((B, max(T - 1, 0), k), np.int32)
        top_lps = np.zeros((B, max(T - 1, 0), k), np.float32)
        generated = np.zeros((B, 0), np.int64)
        targets = np.zeros((B, max(T - 1, 0)), np.float32)
        if new == 0:
            for i, (tid, tlp, tgt) in enumerate(self.teacher.scored_topk(seqs, k)):
                top_ids[i, : len(tid)], top_lps[i, : len(tlp)], targets[i, : len(tgt)] = tid, tlp, tgt
        else:
            top_ids, top_lps, targets = top_ids[:, :0], top_lps[:, :0], targets[:, :0]
            rows = self.teacher.generate(seqs, new)
            generated = np.full((B, max([len(r) for r in rows] + [0])), -1, np.int64)
            for i, r in enumerate(rows):
                generated[i, : len(r)] = r
        return [pb_utils.Tensor("TOPK_IDS", top_ids), pb_utils.Tensor("TOPK_LOGPROBS", top_lps),
                pb_utils.Tensor("TOKEN_LOGPROBS", targets), pb_utils.Tensor("GENERATED", generated)]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=self._one(request)))
            except Exception as e:  # a bad request fails alone; the model keeps serving
                responses.append(error_response(f"{self.stub.settings.model}: bad request: {e}", client=True))
        return responses

    def finalize(self):
        self.stub.finalize()
