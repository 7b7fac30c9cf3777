"""Classification soft labels from an OpenAI-compatible server: echo log-likelihood, top log-probs or votes."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from kdops.api_teacher.calls import AnswerCache, ApiClient, _cache_path, _one_line, input_key
from kdops.api_teacher.config import ApiTeacherConfig, ApiTeacherError, NoLogprobs
from kdops.errors import UserError

log = logging.getLogger(__name__)

_FLOOR = 1e-6  # the probability a label nobody voted for or outside the top log-probs keeps


def _norm(token: str) -> str:
    return token.replace("Ġ", " ").replace("▁", " ").strip().lower()



class ApiClassifierTeacher:
    """``kdops.teacher.Teacher`` over an OpenAI-compatible API; ``logits`` are log-probabilities over the labels."""

    def __init__(self, cfg: ApiTeacherConfig, cache_path: str | Path = "", label_names: Sequence[str] | None = None):
        label_names = list(label_names or cfg.labels)
        if not label_names:
            raise UserError("an API teacher for classification needs the label set: set [task] labels in kdops.toml.")
        self.cfg, self.label_names = cfg, list(label_names)
        self.words = cfg.words(self.label_names)
        ident = [cfg.base_url.rstrip("/"), cfg.model, cfg.endpoint, cfg.template_sha, self.label_names, self.words]
        self.id = "openai:" + hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]
        self.answers = AnswerCache(_cache_path(cfg, cache_path))
        self.api = ApiClient(cfg, self.id, self.answers)
        self._method = None if cfg.method == "auto" else cfg.method

    def num_parameters(self) -> None:
        return None

    def prompt(self, text: str) -> str:
        return self.cfg.prompt.replace("{labels}", ", ".join(self.words)).replace("{text}", text)

    def usage_since(self, t0: float) -> dict[str, int]:
        return self.answers.usage_since(t0, self.id)

    def probabilities(self, texts: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """(N, labels) probabilities and the method behind each row; only uncached texts reach the API."""
        keys = [input_key(t) for t in texts]
        found = self.answers.lookup(self.id, keys)
        todo = list(dict.fromkeys(k for k in keys if k not in found))
        if todo:
            by_key = dict(zip(keys, texts))

            def one(k):  # stored as it comes: a round stopped by a fault or the spend cap keeps what it paid for
                method, probs = self._answer(by_key[k])
                self.answers.store(self.id, [(k, method, probs)])
                return method, probs

            if self._method is None:  # find the server's method on one text before fanning out
                found[todo[0]] = one(todo[0])
                todo = todo[1:]
            found.update(zip(todo, self.api.map(one, todo)))
        probs = np.array([found[k][1] for k in keys], np.float64).reshape(len(keys), len(self.label_names))
        return probs, [found[k][0] for k in keys]

    def logits(self, texts: list[str]) -> np.ndarray:
        probs, _ = self.probabilities(texts)
        return np.log(np.clip(probs, _FLOOR, 1.0)).astype(np.float32)

    # one text -> (method, probabilities)
    def _answer(self, text: str) -> tuple[str, list[float]]:
        order = [self._method] if self._method else (
            ["echo", "top_logprobs", "votes"] if self.cfg.endpoint == "completions" else ["top_logprobs", "votes"])
        for method in order:
            try:
                probs = getattr(self, f"_by_{method}")(self.prompt(text))
            except NoLogprobs as e:
                if self.cfg.method != "auto":  # the config asked for this method: say so rather than switch silently
                    raise ApiTeacherError(f"API teacher {self.cfg.model}: {e}; set [teacher] method = \"auto\" or \"votes\".") from None
                log.info("API teacher %s: %s; trying the next method", self.cfg.model, e)
                continue
            if self._method is None:
                self._method = method
                log.info("API teacher %s: soft labels by %s", self.cfg.model, method)
            return method, probs
        raise ApiTeacherError(f"API teacher {self.cfg.model}: no method worked.")

    def _create(self, **kwargs):
        try:
            return self.api.call(self.cfg.endpoint, **kwargs)
        except self.api._openai.BadRequestError as e:
            raise NoLogprobs(f"the server refused the request ({_one_line(e)})") from None

    @staticmethod
    def _normalise(scores: Sequence[float]) -> list[float]:
        s = np.asarray(scores, np.float64)
        p = np.exp(s - s.max())
        return (p / p.sum()).tolist()

    def _by_echo(self, prompt: str) -> list[float]:
        """Log-likelihood of each label word after the prompt: one request, one prompt per label."""
        prompts = [prompt + " " + w for w in self.words]
        res = self._create(prompt=prompts, max_tokens=0, echo=True, logprobs=1, temperature=0)
        choices = sorted(res.choices, key=lambda c: c.index)
        if len(choices) != len(prompts):
            raise NoLogprobs(f"echo returned {len(choices)} choices for {len(prompts)} prompts")
        scores = []
        for c in choices:
            lp = c.logprobs
            if lp is None or not lp.token_logprobs or lp.text_offset is None:
                raise NoLogprobs("no prompt log-probs in the echo answer")
            picked = [v for off, v in zip(lp.text_offset, lp.token_logprobs) if off >= len(prompt) and v is not None]
            if not picked:
                raise NoLogprobs("the echo answer has no tokens after the prompt")
            scores.append(sum(picked))
        return self._normalise(scores)

    def _by_top_logprobs(self, prompt: str) -> list[float]:
        """The first answer token's alternatives; a label word is matched on its first token."""
        k = min(self.cfg.top_logprobs, 20)
        if self.cfg.endpoint == "completions":
            res = self._create(prompt=prompt, max_tokens=1, logprobs=k, temperature=0)
            lp = res.choices[0].logprobs
            top = lp.top_logprobs[0] if lp is not None and lp.top_logprobs else None
            pairs = list(top.items()) if top else []
        else:
            res = self._create(messages=[{"role": "user", "content": prompt}], max_tokens=1, logprobs=True,
                               top_logprobs=k, temperature=0)
            lp = res.choices[0].logprobs
            content = lp.content if lp is not None else None
            pairs = [(t.token, t.logprob) for t in content[0].top_logprobs] if content else []
        if not pairs:
            raise NoLogprobs("no top log-probs in the answer")
        best: dict[int, float] = {}
        for token, value in pairs:
            t = _norm(token)
            for i, w in enumerate(self.words):
                if t and _norm(w).startswith(t) and value > best.get(i, -np.inf):
                    best[i] = value
        if not best:
            raise NoLogprobs(f"none of the label words {self.words} is among the top {k} answer tokens")
        floor = min(v for _, v in pairs) - np.log(2.0)  # unlisted: below everything listed
        return self._normalise([best.get(i, floor) for i in range(len(self.words))])

    def _by_votes(self, prompt: str) -> list[float]:
        """``votes`` sampled answers, each counted for the label word it starts with (smoothed by half a vote)."""
        counts = np.zeros(len(self.words))
        got = 0
        while got < self.cfg.votes:
            n = self.cfg.votes - got
            if self.cfg.endpoint == "completions":
                res = self._create(prompt=prompt, max_tokens=4, n=n, temperature=1.0)
                texts = [c.text for c in res.choices]
            else:
                res = self._create(messages=[{"role": "user", "content": prompt}], max_tokens=4, n=n, temperature=1.0)
                texts = [c.message.content or "" for c in res.choices]
            if not texts:
                raise ApiTeacherError(f"API teacher {self.cfg.model}: an answer with no choices.")
            for t in texts[:n]:
                i = self._label_of(t)
                if i is not None:
                    counts[i] += 1
            got += len(texts[:n])
        return ((counts + 0.5) / (counts.sum() + 0.5 * len(counts))).tolist()

    def _label_of(self, answer: str) -> int | None:
        words = re.findall(r"[\w'-]+", answer.lower())
        if not words:
            return None
        for i, w in enumerate(self.words):
            if _norm(w).split()[:1] == words[:1]:
                return i
        return None
