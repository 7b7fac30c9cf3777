"""The sequence-classifier kind: a transformers classifier teacher, cached logits, a small BERT student."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from kdops.artifacts import Artifact, Kind, load_student
from kdops.gate import Decision, gate
from kdops.errors import UserError
from kdops.kinds.base import RemoteTeacherLoader, RoundOutput, RoundRequest, ServingSpec, TeacherSpec, Tensor
from kdops.paths import Home


class ClassifierKind:
    kind = Kind.CLASSIFIER
    students_dir = "students"
    default_recipe = "classifier"
    incremental_recipe = "classifier-incremental"
    serving = ServingSpec(
        template="model.py",
        inputs=(Tensor("TEXT", "TYPE_STRING"),),
        outputs=(Tensor("PROBABILITIES", "TYPE_FP32", 0), Tensor("LABEL", "TYPE_STRING"),
                 Tensor("MODEL_VERSION", "TYPE_STRING")),
        warmup=(("TEXT", "TYPE_STRING", "this movie was good"),),
        onnx_template="onnx_model.py",
    )

    def load_teacher(self, spec: TeacherSpec | str | Path, device: str = "cpu", remote: RemoteTeacherLoader | None = None):
        """A local transformers classifier, or a served one built by ``remote`` (its students are carved from a
        local base encoder instead: ``kdops.rounds.StudentShape.base``)."""
        spec = TeacherSpec.of(spec)
        if spec.api is not None:
            from kdops.api_teacher import ApiClassifierTeacher

            return ApiClassifierTeacher(spec.api)
        if spec.remote:
            if remote is None:
                raise UserError(f"teacher {spec} is served remotely, and no loader for served teachers was given.")
            return remote(spec)
        from kdops.teacher import HFTeacher

        return HFTeacher(spec.path, device=device)

    @staticmethod
    def _cache(home: Home):
        from kdops.soft_labels import SoftLabelCache

        return SoftLabelCache(home.soft_labels)

    def teacher_outputs(self, home: Home, teacher, texts: Sequence[str], recipe) -> dict:
        cache = self._cache(home)
        cache.get_or_compute(teacher, list(texts))
        return cache.stats.to_dict()

    def run_round(self, req: RoundRequest) -> RoundOutput:
        from kdops.data import Snapshot
        from kdops.replay import ReplayBuffer
        from kdops.rounds import run_round

        snap = Snapshot.load(req.home.snapshots, req.train_snapshot)
        replay = ReplayBuffer.load(req.home.replay) if (req.home.replay / "replay.json").exists() else ReplayBuffer()
        res = run_round(req.teacher, self._cache(req.home), snap.rows, req.out_dir, req.recipe.distill,
                        shape=req.recipe.shape, champion_dir=req.champion.path if req.champion else None, replay=replay,
                        snapshot_ids={"train": req.train_snapshot}, parent_version=req.parent_version,
                        checkpoint_dir=req.home.checkpoints(req.out_dir.name), progress=req.progress)
        replay.save(req.home.replay)
        info = {"seconds": res.result.seconds, "cache": res.cache, "replay_rows": res.replay_rows,
                "train_rows": res.train_rows}
        return RoundOutput(Artifact.read(req.out_dir), res.result.history, info)

    def evaluate(self, home: Home, artifact: Artifact, teacher, rows: pd.DataFrame, recipe, speed: bool = False) -> dict:
        from kdops.evaluate import evaluate
        from kdops.predict import Predictor

        known = rows[rows["label"].isin(teacher.label_names)].reset_index(drop=True)
        logits = self._cache(home).get_or_compute(teacher, known["text"].tolist())
        # a served teacher knows its size only if its export recorded it: no ratio otherwise
        params = teacher.num_parameters() if hasattr(teacher, "num_parameters") else None
        return evaluate(Predictor.from_dir(artifact.path), known, logits, teacher.label_names, speed=speed,
                        robustness=False, teacher_params=params).to_dict()

    def summary(self, report: dict) -> dict:
        return {"retention": report["retention"], "accuracy": report["overall"]["accuracy"],
                "per_domain": {d: {"accuracy": m["accuracy"], "n": m.get("n", 0)} for d, m in report["per_domain"].items()}}

    def gate(self, report: dict, champion_summary: dict | None, recipe) -> Decision:
        return gate(report, champion_summary, recipe.gate)

    def tracking(self, report: dict, history: list[dict]) -> tuple[dict, dict]:
        from kdops import plots

        figures = {"domain_accuracy": plots.domain_accuracy({"student": report, "teacher": None, "champion": None})}
        if history:
            figures["learning_curves"] = plots.learning_curves(history)
        return {}, figures

    def load(self, artifact: Artifact, device: str = "cpu"):
        return load_student(artifact, device=device)

    def reference(self, home: Home, artifact: Artifact, texts: Sequence[str], teacher) -> dict:
        from kdops.predict import Predictor

        p = Predictor.from_dir(artifact.path)
        probs = p.predict_proba(list(texts))
        baseline = None
        if teacher is not None:
            teacher_logits = self._cache(home).get_or_compute(teacher, list(texts))
            baseline = float((probs.argmax(-1) != np.asarray(teacher_logits).argmax(-1)).mean())
        return {"probabilities": probs, "embeddings": p.embed(list(texts)), "label_names": list(p.label_names),
                "baseline_rate": baseline}

    def embed(self, artifact: Artifact, texts: Sequence[str]):
        if (artifact.extra.get("onnx") or {}).get("fp32"):  # the fp32 graph: torch's numbers, without torch's cost
            from kdops.onnx_predict import FP32_GRAPH, OnnxPredictor

            return OnnxPredictor.from_dir(artifact.path, graph=FP32_GRAPH, verify=False).embed(list(texts))
        from kdops.predict import Predictor

        return Predictor.from_dir(artifact.path).embed(list(texts))

    def monitor_teacher(self, teacher):
        return teacher.logits

    def prepare_serving(self, artifact: Artifact, rows: pd.DataFrame) -> Artifact:
        from kdops.onnx_export import prepare

        return prepare(artifact, rows)

    def serving_params(self, artifact: Artifact) -> dict[str, str]:
        import json

        return {"kdops_label_names": json.dumps(list(artifact.label_names))}

    def smoke_reference(self, artifact: Artifact, texts: list[str], max_tokens: int, onnx: bool = False):
        if onnx:
            return _onnx_reference(artifact.path, artifact.sha256.get("model.onnx", ""), tuple(texts))
        from kdops.predict import Predictor

        return Predictor.from_dir(artifact.path).predict_proba(texts)


@functools.lru_cache(maxsize=8)
def _onnx_reference(path: Path, digest: str, texts: tuple[str, ...]):
    """An ONNX student's answers for the smoke texts, once per artifact: swaps back and forth between two versions
    would otherwise build a session on the serving cores for every swap (``digest`` keys the cache by content)."""
    from kdops.onnx_predict import OnnxPredictor

    return OnnxPredictor.from_dir(path, verify=False).predict_proba(list(texts))
