"""The task-kind table: the one place that maps a ``Kind`` to its implementation (``kdops.kinds.base.TaskKind``).

Everything after this lookup is generic: flows, the registry and the server call the returned object.
"""

from __future__ import annotations

from pathlib import Path

from kdops.artifacts import Artifact, Kind
from kdops.kinds.base import RemoteTeacherLoader, RoundOutput, RoundRequest, ServingSpec, TaskKind, TeacherSpec, Tensor
from kdops.kinds.causal_lm import CausalLMKind
from kdops.kinds.classifier import ClassifierKind

KINDS: dict[Kind, TaskKind] = {
    Kind.CLASSIFIER: ClassifierKind(),
    Kind.CAUSAL_LM: CausalLMKind(),
}


def get(kind: Kind | str) -> TaskKind:
    """The implementation of ``kind`` (a ``Kind`` or its value); ValueError names the known ones."""
    try:
        return KINDS[Kind(kind)]
    except (ValueError, KeyError) as e:
        raise ValueError(f"unknown task kind {kind!r}; known: {', '.join(k.value for k in KINDS)}.") from e


def for_artifact(artifact: Artifact | str | Path) -> TaskKind:
    art = artifact if isinstance(artifact, Artifact) else Artifact.read(artifact)
    return get(art.kind)


def for_recipe(recipe) -> TaskKind:
    return get(recipe.kind)


def load(artifact: Artifact | str | Path, device: str = "cpu"):
    """``(model, tokenizer, artifact)`` of any kdops artifact, verified."""
    art = artifact if isinstance(artifact, Artifact) else Artifact.read(artifact)
    return get(art.kind).load(art, device=device)


__all__ = ["KINDS", "Kind", "TaskKind", "RoundRequest", "RoundOutput", "ServingSpec", "Tensor", "TeacherSpec",
           "RemoteTeacherLoader", "get", "for_artifact", "for_recipe", "load"]
