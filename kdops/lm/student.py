"""Stage 3 (LM): causal-LM students, carved from a Llama-family teacher or built from a smaller config.

- ``prune_layers``: keep a subset of the teacher's decoder layers (evenly spaced, the first N, the first
  N-1 plus the last: Gromov et al. 2024 find deep Llama layers the most redundant, and the top layer the
  one whose removal hurts most; or, measured, the most influential ones, ``layer_influence``), with every
  kept weight copied unchanged. Chosen by influence, the untrained student starts orders of magnitude closer to
  the teacher's perplexity than the first-N-plus-last choice.
- Vocabulary trimming (``keep_ids``): SmolLM2-135M spends 28.3M of its 134.5M parameters on a tied
  49,152 x 576 embedding, so no layer-pruned student is under 21% of the teacher. A student may keep
  only the ids that matter in its domain (Ushio et al. 2023, vocabulary trimming) plus one ``<other>``
  row. It stays a proper distribution over the full vocabulary: a dropped id gets
  ``p(<other>) x tail(id)``, where the tail is uniform over the dropped ids until a round fits it
  (kdops.lm.tail), so perplexities stay comparable with the teacher's, and dropped ids that occur in
  held-out text are paid for in full. A fitted ``TailHead`` makes ``<other>``'s share and the tail depend
  on the last hidden state (scoring only). Generation never emits ``<other>``, so neither changes it.
- ``prune_mlp``: width pruning after depth pruning: every kept layer keeps only its most active MLP neurons
  (Minitron, Muralidharan et al. 2024: activation importance on calibration text), so a student can shed
  parameters without dropping a whole layer.
- ``from_config``: a random-init ``LlamaForCausalLM`` of any shape with the teacher's tokenizer.

``LMStudent`` wraps the HF model and the id map; ``save_lm_student`` / ``load_lm_student`` write and read
safetensors + config + tokenizer + ``kdops.json`` lineage with a SHA-256 check (never pickle).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from kdops.artifacts import Artifact, ArtifactError, Kind, Lineage, write_artifact
from kdops.lm.tail import TailHead, uniform_tail
from kdops.paths import atomic_dir

VOCAB_MAP = "vocab_map.safetensors"


def select_layers(num_teacher_layers: int, num_layers: int, strategy: str = "first_last") -> list[int]:
    """Teacher layer indices to keep: ``even`` (0 and the top one included), ``first``, ``first_last``."""
    L, n = num_teacher_layers, num_layers
    if not 1 <= n <= L:
        raise ValueError(f"num_layers must be in [1, {L}], got {n}.")
    if strategy == "first":
        return list(range(n))
    if strategy == "first_last":
        return list(range(n - 1)) + [L - 1] if n > 1 else [L - 1]
    if strategy == "even":
        return [0] if n == 1 else sorted({round(i * (L - 1) / (n - 1)) for i in range(n)})
    raise ValueError(f"strategy must be 'even', 'first' or 'first_last', got {strategy!r}.")


@torch.no_grad()
def layer_influence(model: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int = 0, batch_size: int = 16) -> list[float]:
    """Block influence of each decoder layer (ShortGPT, Men et al. 2024): 1 - mean cosine similarity between the
    hidden state a layer receives and the one it returns, over every real token of ``sequences``. A layer that
    barely changes its input (low influence) is the cheapest to drop."""
    from kdops.lm.teacher import padded_batches

    total, count = None, 0
    for _, ids, mask in padded_batches(sequences, pad_id, batch_size, next(model.parameters()).device):
        m = mask.bool()
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
        sims = torch.stack([torch.nn.functional.cosine_similarity(hs[i][m].float(), hs[i + 1][m].float(), dim=-1).sum()
                            for i in range(len(hs) - 1)])
        total = sims if total is None else total + sims
        count += int(m.sum())
    return (1 - total / max(count, 1)).tolist()


def select_by_influence(influence: Sequence[float], num_layers: int) -> list[int]:
    """The ``num_layers`` most influential layers; the first and the last are always kept."""
    L = len(influence)
    if not 2 <= num_layers <= L:
        raise ValueError(f"num_layers must be in [2, {L}] for influence-based selection, got {num_layers}.")
    middle = sorted(range(1, L - 1), key=lambda i: -influence[i])[: num_layers - 2]
    return sorted([0, L - 1, *middle])


@torch.no_grad()
def mlp_neuron_importance(model: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int = 0,
                          batch_size: int = 16) -> list[torch.Tensor]:
    """Per decoder layer, each MLP neuron's mean absolute activation (the input of ``down_proj``) over every real
    token of ``sequences``: the activation-based width importance of Minitron (Muralidharan et al. 2024)."""
    from kdops.lm.teacher import padded_batches

    device = next(model.parameters()).device
    layers = model.model.layers
    totals = [torch.zeros(layer.mlp.down_proj.in_features, device=device) for layer in layers]
    state: dict[str, torch.Tensor] = {}

    def hook(i):
        def add(module, inputs):
            totals[i] += inputs[0][state["mask"]].float().abs().sum(0)
        return add

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    count = 0
    try:
        for _, ids, mask in padded_batches(sequences, pad_id, batch_size, device):
            state["mask"] = mask.bool()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            count += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    return [t / max(count, 1) for t in totals]


@torch.no_grad()
def prune_mlp(student: LMStudent, intermediate: int, sequences: Sequence[Sequence[int]], pad_id: int = 0) -> list[list[int]]:
    """Width pruning in place: every decoder layer keeps its ``intermediate`` most active MLP neurons on
    ``sequences`` (full-vocabulary ids; ``mlp_neuron_importance``), rows of ``gate_proj`` / ``up_proj`` and
    columns of ``down_proj`` copied unchanged. Returns the kept neuron indices per layer. A neuron that never
    fires contributes nothing, so dropping only such neurons leaves the outputs unchanged."""
    model = student.model
    size = int(model.config.intermediate_size)
    if not 1 <= intermediate <= size:
        raise ValueError(f"intermediate must be in [1, {size}]; got {intermediate}.")
    layers = model.model.layers
    if intermediate == size:
        return [list(range(size)) for _ in layers]
    # the model reads student ids: a trimmed student's dropped ids become <other>
    mapped = [student.map_ids(torch.as_tensor(list(seq), dtype=torch.long)).tolist() for seq in sequences]
    importance = mlp_neuron_importance(model, mapped, int(student.map_ids(torch.tensor(pad_id))))
    kept: list[list[int]] = []
    for layer, score in zip(layers, importance):
        keep = score.topk(intermediate).indices.sort().values
        mlp = layer.mlp
        for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            old: nn.Linear = getattr(mlp, name)
            shape = (old.in_features, intermediate) if dim == 0 else (intermediate, old.out_features)
            new = nn.Linear(*shape, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
            new.weight.copy_(old.weight.index_select(dim, keep.to(old.weight.device)))
            if old.bias is not None:
                new.bias.copy_(old.bias[keep] if dim == 0 else old.bias)
            setattr(mlp, name, new)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = intermediate
        kept.append(keep.tolist())
    model.config.intermediate_size = intermediate
    return kept


class LMStudent(nn.Module):
    """A causal LM over a (possibly trimmed) vocabulary that scores and generates in full-vocabulary ids."""

    def __init__(self, model: nn.Module, full_vocab_size: int, keep_ids: torch.Tensor | None = None,
                 tail_logprob: torch.Tensor | None = None, head: TailHead | None = None):
        super().__init__()
        self.model = model
        self.head: TailHead | None = None
        self.full_vocab_size = int(full_vocab_size)
        if keep_ids is None:
            self.register_buffer("keep_ids", torch.zeros(0, dtype=torch.long), persistent=False)
            self.register_buffer("to_student", torch.zeros(0, dtype=torch.long), persistent=False)
            self.register_buffer("tail_logprob", torch.zeros(0), persistent=False)
        else:
            keep_ids = torch.as_tensor(keep_ids, dtype=torch.long)
            to_student = torch.full((full_vocab_size,), len(keep_ids), dtype=torch.long)  # default: <other>
            to_student[keep_ids] = torch.arange(len(keep_ids))
            self.register_buffer("keep_ids", keep_ids, persistent=False)
            self.register_buffer("to_student", to_student, persistent=False)
            # log p(id | <other>) at dropped ids (kdops.lm.tail); uniform until a round fits it
            tail = uniform_tail(full_vocab_size, keep_ids) if tail_logprob is None else torch.as_tensor(tail_logprob).float()
            if tail.shape != (full_vocab_size,):
                raise ValueError(f"tail_logprob must have shape ({full_vocab_size},); got {tuple(tail.shape)}.")
            self.register_buffer("tail_logprob", tail, persistent=False)
            dropped = torch.ones(full_vocab_size, dtype=torch.bool)
            dropped[keep_ids] = False
            to_dropped = torch.full((full_vocab_size,), -1, dtype=torch.long)  # full id -> index among dropped ids
            to_dropped[dropped] = torch.arange(int(dropped.sum()))
            self.register_buffer("to_dropped", to_dropped, persistent=False)
            if head is not None:
                self.set_head(head)

    @property
    def trimmed(self) -> bool:
        return self.keep_ids.numel() > 0

    @property
    def other_id(self) -> int | None:
        return int(self.keep_ids.numel()) if self.trimmed else None

    @property
    def config(self):
        return self.model.config

    def num_parameters(self) -> int:
        """The model's parameters plus, when trimmed, the tail's entries (one per dropped id) and the head's."""
        tail = self.full_vocab_size - int(self.keep_ids.numel()) if self.trimmed else 0
        head = sum(p.numel() for p in self.head.parameters()) if self.head is not None else 0
        return sum(p.numel() for p in self.model.parameters()) + tail + head

    def set_head(self, head: TailHead | None) -> None:
        """Install a fitted context tail (kdops.lm.tail.fit_tail_head), or remove it with None."""
        if head is not None:
            n_dropped = self.full_vocab_size - int(self.keep_ids.numel())
            if not self.trimmed or head.rows.shape[0] != n_dropped or head.proj.shape[1] != self.model.config.hidden_size:
                raise ValueError(f"a tail head needs a trimmed student with {n_dropped} dropped ids and hidden size "
                                 f"{self.model.config.hidden_size}; got rows {tuple(head.rows.shape)}, proj {tuple(head.proj.shape)}.")
            head = head.to(self.tail_logprob.device).requires_grad_(False)  # fitted apart, never by distillation
        self.head = head

    def set_tail(self, logprob: torch.Tensor) -> None:
        """Install a fitted dropped-id distribution (kdops.lm.tail.fit_tail)."""
        if not self.trimmed:
            raise ValueError("only a trimmed student has a tail.")
        if logprob.shape != self.tail_logprob.shape:
            raise ValueError(f"tail must have shape {tuple(self.tail_logprob.shape)}; got {tuple(logprob.shape)}.")
        self.tail_logprob = logprob.float().to(self.tail_logprob.device)

    def map_ids(self, full_ids: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary ids -> student ids (dropped ids -> ``<other>``); identity when untrimmed."""
        return self.to_student[full_ids] if self.trimmed else full_ids

    def logits_and_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          hidden: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V_student) for full-vocabulary ``input_ids`` (B, T) and, with ``hidden``, the last
        (final-normed) hidden state (B, T, H) that the context tail reads."""
        out = self.model(input_ids=self.map_ids(input_ids), attention_mask=attention_mask, use_cache=False,
                         output_hidden_states=hidden)
        return out.logits, (out.hidden_states[-1] if hidden else None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V_student) for full-vocabulary ``input_ids`` (B, T)."""
        return self.logits_and_hidden(input_ids, attention_mask, hidden=False)[0]

    def next_token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """log p(input_ids[:, 1:]) (B, T-1) over the full vocabulary, the context tail included when fitted."""
        logits, hidden = self.logits_and_hidden(input_ids, attention_mask, hidden=self.head is not None)
        return self.full_logprobs(logits[:, :-1], input_ids[:, 1:], hidden=None if hidden is None else hidden[:, :-1])

    def full_logprobs(self, logits: torch.Tensor, full_ids: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """log p(full_ids) under the student, over the full vocabulary: (B, T, V_s), (B, T[, K]) -> (B, T[, K]).
        With the last hidden state (B, T, H) and a fitted head, ``<other>``'s share and its spread over the
        dropped ids depend on the context (``TailHead``); otherwise the context-free tail spreads it."""
        logits = logits.float()
        use_head = self.head is not None and hidden is not None
        if use_head:
            o = self.other_id
            logits = torch.cat([logits[..., :o], logits[..., o:] + self.head.shift(hidden)[..., None]], -1)
        lp = torch.log_softmax(logits, dim=-1)
        squeeze = full_ids.dim() == lp.dim() - 1
        idx = full_ids.unsqueeze(-1) if squeeze else full_ids
        sid = self.map_ids(idx)
        out = lp.gather(-1, sid)
        if self.trimmed:  # <other>'s mass is spread over the dropped ids by the tail
            is_dropped = sid == self.other_id
            if use_head:  # the dropped-id softmax only where some asked id needs it
                tail = torch.zeros_like(out)
                at = is_dropped.any(-1)
                if bool(at.any()):
                    bias = self.tail_logprob[self.to_dropped >= 0]
                    tl = torch.log_softmax(self.head.tail_logits(hidden[at], bias), -1)  # (N, D)
                    tail[at] = tl.gather(-1, self.to_dropped[idx[at]].clamp(min=0))
            else:
                tail = self.tail_logprob[idx]
            out = out + tail * is_dropped
        return out.squeeze(-1) if squeeze else out

    def top1_full(self, logits: torch.Tensor) -> torch.Tensor:
        """The most likely full-vocabulary id per position, never ``<other>``: (B, T, V_s) -> (B, T)."""
        if not self.trimmed:
            return logits.argmax(-1)
        return self.keep_ids[logits[..., : self.other_id].argmax(-1)]

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int, eos_id: int | None,
                 batch_size: int = 16, temperature: float = 0.0,
                 on_step: Callable[[int, list[int]], None] | None = None) -> list[list[int]]:
        """Continuations in full-vocabulary ids (new tokens only, cut after the first EOS): greedy at
        ``temperature`` 0, else plain sampling from the softmax at that temperature (no top-k / top-p).
        ``on_step(first_row, ids)``, if given, is called after every decoding step with that step's token of each
        row of the current chunk (full-vocabulary ids; rows already past EOS get padding): token streaming."""
        from kdops.lm.decode import decode_prompts

        return decode_prompts(self.model, prompts, max_new_tokens, pad_id, eos_id, batch_size=batch_size,
                              to_model=self.map_ids, from_model=self.full_ids, on_step=on_step,
                              temperature=temperature, suppress_id=self.other_id)

    def full_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Student ids -> full-vocabulary ids (``<other>`` never comes out of ``generate``: it is suppressed)."""
        return self.keep_ids[ids.clamp(max=self.other_id - 1).to(self.keep_ids.device)] if self.trimmed else ids


def corpus_vocabulary(sequences: Sequence[Sequence[int]], always: Sequence[int] = (), first_n: int = 0) -> list[int]:
    """Ids to keep: every id seen in ``sequences``, the ``always`` ids, and the ids below ``first_n`` (byte-level
    BPE numbers frequent merges first, so a low-id prefix covers most unseen text cheaply)."""
    keep = set(range(first_n)) | set(int(i) for i in always)
    for s in sequences:
        keep.update(int(i) for i in s)
    return sorted(keep)


@torch.no_grad()
def prune_layers(teacher: nn.Module, layers: Sequence[int], keep_ids: Sequence[int] | None = None) -> LMStudent:
    """A student with ``layers`` of a Llama-family ``teacher`` (weights copied), optionally vocabulary-trimmed."""
    from transformers import AutoModelForCausalLM

    from kdops.lm.teacher import drop_quantization

    tcfg = teacher.config
    L = tcfg.num_hidden_layers
    layers = list(layers)
    if not layers or max(layers) >= L or min(layers) < 0 or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct indices in [0, {L}); got {layers}.")
    cfg = tcfg.__class__.from_dict(tcfg.to_dict())
    drop_quantization(cfg)
    cfg.num_hidden_layers = len(layers)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [tcfg.layer_types[i] for i in layers]
    emb = teacher.get_input_embeddings().weight  # (V, H)
    if keep_ids is not None:
        keep = torch.as_tensor(sorted(set(int(i) for i in keep_ids)), dtype=torch.long)
        cfg.vocab_size = len(keep) + 1  # + <other>
    student = AutoModelForCausalLM.from_config(cfg, dtype=emb.dtype)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    # vocabulary-sized matrices, told apart by identity, not shape (an MLP may be as wide as a tiny vocabulary)
    vocab_params = {id(m.weight) for m in (student.get_input_embeddings(), student.get_output_embeddings()) if m is not None}
    vocab_names = {n for n, p in student.named_parameters(remove_duplicate=False) if id(p) in vocab_params}
    for name in s_state:
        src = name
        if ".layers." in name:  # model.layers.{i}.xxx -> teacher layer layers[i]
            head, rest = name.split(".layers.", 1)
            i, tail = rest.split(".", 1)
            src = f"{head}.layers.{layers[int(i)]}.{tail}"
        w = t_state[src]
        if keep_ids is not None and name in vocab_names:
            dropped = torch.ones(tcfg.vocab_size, dtype=torch.bool)
            dropped[keep] = False
            # <other>: the mean of the dropped rows, a neutral start for inputs and for the bucket's logit
            w = torch.cat([w[keep], w[dropped].mean(0, keepdim=True)])
        s_state[name].copy_(w)
    student.load_state_dict(s_state)
    if getattr(cfg, "tie_word_embeddings", False):
        student.tie_weights()
    return LMStudent(student.eval(), tcfg.vocab_size, keep if keep_ids is not None else None)


def from_config(config, full_vocab_size: int | None = None, seed: int = 0) -> LMStudent:
    """A randomly initialised causal LM from a transformers config (e.g. a small ``LlamaConfig``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return LMStudent(model.eval(), full_vocab_size or config.vocab_size)


# ---------------------------------------------------------------------------------------------
# Artifacts


def save_lm_student(directory: str | Path, student: LMStudent, tokenizer, lineage: Lineage,
                    max_length: int = 0) -> Artifact:
    """Write atomically: a temporary sibling directory renamed into place."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        student.model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if student.trimmed:
            head = student.head.state() if student.head is not None else {}
            save_file({"keep_ids": student.keep_ids.cpu().contiguous(),
                       "tail_logprob": student.tail_logprob.cpu().contiguous(), **head}, str(tmp / VOCAB_MAP))
        extra = {"full_vocab_size": student.full_vocab_size, "trimmed_vocab": student.trimmed,
                 "num_parameters": student.num_parameters()}
        art = write_artifact(tmp, Kind.CAUSAL_LM, lineage, max_length=max_length, extra=extra)
    return replace(art, path=directory)


def load_lm_student(directory: str | Path | Artifact, device: str | torch.device = "cpu", verify: bool = True):
    """``(student, tokenizer, artifact)``; raises ArtifactError with the reason if anything is missing or corrupt."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kdops.lm.teacher import drop_quantization

    art = directory if isinstance(directory, Artifact) else Artifact.read(directory)
    directory = art.path
    if art.kind is not Kind.CAUSAL_LM:
        raise ArtifactError(f"{directory}: a {art.kind.value} artifact, not a causal-LM student.")
    if verify:
        art.verify()
    trimmed = bool(art.extra.get("trimmed_vocab"))
    try:
        vocab_map = load_file(str(directory / VOCAB_MAP)) if trimmed else {}
        keep, tail = vocab_map.get("keep_ids"), vocab_map.get("tail_logprob")  # no tail: uniform (older students)
        config = AutoConfig.from_pretrained(str(directory))
        drop_quantization(config)  # students saved before the teacher config was cleaned carry a GGUF marker
        model = AutoModelForCausalLM.from_pretrained(str(directory), config=config, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise ArtifactError(f"{directory}: unusable LM student ({e}).") from e
    if trimmed and keep is None:
        raise ArtifactError(f"{directory}/{VOCAB_MAP} holds no keep_ids.")
    try:
        student = LMStudent(model, int(art.extra["full_vocab_size"]), keep, tail, TailHead.from_state(vocab_map))
    except (ValueError, RuntimeError, KeyError) as e:  # RuntimeError: a head whose tensors do not fit together
        raise ArtifactError(f"{directory}: unusable LM student ({e}).") from e
    return student.to(device).eval(), tokenizer, art
