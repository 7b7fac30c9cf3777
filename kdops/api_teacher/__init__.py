"""Teachers behind an OpenAI-compatible API (vLLM, SGLang, llama.cpp's server, hosted models, ``kdops serve openai``).

The only module that imports ``openai``. Two teachers speak the kdops teacher protocols:

- ``ApiClassifierTeacher`` (``id``, ``label_names``, ``logits``): soft labels over the label words, by the first
  method the server supports (``ApiTeacherConfig.method = "auto"``):
  ``echo``: the log-likelihood of each label word after the prompt (completions with ``echo`` and ``logprobs``,
  as lm-evaluation-harness scores choices), exact for multi-token words;
  ``top_logprobs``: the first answer token's top log-probs, label words matched on their first token;
  ``votes``: k sampled answers counted per label (smoothed), for servers that return no log-probs.
- ``ApiLMTeacher`` (``kdops.lm.teacher.LMTeacher``): generations for sequence-level KD, and prompt top-k
  log-probs for token-level KD when the server returns them and its token ids match the local tokenizer's.

Every answer is cached per (base URL, model, prompt-template hash, input) in one SQLite file with the method that
produced it, so a re-run makes no call. Calls run ``concurrency`` at a time; 429, 5xx, timeouts and dropped
connections are retried with exponential backoff (``Retry-After`` honoured); each call's requests and tokens are
recorded for the round's tracking run, and a spend cap stops the round with what it paid for cached. The API key
is read from the environment variable the config names, and is never stored, logged or passed as a parameter.
"""

from kdops.api_teacher.calls import AnswerCache, ApiClient, input_key
from kdops.api_teacher.classifier import ApiClassifierTeacher
from kdops.api_teacher.config import (DEFAULT_PROMPT, METHODS, ApiTeacherConfig, ApiTeacherError, NoLogprobs,
                                      SpendCapReached)
from kdops.api_teacher.lm import ApiLMTeacher, TokenizerMismatch

__all__ = ["AnswerCache", "ApiClient", "ApiClassifierTeacher", "ApiLMTeacher", "ApiTeacherConfig", "ApiTeacherError",
           "DEFAULT_PROMPT", "METHODS", "NoLogprobs", "SpendCapReached", "TokenizerMismatch", "input_key"]
