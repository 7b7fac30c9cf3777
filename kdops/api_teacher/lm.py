"""A causal-LM teacher behind an OpenAI-compatible completions API and a local tokenizer."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from kdops.api_teacher.calls import AnswerCache, ApiClient, _cache_path, _one_line, input_key
from kdops.api_teacher.config import ApiTeacherConfig, ApiTeacherError
from kdops.errors import UserError

log = logging.getLogger(__name__)


class TokenizerMismatch(Exception):
    """The server's token ids differ from the local tokenizer's: token-level KD is off, sequence-level stays."""


class ApiLMTeacher:
    """``kdops.lm.teacher.LMTeacher`` over an OpenAI-compatible completions API and a local tokenizer.

    ``generate`` asks for greedy continuations of the decoded prompts (sequence-level KD) and re-encodes them;
    ``topk`` sends token ids with ``echo`` and vLLM's ``return_tokens_as_token_ids``, and refuses
    (``TokenizerMismatch``) when the server's ids are not the ones sent."""

    def __init__(self, cfg: ApiTeacherConfig, cache_path: str | Path = ""):
        if not cfg.tokenizer:
            raise UserError("an API teacher for a causal LM needs [teacher] tokenizer: the local tokenizer directory.")
        from transformers import AutoTokenizer

        from kdops.lm.teacher import start_token_id

        self.cfg = cfg
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
        except (OSError, ValueError) as e:
            raise UserError(f"[teacher] tokenizer {cfg.tokenizer}: not a tokenizer directory ({_one_line(e)}).") from e
        self.vocab_size = len(self.tokenizer)
        self.start_id = start_token_id(None, self.tokenizer)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.start_id
        vocab = hashlib.sha256(json.dumps(sorted(self.tokenizer.get_vocab().items())).encode()).hexdigest()[:16]
        ident = [cfg.base_url.rstrip("/"), cfg.model, cfg.template_sha, vocab]
        self.id = "openai-lm:" + hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]
        self.answers = AnswerCache(_cache_path(cfg, cache_path))
        self.api = ApiClient(cfg, self.id, self.answers)
        self.token_level: bool | None = None  # None: not known until the first top-k answer

    def num_parameters(self) -> None:
        return None

    @property
    def max_topk(self) -> int:
        return min(self.cfg.top_logprobs, 20)  # vLLM's and OpenAI's limit on alternatives per position

    def usage_since(self, t0: float) -> dict[str, int]:
        return self.answers.usage_since(t0, self.id)

    def token_level_for(self, sequences) -> bool:
        """Whether the server returns top-k log-probs over the same token ids as the local tokenizer (tried on
        ``sequences``, which are then cached)."""
        try:
            self.topk(sequences, self.max_topk)
        except TokenizerMismatch:
            return False
        return True

    def new_student(self, layers: int, seed: int = 0):
        """A first student with no local teacher weights: the architecture in the tokenizer directory's
        ``config.json`` with ``layers`` layers, randomly initialised."""
        from transformers import AutoConfig

        from kdops.lm.student import from_config

        if not (Path(self.cfg.tokenizer) / "config.json").is_file():
            raise UserError(f"a first causal-LM round with an API teacher builds its student from a model config: put "
                            f"one (config.json) beside the tokenizer in {self.cfg.tokenizer}, or continue a champion.")
        config = AutoConfig.from_pretrained(self.cfg.tokenizer)
        config.num_hidden_layers = layers
        return from_config(config, self.vocab_size, seed=seed)

    def scores(self, sequences) -> list[tuple[float, int, np.ndarray]]:
        """Per sequence (summed NLL of its predicted tokens, their count, top-1 id at each position), from the
        server's prompt log-probs (echo) plus one generated token for the last position's top-1."""
        def one(seq):
            res = self.api.call("completions", prompt=seq, max_tokens=1, echo=True, logprobs=1, temperature=0,
                                extra_body={"return_tokens_as_token_ids": True})
            lp = res.choices[0].logprobs
            if lp is None or not lp.token_logprobs or not lp.top_logprobs:
                raise ApiTeacherError(f"API teacher {self.cfg.model}: no prompt log-probs (echo) to score text with.")
            nll = -sum(v for v in lp.token_logprobs[1:len(seq)] if v is not None)
            top1 = [max(t.items(), key=lambda x: x[1])[0] if t else "token_id:0" for t in lp.top_logprobs[1:len(seq) + 1]]
            return [nll, len(seq) - 1, [_token_id(t) for t in top1]]

        rows = self._cached("scores", [list(map(int, s)) for s in sequences], one)
        return [(float(n), int(c), np.asarray(t, np.int32)) for n, c, t in rows]

    def encode(self, texts: Sequence[str], max_length: int = 64) -> list[list[int]]:
        from kdops.lm.teacher import encode_texts

        return encode_texts(self.tokenizer, self.start_id, texts, max_length)

    def _cached(self, method: str, inputs: list, compute) -> list:
        keys = [input_key([method, x]) for x in inputs]
        found = {k: a for k, (m, a) in self.answers.lookup(self.id, keys).items()}
        todo = list(dict.fromkeys(k for k in keys if k not in found))
        by_key = dict(zip(keys, inputs))

        def one(k):
            answer = compute(by_key[k])
            self.answers.store(self.id, [(k, method, answer)])
            return answer

        found.update(zip(todo, self.api.map(one, todo)))
        return [found[k] for k in keys]

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        def one(x):
            ids, new = x
            text = self.tokenizer.decode([t for t in ids if t != self.start_id])
            res = self.api.call("completions", prompt=text, max_tokens=new, temperature=0)
            return res.choices[0].text

        texts = self._cached("generate", [[list(map(int, p)), int(max_new_tokens)] for p in prompts], one)
        out = []
        for t in texts:
            ids = self.tokenizer(t, add_special_tokens=False)["input_ids"][:max_new_tokens]
            out.append(ids)
        return out

    def topk(self, sequences, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sequence, the teacher's top-k next-token (ids, log-probs) at each position but the last."""
        seqs = [self.encode([s])[0] if isinstance(s, str) else list(map(int, s)) for s in sequences]
        k = min(k, self.cfg.top_logprobs)

        def one(seq):
            try:
                res = self.api.call("completions", prompt=seq, max_tokens=0, echo=True, logprobs=k, temperature=0,
                                    extra_body={"return_tokens_as_token_ids": True})
            except self.api._openai.BadRequestError as e:
                raise TokenizerMismatch(f"the server refused a token-id prompt with echo ({_one_line(e)})") from None
            lp = res.choices[0].logprobs
            if lp is None or not lp.top_logprobs:
                raise TokenizerMismatch("the server returned no prompt log-probs")
            got = [_token_id(t) for t in lp.tokens]
            if got != seq:
                raise TokenizerMismatch("the server's token ids differ from the local tokenizer's")
            rows = []
            for top in lp.top_logprobs[1:]:
                pairs = sorted(((_token_id(t), v) for t, v in (top or {}).items()), key=lambda p: -p[1])[:k]
                pairs += [(0, -1e4)] * (k - len(pairs))  # pad: a server may list fewer than asked
                rows.append(pairs)
            return rows

        try:
            rows = self._cached(f"topk{k}", seqs, one)
        except TokenizerMismatch as e:
            self.token_level = False
            log.warning("API teacher %s: token-level KD off (%s); sequence-level KD only", self.cfg.model, e)
            raise
        self.token_level = True
        out = []
        for r in rows:
            ids = np.array([[p[0] for p in row] for row in r], np.int64).reshape(len(r), k)
            lps = np.array([[p[1] for p in row] for row in r], np.float32).reshape(len(r), k)
            out.append((ids, lps))
        return out


def _token_id(token: str) -> int:
    if not token.startswith("token_id:"):
        raise TokenizerMismatch(f"the server does not return token ids ({token!r})")
    return int(token.split(":", 1)[1])
