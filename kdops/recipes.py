"""Named recipes: everything one round of a task kind needs to know besides its data, in one place.

A recipe bundles the distillation config, the student shape and the gate thresholds of one kind. The CLI, the
flows and the benchmarks take a recipe by name (``recipe("lm-quick")``) and override single fields with
``dataclasses.replace``; no other place holds defaults of its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from functools import partial

from kdops.artifacts import Kind
from kdops.distill import DistillConfig
from kdops.gate import GateThresholds, LMGateThresholds
from kdops.lm.distill import LMDistillConfig
from kdops.lm.rounds import LMShape
from kdops.lm.tail import TailConfig
from kdops.rounds import StudentShape


@dataclass(frozen=True)
class ClassifierRecipe:
    """A sequence-classifier round: KD + CE (+ feature / attention / relation terms), then the accuracy gate."""

    name: str = field(default="classifier", metadata={"help": "The recipe's name (recorded in lineage)."})
    distill: DistillConfig = field(default_factory=DistillConfig, metadata={"help": "Training and loss settings."})
    shape: StudentShape = field(default_factory=StudentShape, metadata={"help": "How a first-round student is built."})
    gate: GateThresholds = field(default_factory=GateThresholds, metadata={"help": "Promotion thresholds."})

    @property
    def kind(self) -> Kind:
        return Kind.CLASSIFIER

    @property
    def max_length(self) -> int:
        return self.distill.max_length

    def to_dict(self) -> dict:
        return {"kind": self.kind.value, "name": self.name, "distill": self.distill.to_dict(),
                "shape": asdict(self.shape), "gate": asdict(self.gate)}


@dataclass(frozen=True)
class LMRecipe:
    """A causal-LM round: token KD over the teacher's cached top-k + next-token CE, then the perplexity gate."""

    name: str = field(default="lm-quick", metadata={"help": "The recipe's name (recorded in lineage)."})
    # The defaults are lm-quick: 20 of 30 layers, the teacher's full vocabulary kept frozen (no dropped ids,
    # so no tail to fit), 100 steps on 500 sentences: a student the gate accepts in minutes on 2 cores.
    distill: LMDistillConfig = field(
        default_factory=partial(LMDistillConfig, steps=100, batch_size=8, lr=3e-4, freeze_embeddings=True),
        metadata={"help": "Training and loss settings."})
    shape: LMShape = field(default_factory=partial(LMShape, layers=20, trim_vocab=None),
                           metadata={"help": "How a first-round student is carved."})
    gate: LMGateThresholds = field(default_factory=LMGateThresholds, metadata={"help": "Promotion thresholds."})
    tail: TailConfig = field(default_factory=TailConfig, metadata={"help": "How a trimmed vocabulary's tail is fitted."})
    max_length: int = field(default=48, metadata={"help": "Token limit per sentence (start token included)."})
    train_sentences: int = field(default=500, metadata={"help": "Sentences a CLI round samples from the corpus."})

    def __post_init__(self) -> None:
        if self.max_length < 4 or self.train_sentences < 1:
            raise ValueError("max_length must be >= 4 and train_sentences >= 1.")

    @property
    def kind(self) -> Kind:
        return Kind.CAUSAL_LM

    def to_dict(self) -> dict:
        return {"kind": self.kind.value, "name": self.name, "distill": asdict(self.distill), "shape": asdict(self.shape),
                "gate": asdict(self.gate), "tail": asdict(self.tail), "max_length": self.max_length,
                "train_sentences": self.train_sentences}


Recipe = ClassifierRecipe | LMRecipe

# The demo's gate: a round may lose up to 3 points on a slice; a near miss goes to a person.
REVIEW_NEAR_MISSES = GateThresholds(min_retention=0.9, max_slice_drop=0.03)

# The recipes of record. Their measured time and figures are in README.md and bench/README.md.
RECIPES: dict[str, Recipe] = {
    # MiniLM teacher -> 2 alternate layers, rank-64 embeddings, FFN 768: the recipe of record on one domain
    # (bench/quality.py: 0.207x the parameters, retention 0.994 on movie reviews).
    "classifier": ClassifierRecipe(distill=DistillConfig(epochs=8, early_stopping_patience=0)),
    # Half the epochs, and a gate that sends a near miss to review: the demo's first round, minutes on 2 cores.
    "classifier-quick": ClassifierRecipe(name="classifier-quick", distill=DistillConfig(epochs=4, early_stopping_patience=0),
                                         gate=REVIEW_NEAR_MISSES),
    # Continue the champion on new (served, unlabelled) text, replaying earlier domains 1:1 (bench/quality.py).
    "classifier-incremental": ClassifierRecipe(
        name="classifier-incremental", distill=DistillConfig(epochs=4, early_stopping_patience=0, replay_share=1.0),
        gate=REVIEW_NEAR_MISSES),
    # The same with two epochs: the demo's rounds, which share the 2 cores with live traffic.
    "classifier-incremental-quick": ClassifierRecipe(
        name="classifier-incremental-quick", distill=DistillConfig(epochs=2, early_stopping_patience=0, replay_share=1.0),
        gate=REVIEW_NEAR_MISSES),
    # 2 layers with a 384-wide FFN, rank-96 embeddings: on short texts the default's 768 FFN is under 4x the teacher's CPU speed (bench/own_task.py).
    "classifier-own": ClassifierRecipe(name="classifier-own", distill=DistillConfig(epochs=8, lr=2e-4, early_stopping_patience=0),
                                       shape=StudentShape(layers=2, embedding_size=96, intermediate_size=384)),
    # LMRecipe's defaults: 0.74x the parameters, 1.025x the teacher's perplexity, 8.4-9.7 min on 2 cores.
    "lm-quick": LMRecipe(),
    # SmolLM2-135M -> 11 of 30 layers, 16k-id vocabulary with a fitted context tail: 0.40x the parameters,
    # about 1.12x the teacher's perplexity, about 2.6x its generation speed (bench/lm.py).
    "lm-full": LMRecipe(
        name="lm-full",
        distill=LMDistillConfig(steps=2000, batch_size=8, lr=6e-4),
        shape=LMShape(layers=11, trim_vocab=16384, tail_rank=64),
        tail=TailConfig(rank=64, calibration_fraction=0.25, calibration_max=2500),
        train_sentences=8029),
}


def resolve_recipe(value: "str | Recipe") -> Recipe:
    """A recipe value as it is, or the named one (flow parameters from a deployment arrive as names)."""
    return recipe(value) if isinstance(value, str) else value


def recipe(name: str, **overrides) -> Recipe:
    """The named recipe, with top-level fields replaced (``recipe("lm-full", max_length=64)``)."""
    try:
        base = RECIPES[name]
    except KeyError as e:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}.") from e
    return replace(base, **overrides) if overrides else base


def with_student(r: Recipe, layers: int = 0, embedding_size: int = -1, epochs: int = 0) -> Recipe:
    """``r`` with a project's ``[student]`` keys applied where the recipe has such a field (0 / -1: the recipe's)."""
    shape, distill = r.shape, r.distill
    if layers and hasattr(shape, "layers"):
        shape = replace(shape, layers=layers)
    if embedding_size >= 0 and hasattr(shape, "embedding_size"):
        shape = replace(shape, embedding_size=embedding_size or None)
    if epochs and hasattr(distill, "epochs"):
        distill = replace(distill, epochs=epochs)
    return replace(r, shape=shape, distill=distill)
