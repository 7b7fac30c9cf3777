"""A causal-LM student served for generation by the real tritonserver: prompt in, text out, optional token
budget and temperature, bad requests, a hot swap under load, a broken version refused, rollback, and the
prediction log of prompts feeding the drift monitor."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

pytestmark = pytest.mark.server

pytest.importorskip("tritonclient.http")


@pytest.fixture(scope="module")
def second_lm(tmp_path_factory, tiny_lm_tokenizer):
    from tests.conftest import save_tiny_lm_student

    return save_tiny_lm_student(tmp_path_factory.mktemp("lm2") / "tiny-lm-2", tiny_lm_tokenizer, seed=1, layers=1)


@pytest.fixture(scope="module")
def lm_served(tmp_path_factory, tiny_lm_dir):
    from serving.export import ExportConfig
    from serving.server import ServerConfig, TritonServer
    from serving.swap import SwapConfig, deploy

    root = tmp_path_factory.mktemp("triton-lm")
    cfg = SwapConfig(export=ExportConfig(prediction_log_dir=str(root / "predictions"), max_queue_delay_us=1000,
                                         max_new_tokens=16, default_max_tokens=4))
    with TritonServer(ServerConfig(repository=str(root / "repo"))) as server:
        first = deploy(server, "gen", tiny_lm_dir, cfg=cfg)
        yield server, cfg, first, root


from tests.conftest import serving_client as _client, traffic  # noqa: E402


def test_generation_matches_local_and_honours_inputs(lm_served, tiny_lm_dir):
    from kdops.lm.predict import LMGenerator

    server, _, first, _ = lm_served
    client = _client(server)
    prompts = ["this movie was good", "the plot was awful and boring", "what city is this ?"]
    local = LMGenerator.from_dir(tiny_lm_dir)
    out = client.generate("gen", prompts, max_tokens=6, temperature=0.0)
    assert out.texts == [g.text for g in local.generate(prompts, 6, 0.0)]
    assert out.versions == [first.label] * 3 and all(0 < t <= 6 for t in out.tokens)
    # inputs left out: the config's default budget (4) and greedy decoding
    default = client.generate("gen", prompts[:1])
    assert default.tokens[0] <= 4 and default.texts == [g.text for g in local.generate(prompts[:1], 4, 0.0)]
    # sampling: still well-formed, within budget
    hot = client.generate("gen", prompts, max_tokens=5, temperature=1.5)
    assert len(hot.texts) == 3 and all(t <= 5 for t in hot.tokens)
    assert client.generate("gen", prompts[:1], max_tokens=0).tokens == [0]


def test_bad_generation_requests_get_errors_and_model_keeps_serving(lm_served):
    import tritonclient.http as httpclient

    from serving.client import ServingError

    server = lm_served[0]
    client = _client(server)
    with pytest.raises(ServingError, match="empty"):
        client.generate("gen", ["  "])
    with pytest.raises(ServingError, match="limit"):
        client.generate("gen", ["good " * 10_000])
    with pytest.raises(ServingError, match="max_new_tokens"):
        client.generate("gen", ["good movie"], max_tokens=17)  # over the exported limit of 16
    with pytest.raises(ServingError, match="max_new_tokens"):
        client.generate("gen", ["good movie"], max_tokens=-1)
    with pytest.raises(ServingError, match="temperature"):
        client.generate("gen", ["good movie"], temperature=float("nan"))
    wrong = httpclient.InferInput("PROMPT", [1, 1], "INT32")
    wrong.set_data_from_numpy(np.array([[7]], np.int32))
    with pytest.raises(Exception, match="(?i)datatype|type"):
        client.http.infer("gen", [wrong])
    assert client.generate("gen", ["still good"], max_tokens=2).tokens[0] <= 2


def test_lm_hot_swap_under_load_broken_version_and_rollback(lm_served, second_lm, tmp_path):
    from kdops.lm.predict import LMGenerator
    from serving.swap import SwapError, hot_swap, rollback

    server, cfg, first, _ = lm_served
    seen, anon = set(), _client(server, key=False)
    with traffic(lambda: seen.update(anon.generate("gen", ["good movie", "bad plot"], max_tokens=3).versions),
                 threads=3) as (errors, _):
        second = hot_swap(server, "gen", second_lm, cfg=cfg)
        broken = tmp_path / "broken"
        shutil.copytree(second_lm, broken)
        (broken / "model.safetensors").write_bytes(b"\x00" * 128)  # corrupt: checksum and header fail
        with pytest.raises(SwapError, match="still serving"):
            hot_swap(server, "gen", broken, cfg=cfg)
        assert _client(server).generate("gen", ["ok"], max_tokens=1).versions == [second.label]
        back = rollback(server, "gen", cfg=cfg)
    assert errors == []
    assert {first.label, second.label} <= seen
    assert back.label.split("-")[1] == first.label.split("-")[1]
    assert _client(server).generate("gen", ["ok"], max_tokens=1).versions == [back.label]
    # Both slots run now: the next swap replaces the standby's weights in place, and it serves them.
    again = hot_swap(server, "gen", second_lm, cfg=cfg)
    assert (again.method, again.slot) == ("reload", second.slot)
    served = _client(server).generate("gen", ["a good movie"], max_tokens=4, temperature=0.0)
    local = LMGenerator.from_dir(second_lm).generate(["a good movie"], 4, 0.0)
    assert served.versions == [again.label] and served.texts == [local[0].text]


def test_prompts_are_logged_and_monitored_for_drift(lm_served):
    """Served prompts reach the prediction log (completion in ``label``); the drift monitor runs on them and
    tells prompts like the reference from prompts of another kind."""
    from kdops.prediction_log import read_predictions
    from monitoring import MonitorConfig, TriggerConfig, monitor_window, profile_reference

    server, _, _, root = lm_served
    client = _client(server)
    rng = np.random.default_rng(0)
    reviews = ["good", "great", "bad", "awful", "boring", "fun", "dull", "excellent"]
    things = ["movie", "film", "plot", "actor", "story"]

    def review(i):
        return f"the {rng.choice(things)} was really {rng.choice(reviews)} and {rng.choice(reviews)}"

    def question(i):
        return f"{rng.choice(['what', 'where', 'who', 'how'])} is the {rng.choice(['city', 'country', 'person'])} ?"

    reference = [review(i) for i in range(120)]
    t0 = time.time()
    same, other = [review(i) for i in range(60)], [question(i) for i in range(60)]
    client.generate("gen", same, max_tokens=2)
    client.generate("gen", other, max_tokens=2)
    df = read_predictions(root / "predictions", since=t0 - 0.01)
    assert set(same) | set(other) <= set(df["text"]) and df["model_version"].str.len().min() > 0
    assert all(p == [] for p in df["probabilities"])  # a generation model logs no class probabilities
    cfg = MonitorConfig(window_size=60)
    ref = profile_reference(reference, cfg)
    verdicts = {}
    for name, window in (("same", df[df["text"].isin(same)]), ("other", df[df["text"].isin(other)])):
        res = monitor_window(ref, window[["text", "probabilities"]].reset_index(drop=True), root / f"mon-{name}",
                             cfg, TriggerConfig(), write_html=name == "other")
        verdicts[name] = res.verdict.decision
        assert {r.name.split(".")[0] for r in res.results} == {"text"}  # text checks only: no probabilities
    assert verdicts["same"] == "ok" and verdicts["other"] != "ok"
    assert (root / "mon-other" / "reports").is_dir()


def test_remote_lm_teacher_matches_local_and_shares_the_cache(lm_served, tmp_path, tiny_lm_tokenizer):
    """A causal-LM teacher behind Triton gives the local teacher's top-k and generations, under the same id,
    so a top-k cache filled by one is a cache hit for the other."""
    from kdops.lm.cache import LMSoftLabelCache
    from kdops.lm.teacher import HFCausalLMTeacher
    from serving.client import ServingError
    from serving.teacher import TritonLMTeacher, deploy_lm_teacher
    from tests.conftest import make_tiny_lm

    server = lm_served[0]
    hf_dir = tmp_path / "lm-teacher"
    make_tiny_lm(len(tiny_lm_tokenizer), layers=3, seed=7).save_pretrained(str(hf_dir))
    tiny_lm_tokenizer.save_pretrained(str(hf_dir))
    deploy_lm_teacher(server, hf_dir, "lmteacher")
    local, remote = HFCausalLMTeacher(hf_dir), TritonLMTeacher(server.url, "lmteacher", tokenizer_dir=hf_dir, batch_size=3)
    assert remote.id == local.id and remote.vocab_size == local.vocab_size
    seqs = local.encode(["the movie was good", "a bad plot", "what is the city ?", "the actor", "fun"], 16)
    assert remote.encode(["the movie was good"], 16) == seqs[:1]
    for (ri, rl), (li, ll) in zip(remote.topk(seqs, 4), local.topk(seqs, 4)):
        assert ri.shape == li.shape == (len(rl), 4)
        np.testing.assert_array_equal(ri, li)
        np.testing.assert_allclose(rl, ll, atol=1e-5)
    prompts = [s[:3] for s in seqs]
    assert remote.generate(prompts, 5) == local.generate(prompts, 5)
    cache = LMSoftLabelCache(tmp_path / "lm.sqlite")
    cache.get_or_compute_topk(remote, seqs, 4)
    cache.get_or_compute_topk(local, seqs, 4)
    assert cache.stats.hits == len(seqs)  # the local teacher found the remote one's rows
    bad = [[local.vocab_size + 5, 1]]
    with pytest.raises(ServingError, match="vocabulary"):
        remote.topk(bad, 4)
    assert len(remote.topk(seqs[:1], 2)) == 1  # still serving


def test_cli_generate_prints_served_completions(lm_served, tiny_lm_dir):
    import json

    from typer.testing import CliRunner

    from kdops.lm.predict import LMGenerator
    from serving.cli import app

    server = lm_served[0]
    res = CliRunner().invoke(app, ["generate", "this movie was good", "the plot", "--model", "gen", "--url", server.url,
                                   "--max-tokens", "3"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.strip().splitlines()]
    local = LMGenerator.from_dir(tiny_lm_dir).generate(["this movie was good", "the plot"], 3, 0.0)
    assert [r["completion"] for r in rows] == [g.text for g in local] and all(r["tokens"] <= 3 for r in rows)
    bad = CliRunner().invoke(app, ["generate", "  ", "--model", "gen", "--url", server.url])
    assert bad.exit_code == 1 and "empty" in bad.output


def test_streaming_model_sends_text_as_it_is_generated_and_hot_swaps(lm_served, tiny_lm_dir, second_lm):
    import json

    import requests
    from typer.testing import CliRunner

    from kdops.lm.predict import LMGenerator
    from serving.cli import app
    from serving.client import ServingError
    from serving.export import ExportConfig
    from serving.swap import SwapConfig, deploy, hot_swap

    server = lm_served[0]
    cfg = SwapConfig(export=ExportConfig(streaming=True, max_new_tokens=16, default_max_tokens=4))
    first = deploy(server, "genst", tiny_lm_dir, cfg=cfg)
    assert "decoupled: true" in (server.repository / "genst" / "config.pbtxt").read_text()  # the stable name streams too
    client = _client(server)
    prompts = ["this movie was good", "the plot was awful and boring"]
    local = [g.text for g in LMGenerator.from_dir(tiny_lm_dir).generate(prompts, 6, 0.0)]

    pieces = list(client.generate_stream("genst", prompts, max_tokens=6, temperature=0.0))
    for row, text in enumerate(local):
        mine = [p for p in pieces if p.row == row]
        assert len(mine) > 1 and "".join(p.text for p in mine) == text  # several responses, one completion
        assert [p.tokens for p in mine] == sorted(p.tokens for p in mine) and mine[-1].tokens <= 6
        assert {p.version for p in mine} == {first.label}
    # the plain call reads a streaming model too (Triton's HTTP infer refuses decoupled models)
    assert client.generate("genst", prompts, max_tokens=6, temperature=0.0).texts == local
    # HTTP server-sent events, for clients without gRPC (curl -N .../generate_stream)
    sse = requests.post(f"http://{server.url}/v2/models/genst/generate_stream",
                        json={"PROMPT": prompts[0], "MAX_TOKENS": 6}, timeout=30)
    events = [json.loads(line[5:]) for line in sse.text.splitlines() if line.startswith("data:")]
    assert sse.status_code == 200 and len(events) > 1 and "".join(e["COMPLETION"] for e in events) == local[0]
    with pytest.raises(ServingError, match="empty"):
        list(client.generate_stream("genst", ["   "], max_tokens=3))
    abandoned = client.generate_stream("genst", prompts[:1], max_tokens=16)
    assert next(abandoned).text  # a client that reads one piece and goes away (its request is cancelled)...
    abandoned.close()
    assert client.generate("genst", prompts, max_tokens=6).texts == local  # ...leaves the model serving
    out = CliRunner().invoke(app, ["generate", prompts[0], "--model", "genst", "--url", server.url,
                                   "--grpc-url", server.grpc_url, "--max-tokens", "6", "--stream"])
    assert out.exit_code == 0 and out.output == local[0] + "\n", out.output

    # hot swap while clients stream: nobody fails, the new version answers, the way back is an in-place reload
    with traffic(lambda: client.generate("genst", prompts[:1], max_tokens=4), threads=3) as (errors, latencies):
        second = hot_swap(server, "genst", second_lm, cfg=cfg)
        back = hot_swap(server, "genst", tiny_lm_dir, cfg=cfg)
    assert errors == [] and len(latencies) > 10
    assert back.method == "reload" and second.version < back.version
    assert client.generate("genst", prompts, max_tokens=6).texts == local
    assert {p.version for p in client.generate_stream("genst", prompts[:1], max_tokens=2)} == {back.label}
