"""Shared fixtures: tiny models built in the test (no downloads), a saved tiny student artifact.

Markers (see pyproject): ``slow`` (real corpus / real weights), ``server`` (a real tritonserver, MLflow
store or Prefect API), ``gpu``. ``pytest -m "not slow and not server"`` runs the fast unit tests alone;
the README's test command runs everything.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "good great fine love excellent wonderful happy best nice fun bad awful terrible hate boring worst sad poor "
    "ugly dull the a movie film plot actor phone battery screen book story was is it this and but not very "
    "really so i we you they what where who when how why city country person number question answer"
).split()

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_tokenizer(directory: Path):
    """A WordPiece tokenizer over a tiny vocabulary, saved and loaded like a real one."""
    from transformers import BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    tokens += list("abcdefghijklmnopqrstuvwxyz.,!?'")
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok = BertTokenizer(vocab=vocab, do_lower_case=True)
    tok.save_pretrained(str(directory))
    return tok


def make_teacher(tokenizer, num_labels: int = 2, layers: int = 2, hidden: int = 32, seed: int = 0):
    """A tiny BERT sequence classifier built from a config (random weights)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=hidden * 2, max_position_embeddings=64, num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_teacher(tiny_tokenizer):
    return make_teacher(tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory, tiny_tokenizer, tiny_teacher) -> Path:
    """A saved student artifact (safetensors + JSON + tokenizer) carved from the tiny teacher."""
    from kdops.artifacts import Lineage, save_student
    from kdops.student import from_teacher

    student = from_teacher(tiny_teacher, num_labels=2, layers=[1], embedding_size=16)
    out = tmp_path_factory.mktemp("students") / "tiny"
    save_student(out, student, tiny_tokenizer, ["neg", "pos"], 32, Lineage(teacher_id="tiny-teacher"))
    return out


@pytest.fixture
def kdops_home(tmp_path, monkeypatch) -> Path:
    """An isolated kdops data directory."""
    monkeypatch.setenv("KDOPS_HOME", str(tmp_path / "kdops_home"))
    return tmp_path / "kdops_home"


def make_lm_tokenizer(directory: Path):
    """A word-level causal-LM tokenizer (``<|endoftext|>`` starts and ends sequences), saved like a real one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(dict.fromkeys(["<|endoftext|>", "<unk>"] + WORDS + list(".,!?'")))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<unk>")
    directory.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(directory))
    return tok


def make_tiny_lm(vocab_size: int, layers: int = 2, seed: int = 0):
    """A tiny random Llama (hidden 32) over ``vocab_size`` ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def save_tiny_lm_student(directory: Path, tokenizer, seed: int = 0, layers: int = 2) -> Path:
    from kdops.artifacts import Lineage
    from kdops.lm.student import LMStudent, save_lm_student

    model = make_tiny_lm(len(tokenizer), layers, seed)
    return save_lm_student(directory, LMStudent(model, len(tokenizer)), tokenizer, lineage=Lineage(teacher_id="tiny-lm")).path


@pytest.fixture(scope="session")
def tiny_lm_tokenizer(tmp_path_factory):
    return make_lm_tokenizer(tmp_path_factory.mktemp("lmtok"))


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, tiny_lm_tokenizer) -> Path:
    """A saved causal-LM student artifact (2 layers, random weights, the word-level tokenizer)."""
    return save_tiny_lm_student(tmp_path_factory.mktemp("lmstudents") / "tiny-lm", tiny_lm_tokenizer)


def serving_client(server, key: bool = True):
    """A ServingClient for a test's TritonServer, with its admin key (``key=False``: an anonymous client)."""
    from serving.client import ServingClient

    return ServingClient(server.url, server.admin_key if key else "", grpc_url=server.grpc_url)


@contextmanager
def traffic(call, threads: int = 4):
    """``threads`` clients running ``call()`` back to back while the block runs. Yields ``(errors, latencies)``:
    every exception is recorded there (a test asserts ``errors == []``), never raised in a thread."""
    stop, errors, latencies = threading.Event(), [], []

    def client():
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                call()
            except Exception as e:  # any failure is a test failure, counted by the caller
                errors.append(str(e))
            latencies.append(time.perf_counter() - t0)

    pool = [threading.Thread(target=client) for _ in range(threads)]
    for t in pool:
        t.start()
    try:
        yield errors, latencies
    finally:
        stop.set()
        for t in pool:
            t.join()
