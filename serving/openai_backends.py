"""What stands behind the OpenAI front: a causal-LM student (text in, text out) or an LM teacher export
(token ids in, top-k log-probs and greedy continuations out), each answering an ``Ask`` with ``Answer``s."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np

from serving.client import ServingClient

from serving.openai_schema import APIError, Answer, Ask, Scored, bad

if TYPE_CHECKING:
    from serving.openai_front import FrontConfig

SAMPLE_TOP_K = 50  # the teacher backend samples from its top 50 at temperature > 0 (HF generate's default top_k)


class StudentBackend:
    """A causal-LM student: PROMPT text in, COMPLETION / TOKENS / MODEL_VERSION out."""

    logprobs = False

    def __init__(self, client: ServingClient, model: str, decoupled: bool, tokenizer=None):
        self.client, self.model, self.decoupled, self.tokenizer = client, model, decoupled, tokenizer
        self.chat_tokenizer = None  # chat prompts for a student are plain role lines: its tokenizer only counts

    def _prompt_tokens(self, prompt: str) -> int:
        # the generator starts every sequence with one start token (kdops.lm.predict.LMGenerator.encode)
        return 1 + len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]) if self.tokenizer else 0

    def _check(self, ask: Ask) -> None:
        if any(not isinstance(p, str) for p in ask.prompts):
            raise bad("this model takes text prompts, not token ids", "prompt")

    def _answer(self, ask: Ask, prompt: str, text: str, tokens: int, version: str) -> Answer:
        done = "length" if ask.max_tokens and tokens >= ask.max_tokens else "stop"
        return Answer(prompt + text if ask.echo else text, self._prompt_tokens(prompt), tokens, done, version)

    def complete(self, ask: Ask) -> list[Answer]:
        self._check(ask)
        if self.decoupled and not self.client.grpc_url:
            raise APIError(500, f"{self.model} is a streaming (decoupled) model: the front needs Triton's gRPC URL "
                                "(--grpc-url) to read it")
        out = self.client.generate(self.model, list(ask.prompts), ask.max_tokens, ask.temperature)
        return [self._answer(ask, p, t, n, v) for p, t, n, v in zip(ask.prompts, out.texts, out.tokens, out.versions)]

    def stream(self, ask: Ask) -> Iterator[tuple | list[Answer]]:
        """``(row, text, scored, offsets)`` pieces as they come (no log-probs here: None), then the finished answers."""
        self._check(ask)
        if not (self.decoupled and self.client.grpc_url):  # a plain model: the whole answer as one piece
            answers = self.complete(ask)
            for row, a in enumerate(answers):
                yield row, a.text, None, None
            yield answers
            return
        texts, tokens, versions = [""] * len(ask.prompts), [0] * len(ask.prompts), [""] * len(ask.prompts)
        echoed = not ask.echo
        for piece in self.client.generate_stream(self.model, list(ask.prompts), ask.max_tokens, ask.temperature):
            if not echoed:  # after Triton's first answer: a request it refuses still gets its status code
                echoed = True
                yield from ((row, p, None, None) for row, p in enumerate(ask.prompts))
            texts[piece.row] += piece.text
            tokens[piece.row], versions[piece.row] = piece.tokens, piece.version
            if piece.text:
                yield piece.row, piece.text, None, None
        if not echoed:
            yield from ((row, p, None, None) for row, p in enumerate(ask.prompts))
        yield [self._answer(ask, p, t, n, v) for p, t, n, v in zip(ask.prompts, texts, tokens, versions)]


class TeacherBackend:
    """An LM teacher export (IDS in; TOPK_IDS / TOPK_LOGPROBS / GENERATED out), through TritonLMTeacher."""

    logprobs = True

    def __init__(self, cfg: FrontConfig):
        from serving.teacher import TritonLMTeacher

        if not cfg.tokenizer:
            raise ValueError(f"{cfg.model} is an LM teacher: the front needs its tokenizer directory "
                             "(--tokenizer DIR).")
        self.teacher = TritonLMTeacher(cfg.triton_url, cfg.model, tokenizer_dir=cfg.tokenizer,
                                       batch_size=cfg.teacher_batch, timeout_s=cfg.timeout_s)
        self.client, self.tokenizer = self.teacher.client, self.teacher.tokenizer
        self.chat_tokenizer = self.tokenizer  # its chat template, where it has one
        self.version = self.teacher.id[:16]

    # -- tokens <-> text
    def sequence(self, prompt) -> tuple[list[int], str, bool]:
        """``(ids, text, synthetic_start)``: a text prompt gets the teacher's start token in front (as
        TritonLMTeacher.encode does); token ids are taken as sent."""
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            return [self.teacher.start_id, *ids], prompt, True
        if any(not 0 <= t < self.teacher.vocab_size for t in prompt):
            raise bad(f"token ids must lie in [0, {self.teacher.vocab_size})", "prompt")
        return list(prompt), self.decode(prompt), False

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def prefixes(self, ids: list[int]) -> list[str]:
        """The text of each prefix of ``ids`` (``len(ids) + 1`` of them): where a token starts (``text_offset``) and
        the text it adds (a streamed piece) are read off them."""
        return [self.decode(ids[:i]) for i in range(len(ids) + 1)]

    # -- Triton
    def _score(self, seqs: list[list[int]], first: list[int], k: int) -> list[list[Scored]]:
        """The log-prob and top ``k`` alternatives of every token ``seq[first:]`` (``first`` >= 1). The teacher
        reports each actual token's log-prob; from an export that does not, a token outside the top ``max(k, 1)``
        (a prompt token, usually) is looked up in a vocabulary-wide second call."""
        got = self.teacher.scored_topk(seqs, max(k, 1))
        rows, missing = [], []
        for r, (seq, (ids, lps, targets)) in enumerate(zip(seqs, got)):
            row = []
            for pos in range(first[r] - 1, len(seq) - 1):  # position pos predicts seq[pos + 1]
                hit = np.flatnonzero(ids[pos] == seq[pos + 1])
                lp = float(targets[pos]) if targets is not None else float(lps[pos, hit[0]]) if hit.size else None
                row.append(Scored(seq[pos + 1], lp, list(zip(ids[pos, :k].tolist(), lps[pos, :k].tolist()))))
                if lp is None:
                    missing.append(r)
            rows.append(row)
        todo = sorted(set(missing))
        if todo:
            full = self.teacher.topk([seqs[r] for r in todo], self.teacher.vocab_size)
            for r, (ids, lps) in zip(todo, full):
                for j, s in enumerate(rows[r]):
                    if s.logprob is None:
                        pos = first[r] - 1 + j
                        s.logprob = float(lps[pos, np.flatnonzero(ids[pos] == s.id)[0]])
        return rows

    def _sample(self, seqs: list[list[int]], ask: Ask) -> tuple[list[list[int]], list[list[Scored]]]:
        """Token by token: each step asks the top 50 of the next position and samples among them."""
        rng = np.random.default_rng(ask.seed)
        k = max(ask.logprobs or 0, 0)
        gens: list[list[int]] = [[] for _ in seqs]
        scored: list[list[Scored]] = [[] for _ in seqs]
        active = list(range(len(seqs)))
        for _ in range(ask.max_tokens):
            if not active:
                break
            pad = self.teacher.pad_id  # a dummy last token: its position's top-k is the next-token distribution
            got = self.teacher.topk([seqs[i] + gens[i] + [pad] for i in active], SAMPLE_TOP_K)
            for i, (ids, lps) in zip(list(active), got):
                ids, lps = ids[-1], lps[-1].astype(np.float64)
                p = np.exp((lps - lps.max()) / ask.temperature)
                j = int(rng.choice(len(p), p=p / p.sum()))
                tok = int(ids[j])
                gens[i].append(tok)
                scored[i].append(Scored(tok, float(lps[j]), list(zip(ids[:k].tolist(), lps[:k].tolist()))))
                if tok == self.teacher.eos_id:
                    active.remove(i)
        return gens, scored

    def complete(self, ask: Ask) -> list[Answer]:
        if not 0 <= ask.max_tokens <= 1024:  # the teacher export's own limit (lm_teacher_model.py)
            raise bad(f"max_tokens must be in [0, 1024] for this model; got {ask.max_tokens}", "max_tokens")
        parsed = [self.sequence(p) for p in ask.prompts]
        seqs = [s for s, _, _ in parsed]
        if any(not s for s in seqs):
            raise bad("a prompt of token ids must not be empty", "prompt")
        scored: list[list[Scored]] | None = None
        if ask.max_tokens == 0:
            gens = [[] for _ in seqs]
        elif ask.temperature > 0:
            gens, scored = self._sample(seqs, ask)
        else:
            gens = self.teacher.generate(seqs, ask.max_tokens)
        if ask.logprobs is not None and scored is None:
            scored = self._score([s + g for s, g in zip(seqs, gens)], [len(s) for s in seqs], ask.logprobs)
        if ask.logprobs is not None and ask.echo:  # prompt tokens first; the first has no log-prob (vLLM's echo)
            prompt_part = (self._score(seqs, [1] * len(seqs), ask.logprobs) if any(len(s) > 1 for s in seqs)
                           else [[] for _ in seqs])
            scored = [[Scored(s[0], None, None), *p, *g] for s, p, g in zip(seqs, prompt_part, scored)]
        answers = []
        for r, ((seq, text, synthetic), gen) in enumerate(zip(parsed, gens)):
            done_text = self.prefixes(gen)
            completion, pieces = done_text[-1], [b[len(a):] for a, b in zip(done_text, done_text[1:])]
            offsets = None
            if scored is not None:
                offsets = [(len(text) if ask.echo else 0) + len(t) for t in done_text[:-1]]
                if ask.echo:  # the synthetic start token is not in the prompt text: it sits at 0 and adds nothing
                    head = [len(t) for t in self.prefixes(seq[1:] if synthetic else seq)[:-1]]
                    offsets = ([0] if synthetic else []) + head + offsets
            done = "stop" if (gen and gen[-1] == self.teacher.eos_id) or len(gen) < ask.max_tokens else "length"
            answers.append(Answer(text + completion if ask.echo else completion, len(seq), len(gen), done,
                                  self.version, scored[r] if scored is not None else None, offsets, pieces))
        return answers

    def stream(self, ask: Ask):
        """The finished answers, sent token by token (the teacher model does not stream)."""
        answers = self.complete(ask)
        for row, a in enumerate(answers):
            head = len(a.scored) - a.completion_tokens if a.scored is not None else 0  # echoed prompt tokens
            if ask.echo:
                yield (row, a.text[: len(a.text) - len("".join(a.pieces or []))],
                       a.scored[:head] if a.scored is not None else None, a.offsets[:head] if a.offsets else None)
            for j, piece in enumerate(a.pieces or []):
                yield (row, piece, a.scored[head + j: head + j + 1] if a.scored is not None else None,
                       a.offsets[head + j: head + j + 1] if a.offsets is not None else None)
        yield answers
