"""The task-kind interface: everything that differs between a classifier and a causal LM, behind one protocol.

A flow, the registry and the server ask ``kdops.kinds.for_artifact(artifact)`` (or ``for_recipe``) for the
implementation and call it; only ``kdops.kinds`` maps a ``Kind`` to a class. Adding a kind (token
classification, say) is one new module here implementing ``TaskKind`` plus one line in the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import pandas as pd

from kdops.artifacts import Artifact, Kind
from kdops.errors import UserError
from kdops.gate import Decision
from kdops.paths import Home


@dataclass(frozen=True)
class TeacherSpec:
    """Which teacher a round uses: a local model directory, a model served by Triton (URL and model name), or one
    behind an OpenAI-compatible API (``api``: ``kdops.api_teacher.ApiTeacherConfig``).

    A kind loads a local or API teacher itself; a Triton one comes from the ``remote`` loader its caller passes to
    ``TaskKind.load_teacher`` (the flows pass ``serving.teacher.TritonTeacher``), so kdops never imports serving/."""

    path: str = field(default="", metadata={"help": "Local model directory (transformers, safetensors)."})
    url: str = field(default="", metadata={"help": "Triton HTTP host:port serving the teacher."})
    model: str = field(default="", metadata={"help": "The teacher's model name on that server."})
    api: Any = field(default=None, metadata={"help": "An OpenAI-compatible teacher (kdops.api_teacher.ApiTeacherConfig)."})

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", str(self.path))
        if self.api is not None:
            if self.path or self.url:
                raise UserError(f"a teacher is an API ({self.api.model} at {self.api.base_url}) or a directory / Triton model, not both.")
            return
        if bool(self.url) != bool(self.model):
            raise UserError(f"a served teacher needs both a URL and a model name (got url={self.url!r}, model={self.model!r}).")
        if self.path and self.url:
            raise UserError(f"a teacher is a directory ({self.path}) or a served model ({self.model}), not both.")
        if not (self.path or self.url):
            raise UserError("no teacher: give a teacher directory, or a Triton URL and model name.")

    @property
    def remote(self) -> bool:
        """Served elsewhere: no local weights to carve a student from."""
        return bool(self.url) or self.api is not None

    @classmethod
    def of(cls, value: "TeacherSpec | str | Path") -> "TeacherSpec":
        """A spec as it is, or a local directory's."""
        return value if isinstance(value, TeacherSpec) else cls(path=str(value))

    def __str__(self) -> str:
        if self.api is not None:
            return f"{self.api.model} at {self.api.base_url} (OpenAI API)"
        return self.path or f"{self.model} at {self.url}"


# Builds a served teacher from its spec; the caller that may import serving/ provides it.
RemoteTeacherLoader = Callable[[TeacherSpec], Any]


@dataclass(frozen=True)
class Tensor:
    """One served input or output: Triton name, Triton dtype, dims of one item, optional per request."""

    name: str
    dtype: str
    dims: int | tuple[int, ...] = 1  # 0: one per label; a tuple for several dims (-1: any length)
    optional: bool = False


@dataclass(frozen=True)
class ServingSpec:
    """How a kind is served on Triton, as data: serving/ builds config.pbtxt and the smoke check from it."""

    template: str = field(metadata={"help": "model.py template under serving/templates/."})
    inputs: tuple[Tensor, ...] = field(metadata={"help": "Request tensors."})
    outputs: tuple[Tensor, ...] = field(metadata={"help": "Response tensors (dims 0: one per label)."})
    warmup: tuple[tuple[str, str, str | int | float], ...] = field(
        metadata={"help": "What a warm-up request sends before the model is marked ready: (input, dtype, value)."})
    generates: bool = field(default=False, metadata={"help": "A generation model: prompts in, text out (can stream)."})
    onnx_template: str = field(default="", metadata={"help": "model.py template serving the artifact's ONNX graphs on a CPU (empty: torch only)."})


@dataclass(frozen=True)
class RoundRequest:
    """One round's inputs, whatever the kind."""

    home: Home
    teacher: Any
    train_snapshot: str
    out_dir: Path
    recipe: Any
    champion: Artifact | None = None
    parent_version: int | None = None
    replay_snapshots: tuple[str, ...] = ()
    device: str = "cpu"
    progress: bool = False


@dataclass
class RoundOutput:
    artifact: Artifact
    history: list[dict]
    info: dict


class TaskKind(Protocol):
    """What one task kind provides. Every method is generic in its callers."""

    kind: Kind
    students_dir: str  # under the home: where this kind's round artifacts go
    default_recipe: str  # the kdops.recipes name a first round of this kind uses unless told otherwise
    incremental_recipe: str  # ... and a round that continues a champion on new traffic
    serving: ServingSpec

    def load_teacher(self, spec: TeacherSpec | str | Path, device: str = "cpu",
                     remote: RemoteTeacherLoader | None = None) -> Any:
        """The teacher ``spec`` names (a bare path is a local directory); a served one is built by ``remote``.
        UserError when this kind cannot use such a teacher."""

    def teacher_outputs(self, home: Home, teacher, texts: Sequence[str], recipe) -> dict:
        """Fill the kind's content-addressed cache for ``texts``; return its hit/miss stats."""

    def run_round(self, req: RoundRequest) -> RoundOutput: ...

    def evaluate(self, home: Home, artifact: Artifact, teacher, rows: pd.DataFrame, recipe, speed: bool = False) -> dict:
        """The full report of a candidate on evaluation rows (text, label, domain)."""

    def summary(self, report: dict) -> dict:
        """The headline figures: what the ledger keeps and a later gate reads back as the champion's."""

    def gate(self, report: dict, champion_summary: dict | None, recipe) -> Decision: ...

    def tracking(self, report: dict, history: list[dict]) -> tuple[dict[str, float], dict[str, Any]]:
        """(metrics, figures by name) for the round's tracking run."""

    def load(self, artifact: Artifact, device: str = "cpu") -> tuple[Any, Any, Artifact]:
        """(model, tokenizer, artifact), verified."""

    def reference(self, home: Home, artifact: Artifact, texts: Sequence[str], teacher) -> dict:
        """Keyword arguments for monitoring's reference profile (probabilities, embeddings, label_names) and the
        champion's own disagreement with the teacher (``baseline_rate``; None where there is nothing to compare)."""

    def embed(self, artifact: Artifact, texts: Sequence[str]) -> Any:
        """The artifact's sentence embeddings of ``texts`` (N, dim), as ``reference`` computes them for the reference
        profile, for the embedding-drift test on served windows; None where the kind has none."""

    def monitor_teacher(self, teacher) -> Callable[[list[str]], Any] | None:
        """What the drift monitor's teacher-disagreement check calls on a window's texts (None: no such check)."""

    def prepare_serving(self, artifact: Artifact, rows: pd.DataFrame) -> Artifact:
        """``artifact`` with whatever it is served from besides its weights (a classifier's ONNX graphs, gated on
        evaluation ``rows``); idempotent."""

    def serving_params(self, artifact: Artifact) -> dict[str, str]:
        """Kind-specific model parameters of the served config (label names ...)."""

    def smoke_reference(self, artifact: Artifact, texts: list[str], max_tokens: int, onnx: bool = False) -> Any:
        """What the served model must answer for ``texts`` (computed locally), for the swap's smoke check;
        ``onnx``: the model serves the artifact's ONNX graph for this CPU (its ``serving.onnx_template``)."""
