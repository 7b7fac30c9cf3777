"""The causal-LM kind: a transformers causal-LM teacher, cached top-k log-probs, a layer-pruned student."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from kdops.artifacts import Artifact, Kind
from kdops.gate import Decision, gate_lm
from kdops.errors import UserError
from kdops.kinds.base import RemoteTeacherLoader, RoundOutput, RoundRequest, ServingSpec, TeacherSpec, Tensor
from kdops.paths import Home

_SUMMARY_KEYS = ("ppl_ratio", "student_ppl", "teacher_ppl", "param_ratio", "speedup")


class CausalLMKind:
    kind = Kind.CAUSAL_LM
    students_dir = "lm_students"
    default_recipe = "lm-quick"
    incremental_recipe = "lm-quick"
    # A prompt in, the continuation out; token budget and temperature are optional per request.
    serving = ServingSpec(
        template="lm_model.py",
        inputs=(Tensor("PROMPT", "TYPE_STRING"), Tensor("MAX_TOKENS", "TYPE_INT32", optional=True),
                Tensor("TEMPERATURE", "TYPE_FP32", optional=True)),
        outputs=(Tensor("COMPLETION", "TYPE_STRING"), Tensor("TOKENS", "TYPE_INT32"), Tensor("MODEL_VERSION", "TYPE_STRING")),
        warmup=(("PROMPT", "TYPE_STRING", "this movie was good"), ("MAX_TOKENS", "TYPE_INT32", 4)),
        generates=True,
    )

    def load_teacher(self, spec: TeacherSpec | str | Path, device: str = "cpu", remote: RemoteTeacherLoader | None = None):
        spec = TeacherSpec.of(spec)
        if spec.api is not None:  # its student comes from a model config beside the local tokenizer
            from kdops.api_teacher import ApiLMTeacher

            return ApiLMTeacher(spec.api)
        if spec.remote:  # an LM student is carved from its teacher's layers: it needs the weights here
            raise UserError(f"a causal-LM round needs a local teacher directory; {spec} is a served teacher.")
        from kdops.lm.teacher import HFCausalLMTeacher

        return HFCausalLMTeacher(spec.path, device=device)

    @staticmethod
    def _cache(home: Home):
        from kdops.lm.cache import LMSoftLabelCache

        return LMSoftLabelCache(home.lm_soft_labels)

    def teacher_outputs(self, home: Home, teacher, texts: Sequence[str], recipe) -> dict:
        cache = self._cache(home)
        cache.get_or_compute_topk(teacher, teacher.encode(list(texts), recipe.max_length), recipe.distill.topk)
        return cache.stats.to_dict()

    def run_round(self, req: RoundRequest) -> RoundOutput:
        from kdops.data import Snapshot
        from kdops.lm.rounds import run_lm_round
        from kdops.replay import ReplayBuffer

        texts = Snapshot.load(req.home.snapshots, req.train_snapshot).texts
        replay = ReplayBuffer.of((Snapshot.load(req.home.snapshots, sid).rows for sid in req.replay_snapshots),
                                 seed=req.recipe.distill.seed)
        res = run_lm_round(req.teacher, self._cache(req.home), texts, req.out_dir, req.recipe.distill, req.recipe.shape,
                           req.recipe.max_length, champion_dir=req.champion.path if req.champion else None,
                           replay=replay, device=req.device, progress=req.progress, tail=req.recipe.tail,
                           lineage={"snapshot_ids": {"train": req.train_snapshot, "replay": list(req.replay_snapshots)},
                                    "parent_version": req.parent_version})
        return RoundOutput(Artifact.read(res.artifact), res.history, res.info)

    def evaluate(self, home: Home, artifact: Artifact, teacher, rows: pd.DataFrame, recipe, speed: bool = False) -> dict:
        from kdops.lm.rounds import evaluate_lm

        by_domain = {str(d or "all"): g["text"].tolist() for d, g in rows.groupby(rows["domain"].fillna("all"))}
        # the teacher scores each held-out sequence once, across rounds
        return evaluate_lm(artifact.path, teacher, by_domain, recipe.max_length, speed=speed,
                           cache=self._cache(home)).to_dict()

    def summary(self, report: dict) -> dict:
        s = report["summary"]
        return {k: v for k, v in s.items() if k in _SUMMARY_KEYS or k.startswith("student_ppl/")}

    def gate(self, report: dict, champion_summary: dict | None, recipe) -> Decision:
        return gate_lm(report["summary"], champion_summary, recipe.gate)

    def tracking(self, report: dict, history: list[dict]) -> tuple[dict, dict]:
        from kdops import plots

        per = {name: {"per_domain": {d: {"perplexity": v[name]} for d, v in report["ppl_by_domain"].items()}}
               for name in ("student", "teacher")}
        figures = {"domain_perplexity": plots.domain_accuracy(per, "perplexity", ylim=None)}
        if history:
            figures["learning_curves"] = plots.learning_curves(history)
        return {}, figures

    def load(self, artifact: Artifact, device: str = "cpu"):
        from kdops.lm.student import load_lm_student

        return load_lm_student(artifact, device=device)

    def reference(self, home: Home, artifact: Artifact, texts: Sequence[str], teacher) -> dict:
        # A generation model: the prompts are what is monitored (text checks only)
        return {"baseline_rate": None}

    def embed(self, artifact: Artifact, texts: Sequence[str]):
        return None  # its reference holds no embeddings: prompts get the text checks

    def monitor_teacher(self, teacher):
        return None  # a teacher's next-token distribution labels nothing to disagree with

    def prepare_serving(self, artifact: Artifact, rows: pd.DataFrame) -> Artifact:
        return artifact  # served by torch (bench/lm_int8.py measures whether dynamic INT8 would pay)

    def serving_params(self, artifact: Artifact) -> dict[str, str]:
        return {}

    def smoke_reference(self, artifact: Artifact, texts: list[str], max_tokens: int, onnx: bool = False):
        from kdops.lm.predict import LMGenerator

        return [g.text for g in LMGenerator.from_dir(artifact.path).generate(texts, max_tokens, 0.0)]
