"""Causal-LM distillation: the language-model counterpart of the classifier pipeline.

One module per stage, imports pointing one way:
``teacher`` (load / cache a causal LM, top-k and generations) -> ``cache`` (top-k soft labels and teacher
generations per content hash) -> ``student`` (layer-pruned or config-built students, artifacts) ->
``distill`` (token- and sequence-level KD rounds) -> ``evaluate`` (perplexity, agreement, speed, memory).

Nothing here runs on import; heavy libraries are imported by the functions that need them.
"""
