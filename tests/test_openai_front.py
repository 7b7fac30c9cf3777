"""The OpenAI-compatible front (serving/openai_front.py) over a real tritonserver, driven by the official ``openai``
client: a streaming causal-LM student and an LM teacher export (tiny random LMs), models list, completions and chat
equal to what Triton answers directly, streaming, a hot swap during streams, the teacher's log-probs against
serving.teacher.TritonLMTeacher, echo, and errors as OpenAI's."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytestmark = pytest.mark.server

openai = pytest.importorskip("openai")
pytest.importorskip("tritonclient.http")

PROMPTS = ["this movie was good", "the plot was awful and boring"]
# A chat template for the teacher's tokenizer, in words of its vocabulary: chat prompts must go through it.
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
            "{% if add_generation_prompt %}answer :{% endif %}")


def _lm(tokenizer, seed: int, layers: int):
    """A tiny random Llama with untied embeddings: tied ones (tests/conftest.make_tiny_lm) repeat the last prompt
    token whatever the seed, and then two versions could not be told apart by their answers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _student(directory, tokenizer, seed: int, layers: int):
    from kdops.artifacts import Lineage
    from kdops.lm.student import LMStudent, save_lm_student

    model = LMStudent(_lm(tokenizer, seed, layers), len(tokenizer))
    return save_lm_student(directory, model, tokenizer, lineage=Lineage(teacher_id="tiny-lm")).path


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_lm_tokenizer):
    from serving.export import ExportConfig
    from serving.openai_front import FrontConfig, OpenAIFront
    from serving.server import ServerConfig, TritonServer
    from serving.swap import SwapConfig, deploy
    from serving.teacher import deploy_lm_teacher

    root = tmp_path_factory.mktemp("openai-front")
    first_dir = _student(root / "first", tiny_lm_tokenizer, seed=0, layers=2)
    second = _student(root / "second", tiny_lm_tokenizer, seed=1, layers=1)
    teacher_dir = root / "lm-teacher"
    _lm(tiny_lm_tokenizer, seed=7, layers=2).save_pretrained(str(teacher_dir))
    tiny_lm_tokenizer.save_pretrained(str(teacher_dir))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(teacher_dir))
    cfg = SwapConfig(export=ExportConfig(streaming=True, max_new_tokens=16, default_max_tokens=4,
                                         max_queue_delay_us=500))
    with TritonServer(ServerConfig(repository=str(root / "repo"))) as server:
        first = deploy(server, "gen", first_dir, cfg=cfg)
        deploy_lm_teacher(server, teacher_dir, "lmteacher")
        student = OpenAIFront(FrontConfig(server.url, "gen", grpc_url=server.grpc_url, served_name="student",
                                          tokenizer=str(first_dir))).start()
        teacher = OpenAIFront(FrontConfig(server.url, "lmteacher", tokenizer=str(teacher_dir))).start()
        try:
            yield {"server": server, "cfg": cfg, "first": first, "second": second, "student": student,
                   "teacher": teacher, "teacher_dir": teacher_dir}
        finally:
            student.stop()
            teacher.stop()


def _api(front, **kw):
    return openai.OpenAI(base_url=front.url + "/v1", api_key="x", **kw)


def _triton(served):
    from tests.conftest import serving_client

    return serving_client(served["server"])


def test_models_and_completions_equal_tritons_answers(served):
    api, direct = _api(served["student"]), _triton(served)
    assert [(m.id, m.owned_by) for m in api.models.list().data] == [("student", "kdops")]
    want = direct.generate("gen", PROMPTS, max_tokens=6, temperature=0.0)
    res = api.completions.create(model="student", prompt=PROMPTS, max_tokens=6, temperature=0, logprobs=2, n=2)
    assert [c.index for c in res.choices] == [0, 1, 2, 3]
    assert [c.text for c in res.choices] == [t for t in want.texts for _ in range(2)]  # n answers per prompt, in order
    assert all(c.logprobs is None for c in res.choices)  # a student has no log-probs: null, not an error
    assert res.system_fingerprint == want.versions[0] == served["first"].label
    tok = served["student"].front.backend().tokenizer
    prompt_tokens = sum(1 + len(tok(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS)
    assert res.usage.prompt_tokens == prompt_tokens and res.usage.completion_tokens == 2 * sum(want.tokens)
    assert res.usage.total_tokens == prompt_tokens + 2 * sum(want.tokens)
    from concurrent.futures import ThreadPoolExecutor

    def ask(i):  # concurrent clients: each request is answered by the front's own threads, none mixed up
        return api.completions.create(model="student", prompt=PROMPTS[i % 2], max_tokens=6).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, range(24))) == [want.texts[i % 2] for i in range(24)]
    one = api.completions.create(model="student", prompt=PROMPTS[0], max_tokens=6, echo=True)
    assert one.choices[0].text == PROMPTS[0] + want.texts[0]
    assert one.choices[0].finish_reason == ("length" if want.tokens[0] == 6 else "stop")


def test_chat_and_streams_join_to_the_plain_answer(served):
    api, direct = _api(served["student"]), _triton(served)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "is the movie good ?"}]
    prompt = "system: be brief\nuser: is the movie good ?\nassistant:"
    want = direct.generate("gen", [prompt], max_tokens=8, temperature=0.0).texts[0]
    chat = api.chat.completions.create(model="student", messages=messages, max_completion_tokens=8, logprobs=True)
    assert chat.choices[0].message.content == want and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].logprobs is None and chat.usage.completion_tokens > 0

    chunks = list(api.chat.completions.create(model="student", messages=messages, max_tokens=8, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1 and "".join(content) == want  # streamed in pieces, joining to the plain answer
    finish = "length" if chat.usage.completion_tokens == 8 else "stop"  # 8 tokens: the budget ran out
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason == finish
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    abandoned = api.completions.create(model="student", prompt=PROMPTS[0], max_tokens=16, stream=True)
    next(iter(abandoned))
    abandoned.close()  # a client that goes away mid-stream leaves the front serving
    plain = direct.generate("gen", PROMPTS, max_tokens=7, temperature=0.0).texts
    texts = ["", ""]
    for c in api.completions.create(model="student", prompt=PROMPTS, max_tokens=7, stream=True):
        for ch in c.choices:
            texts[ch.index] += ch.text
    assert texts == plain


def test_hot_swap_during_streams_is_invisible(served):
    from serving.swap import hot_swap

    api, direct = _api(served["student"]), _triton(served)
    before = direct.generate("gen", PROMPTS[:1], max_tokens=12).texts[0]
    swapped, failure = [], []

    def swap():
        try:
            swapped.append(hot_swap(served["server"], "gen", served["second"], cfg=served["cfg"]))
        except Exception as e:  # reported by the assertion below
            failure.append(e)

    seen = []
    worker = threading.Thread(target=swap)
    worker.start()
    while worker.is_alive() or not seen:
        text, finish, version = "", None, None
        for c in api.completions.create(model="student", prompt=PROMPTS[0], max_tokens=12, stream=True):
            text += c.choices[0].text
            finish = c.choices[0].finish_reason or finish
            version = c.system_fingerprint or version
        seen.append((text, finish, version))
    worker.join()
    assert not failure and swapped
    after = direct.generate("gen", PROMPTS[:1], max_tokens=12).texts[0]
    assert after != before  # the two versions answer differently, so the checks below can tell them apart
    labels = {served["first"].label: before, swapped[0].label: after}
    assert all(finish is not None and labels.get(version) == text for text, finish, version in seen), seen
    assert seen[0][2] == served["first"].label  # streams ran while the swap did
    res = api.completions.create(model="student", prompt=PROMPTS[0], max_tokens=12)
    assert res.choices[0].text == after and res.system_fingerprint == swapped[0].label


def test_teacher_logprobs_equal_the_triton_teachers_topk(served):
    from serving.teacher import TritonLMTeacher

    api = _api(served["teacher"])
    remote = TritonLMTeacher(served["server"].url, "lmteacher", tokenizer_dir=served["teacher_dir"])
    assert [m.id for m in api.models.list().data] == ["lmteacher"]
    seq = remote.encode([PROMPTS[0]], 64)[0]
    gen = remote.generate([seq], 5)[0]
    res = api.completions.create(model="lmteacher", prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=3,
                                 extra_body={"return_tokens_as_token_ids": True})
    lp = res.choices[0].logprobs
    assert [int(t.split(":")[1]) for t in lp.tokens] == gen
    assert res.choices[0].text == remote.tokenizer.decode(gen, skip_special_tokens=True)
    ids, lps = remote.topk([seq + gen], 3)[0]
    for j, top in enumerate(lp.top_logprobs):
        pos = len(seq) - 1 + j
        got = sorted(((int(t.split(":")[1]), v) for t, v in top.items()), key=lambda p: -p[1])
        assert [i for i, _ in got] == ids[pos].tolist()
        np.testing.assert_allclose([v for _, v in got], lps[pos], atol=1e-4)
        assert lp.token_logprobs[j] == pytest.approx(float(lps[pos, 0]), abs=1e-4)  # greedy: the top token
    assert res.usage.prompt_tokens == len(seq) and res.usage.completion_tokens == len(gen)

    # echo, no new tokens: the prompt's own log-probs; the first token has none (vLLM's echo)
    echo = api.completions.create(model="lmteacher", prompt=seq, max_tokens=0, echo=True, logprobs=4,
                                  extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs
    assert [int(t.split(":")[1]) for t in echo.tokens] == seq
    assert echo.token_logprobs[0] is None and echo.top_logprobs[0] is None
    e_ids, e_lps = remote.topk([seq], 4)[0]
    full_ids, full_lps = remote.topk([seq], remote.vocab_size)[0]
    for pos, top in enumerate(echo.top_logprobs[1:]):
        got = dict((int(t.split(":")[1]), v) for t, v in top.items())
        np.testing.assert_allclose([got[i] for i in e_ids[pos]], e_lps[pos], atol=1e-4)
        exact = float(full_lps[pos][full_ids[pos] == seq[pos + 1]][0])  # the prompt token, usually not in the top 4
        assert echo.token_logprobs[pos + 1] == pytest.approx(exact, abs=1e-4)
    text_echo = api.completions.create(model="lmteacher", prompt=PROMPTS[0], max_tokens=0, echo=True, logprobs=1)
    c = text_echo.choices[0]
    assert c.text == PROMPTS[0] and c.logprobs.tokens[1:] == PROMPTS[0].split()
    assert c.logprobs.text_offset == sorted(c.logprobs.text_offset) and c.logprobs.text_offset[-1] < len(PROMPTS[0])

    messages = [{"role": "user", "content": "is it good ?"}]
    chat = api.chat.completions.create(model="lmteacher", messages=messages, max_tokens=3, logprobs=True,
                                       top_logprobs=2)
    templated = remote.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat_seq = remote.encode([templated], 128)[0]
    assert chat.usage.prompt_tokens == len(chat_seq)  # the prompt went through the chat template
    assert chat.choices[0].message.content == remote.tokenizer.decode(remote.generate([chat_seq], 3)[0],
                                                                      skip_special_tokens=True)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) and bytes(t.bytes).decode() == t.token
               for t in content)

    # streaming sends the same tokens with their log-probs; sampling (temperature > 0) stays well-formed
    pieces = list(api.completions.create(model="lmteacher", prompt=PROMPTS[0], max_tokens=5, logprobs=3, stream=True,
                                         extra_body={"return_tokens_as_token_ids": True}))
    streamed = [c.choices[0] for c in pieces if c.choices[0].logprobs is not None]
    assert "".join(c.choices[0].text for c in pieces) == res.choices[0].text
    assert [c.logprobs.tokens[0] for c in streamed] == lp.tokens and pieces[-1].choices[0].finish_reason
    hot = api.completions.create(model="lmteacher", prompt=PROMPTS[0], max_tokens=4, temperature=1.0, n=2, seed=3,
                                 logprobs=2)
    assert len(hot.choices) == 2
    assert all(len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) <= 4 for c in hot.choices)
    assert all(v <= 0 for c in hot.choices for v in c.logprobs.token_logprobs)


def test_errors_as_openai_does(served):
    from kdops.proc import free_port
    from serving.openai_front import FrontConfig, OpenAIFront

    api, teacher = _api(served["student"], max_retries=0), _api(served["teacher"], max_retries=0)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        api.completions.create(model="student", prompt="good movie", max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="max_new_tokens"):  # refused by the model itself (limit 16)
        api.completions.create(model="student", prompt="good movie", max_tokens=17)
    with pytest.raises(openai.BadRequestError, match="max_new_tokens"):  # the same, streamed: refused before any event
        list(api.completions.create(model="student", prompt="good movie", max_tokens=17, stream=True))
    with pytest.raises(openai.BadRequestError, match="empty"):
        api.chat.completions.create(model="student", messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        teacher.chat.completions.create(model="lmteacher", messages=[{"role": "user", "content": "hi"}], top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        teacher.completions.create(model="lmteacher", prompt="hi", temperature=7)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        api.completions.create(model="gpt-4", prompt="hi")
    assert api.completions.create(model="student", prompt="still good", max_tokens=2).choices  # still serving
    down = OpenAIFront(FrontConfig(f"127.0.0.1:{free_port()}", "gen")).start()
    try:
        with pytest.raises(openai.InternalServerError) as e:
            _api(down, max_retries=0).completions.create(model="gen", prompt="hi")
        assert e.value.status_code == 503 and "Traceback" not in e.value.response.text
    finally:
        down.stop()


def test_cli_serves_the_front_until_interrupted(served):
    import json
    import signal
    import subprocess
    import sys
    from pathlib import Path

    kdops = str(Path(sys.executable).parent / "kdops")
    server = served["server"]
    refused = subprocess.run([kdops, "serve", "openai", "--url", server.url, "--model", "lmteacher", "--port", "0"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "--tokenizer" in refused.stderr  # an LM teacher needs its tokenizer
    proc = subprocess.Popen([kdops, "serve", "openai", "--url", server.url, "--grpc-url", server.grpc_url, "--model",
                             "gen", "--served-name", "kdops-student", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        base = json.loads(proc.stdout.readline())["base_url"]
        api = openai.OpenAI(base_url=base, api_key="x", max_retries=0)
        res = api.completions.create(model="kdops-student", prompt=PROMPTS[0], max_tokens=5)
        assert res.choices[0].text == _triton(served).generate("gen", PROMPTS[:1], max_tokens=5).texts[0]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


@pytest.mark.slow
def test_shipped_smollm2_teacher_answers_through_the_front(served):
    """The real teacher (SmolLM2-135M-Instruct, its chat template and byte-level BPE) behind the front."""
    from kdops.lm.teacher import smollm2_dir
    from serving.openai_front import FrontConfig, OpenAIFront
    from serving.teacher import deploy_lm_teacher

    server, directory = served["server"], smollm2_dir()
    deploy_lm_teacher(server, directory, "smollm2")
    try:
        with OpenAIFront(FrontConfig(server.url, "smollm2", tokenizer=str(directory))) as front:
            api = _api(front)
            chat = api.chat.completions.create(model="smollm2", max_tokens=8, logprobs=True, top_logprobs=3,
                                               messages=[{"role": "user", "content": "What is the capital of France?"}])
            assert "Paris" in chat.choices[0].message.content  # the instruct model, prompted through its template
            tokens = "".join(t.token for t in chat.choices[0].logprobs.content)
            assert tokens.startswith(chat.choices[0].message.content)
            # label words scored by echo, as kdops.api_teacher does: a real LM prefers the right one
            prompt = "Review: a delightful, moving film.\nSentiment (positive or negative):"
            echo = api.completions.create(model="smollm2", prompt=[prompt + " positive", prompt + " negative"],
                                          max_tokens=0, echo=True, logprobs=1)
            scores = [sum(v for off, v in zip(c.logprobs.text_offset, c.logprobs.token_logprobs)
                          if off >= len(prompt) and v is not None) for c in echo.choices]
            assert scores[0] > scores[1]
            plain = api.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=6)
            streamed = api.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=6,
                                              stream=True)
            assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    finally:
        _triton(served).unload("smollm2")


# -- kdops' own API teacher against the front: the same model's numbers, through HTTP

TEXTS = ["this movie was good and fun", "the plot was awful and boring", "i love this phone", "the screen is dull",
         "what a wonderful story", "the battery is the worst", "a very nice actor", "this book was sad"]


def _api_cfg(served, tmp_path, front: str = "teacher", model: str = "lmteacher", **kw):
    from kdops.api_teacher import ApiTeacherConfig

    return ApiTeacherConfig(base_url=served[front].url + "/v1", model=model, tokenizer=str(served["teacher_dir"]),
                            cache=str(tmp_path / "answers.sqlite"), **kw)


def test_a_classifier_round_whose_teacher_is_a_small_lm_answering_label_words(served, tmp_path):
    """Soft labels by the label words' log-likelihood through the front equal the in-process computation on the
    same weights (JS divergence), are cached (a second pass makes no call), and distil a classifier student."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdops.api_teacher import ApiClassifierTeacher
    from kdops.rounds import StudentShape, run_round
    from kdops.distill import DistillConfig
    from kdops.soft_labels import SoftLabelCache
    from kdops.artifacts import Artifact

    cfg = _api_cfg(served, tmp_path, labels=("neg", "pos"), label_words=(("neg", "bad"), ("pos", "good")),
                   prompt="{text} . it was")
    teacher = ApiClassifierTeacher(cfg)
    probs, methods = teacher.probabilities(TEXTS)
    assert methods == ["echo"] * len(TEXTS)
    # in process: log p(word | prompt) from the same weights, the start token first as the front sends it
    tok = AutoTokenizer.from_pretrained(str(served["teacher_dir"]))
    model = AutoModelForCausalLM.from_pretrained(str(served["teacher_dir"])).eval()
    start = tok.convert_tokens_to_ids("<|endoftext|>")
    local = []
    for text in TEXTS:
        ids = [start] + tok(teacher.prompt(text), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)
        s = torch.stack([lp[tok.convert_tokens_to_ids(w)] for w in ("bad", "good")])
        local.append(torch.softmax(s, 0).numpy())
    local = np.stack(local)
    m = (probs + local) / 2
    js = 0.5 * (probs * np.log(probs / m)).sum(1) + 0.5 * (local * np.log(local / m)).sum(1)
    assert js.max() < 1e-6, js
    asked = teacher.usage_since(0)["requests"]
    again = ApiClassifierTeacher(cfg)
    np.testing.assert_allclose(again.logits(TEXTS), teacher.logits(TEXTS))
    assert again.usage_since(0)["requests"] == asked  # a re-run makes no call
    import pandas as pd

    from kdops.data import from_rows

    rows = from_rows(pd.DataFrame({"text": TEXTS, "label": ["pos", "neg"] * 4, "domain": "a"}), ("neg", "pos")).rows
    res = run_round(again, SoftLabelCache(tmp_path / "soft.sqlite"), rows, tmp_path / "student",
                    DistillConfig(epochs=1, batch_size=8), shape=StudentShape(layers=1, embedding_size=8, intermediate_size=32))
    art = Artifact.read(res.artifact)
    assert list(art.label_names) == ["neg", "pos"] and art.lineage.teacher_id == teacher.id


def test_an_lm_round_whose_teacher_is_the_front(served, tmp_path):
    """Token-level KD when the front returns top-k over our token ids (the numbers Triton's teacher gives
    directly), plus sequence-level KD on its generations; evaluation scores text through the front as the local
    teacher does. Against the student's front (no log-probs) the round falls back to sequence-level KD only."""
    from kdops.api_teacher import ApiLMTeacher
    from kdops.artifacts import Artifact
    from kdops.lm.cache import LMSoftLabelCache
    from kdops.lm.distill import LMDistillConfig
    from kdops.lm.rounds import LMShape, evaluate_lm, run_lm_round
    from kdops.lm.teacher import HFCausalLMTeacher
    from serving.teacher import TritonLMTeacher

    teacher = ApiLMTeacher(_api_cfg(served, tmp_path))
    cache = LMSoftLabelCache(tmp_path / "lm.sqlite")
    distill = LMDistillConfig(steps=6, batch_size=4, alpha=0.5, topk=8, seq_kd_weight=0.5, seq_kd_new_tokens=4)
    res = run_lm_round(teacher, cache, TEXTS, tmp_path / "s1", distill, LMShape(layers=1, trim_vocab=None, tail_rank=0),
                       max_length=16, progress=False)
    art = Artifact.read(res.artifact)
    assert art.lineage.details["teacher_kd"] == "token-level (top 8) and sequence-level"
    assert art.lineage.teacher_id == teacher.id and cache.count(teacher.id) == len(TEXTS)
    seqs = teacher.encode(TEXTS, 16)
    direct = TritonLMTeacher(served["server"].url, "lmteacher").topk(seqs, 8)
    for (ids, lps), (d_ids, d_lps) in zip(teacher.topk(seqs, 8), direct):
        np.testing.assert_array_equal(ids, d_ids)
        np.testing.assert_allclose(lps, d_lps, atol=1e-4)
    report = evaluate_lm(art.path, teacher, {"a": TEXTS}, max_length=16, cache=cache)
    local = evaluate_lm(art.path, HFCausalLMTeacher(served["teacher_dir"]), {"a": TEXTS}, max_length=16)
    assert abs(report.teacher["ppl"] - local.teacher["ppl"]) < 1e-3 * local.teacher["ppl"]
    assert report.agreement_top1 == local.agreement_top1 and report.teacher["params"] is None

    seq_only = ApiLMTeacher(_api_cfg(served, tmp_path, front="student", model="student"))
    res2 = run_lm_round(seq_only, LMSoftLabelCache(tmp_path / "lm2.sqlite"), TEXTS, tmp_path / "s2", distill,
                        LMShape(layers=1, trim_vocab=None, tail_rank=0), max_length=16, progress=False)
    art2 = Artifact.read(res2.artifact)
    assert art2.lineage.details["teacher_kd"] == "sequence-level only (no matching token log-probs)"
    assert res2.info["generation_cache"]["misses"] == len(TEXTS) and res2.info["cache"]["misses"] == 0


def test_kdops_up_fronts_a_generating_champion(served, tmp_path):
    """What `kdops up` starts for a causal-LM task: a front over the stable served name, answering as Triton does."""
    from contextlib import ExitStack

    from flows.tasks import LoopContext
    from flows.up import UpConfig, _openai_front

    ctx = LoopContext(home=str(tmp_path), model="gen")
    with ExitStack() as stack:
        assert _openai_front(stack, ctx, served["server"], UpConfig(home=str(tmp_path), kind="classifier"), None) is None
        front = _openai_front(stack, ctx, served["server"], UpConfig(home=str(tmp_path), kind="causal-lm"), None)
        got = _api(front).completions.create(model="gen", prompt=PROMPTS[0], max_tokens=5).choices[0].text
    assert got == _triton(served).generate("gen", PROMPTS[:1], max_tokens=5, temperature=0.0).texts[0]


def test_a_front_with_a_key_refuses_requests_without_it(served, monkeypatch):
    from serving.openai_front import FrontConfig, OpenAIFront

    monkeypatch.setenv("KDOPS_TEST_FRONT_KEY", "sk-front-test")
    cfg = FrontConfig(served["server"].url, "gen", grpc_url=served["server"].grpc_url, api_key_env="KDOPS_TEST_FRONT_KEY")
    with OpenAIFront(cfg) as front:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=front.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
        keyed = openai.OpenAI(base_url=front.url + "/v1", api_key="sk-front-test")
        got = keyed.completions.create(model="gen", prompt=PROMPTS[0], max_tokens=3).choices[0].text
    assert got == _triton(served).generate("gen", PROMPTS[:1], max_tokens=3, temperature=0.0).texts[0]
