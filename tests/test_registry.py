"""kdops.registry (Tracking, Registry, Champion) on a real SQLite MLflow store in a temporary directory (no mocks
of mlflow).

One store per module: creating an MLflow SQLite database runs ~all of its migrations (seconds on 2 cores).
Each test uses its own registered-model name so the tests stay independent within the shared store.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from kdops.artifacts import file_sha256, load_student


def make_variant(src: Path, dst: Path, seed: int) -> Path:
    """A copy of a student artifact with perturbed weights and its kdops.json sha updated (a new model)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    state = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
             for k, v in state.items()}
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    meta = json.loads((dst / "kdops.json").read_text())
    meta.setdefault("sha256", {})["model.safetensors"] = file_sha256(dst / "model.safetensors")
    (dst / "kdops.json").write_text(json.dumps(meta))
    return dst


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture(scope="module")
def reg(store):
    from kdops.registry import Registry

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDOPS_HOME", str(store / "home"))  # downloads land here
        yield Registry(tracking_uri=f"sqlite:///{store}/mlflow.db", artifact_root=str(store / "artifacts"))


@pytest.fixture(scope="module")
def tracking(reg):
    from kdops.registry import Tracking

    return Tracking(store=reg.store)  # one client for runs and versions


@pytest.fixture(scope="module")
def variants(tiny_student_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return [make_variant(tiny_student_dir, root / f"s{i}", seed=i) for i in range(3)]


def _snapshot():
    from kdops.data import from_rows

    rows = pd.DataFrame({"text": ["good movie", "bad phone"], "label": ["pos", "neg"], "domain": ["movie", "amazon"]})
    return from_rows(rows, ("neg", "pos"))


REPORT = {"overall": {"accuracy": 0.81, "macro_f1": 0.8}, "per_domain": {"movie": {"accuracy": 0.9}},
          "agreement": 0.93, "ece": 0.04, "latency": {"p50_ms": 3.2}, "params": {"student": 1200}, "note": "x"}


def test_default_store_is_embedded_sqlite_and_uri_is_passed_in(kdops_home, monkeypatch):
    from kdops.registry import Registry

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    r = Registry()
    assert r.tracking_uri == f"sqlite:///{kdops_home.resolve()}/mlflow/mlflow.db"
    assert r.artifact_root == str(kdops_home.resolve() / "mlflow" / "artifacts")
    assert not (kdops_home / "mlflow" / "mlflow.db").exists()  # construction opens nothing
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert Registry().tracking_uri == "http://example:5000" and Registry().artifact_root is None
    assert Registry("sqlite:////x/y.db").tracking_uri == "sqlite:////x/y.db"
    with pytest.raises(ValueError):
        from kdops.registry import RegistryConfig

        RegistryConfig(retries=0)


def test_flatten_and_numeric_leaves():
    from kdops.registry import flatten, numeric_leaves

    assert flatten({"loss": {"alpha": 0.5, "kind": "kd"}, "layers": [0, 2]}) == \
        {"loss.alpha": 0.5, "loss.kind": "kd", "layers": [0, 2]}
    flat = numeric_leaves(REPORT)
    assert flat["overall.accuracy"] == 0.81 and flat["latency.p50_ms"] == 3.2 and "note" not in flat


def test_run_logs_params_metrics_report_snapshot_and_figure(tracking):
    from matplotlib.figure import Figure

    snap = _snapshot()
    fig = Figure()
    fig.subplots().plot([1, 2], [3, 4])
    with tracking.run("distill-round-1", tags={"round": 1}) as run:
        run.log_params({"loss": {"alpha": 0.5, "temperature": 2.0}, "student": {"layers": [0, 2]}, "lr": 1e-3})
        for epoch, loss in enumerate([0.9, 0.6, 0.4], start=1):
            run.log_metrics({"train": {"loss": loss}}, step=epoch)
        flat = run.log_eval_report(REPORT)
        run.log_snapshot(snap, context="train")
        assert run.log_figure(fig, "curves") == "figures/curves.png"
    r = tracking.get_run(run.run_id)
    assert r.info.status == "FINISHED" and r.data.tags["round"] == "1"
    assert r.data.params["loss.alpha"] == "0.5" and r.data.params["student.layers"] == "[0, 2]"
    assert [m.value for m in tracking.client.get_metric_history(run.run_id, "train.loss")] == [0.9, 0.6, 0.4]
    assert r.data.metrics["per_domain.movie.accuracy"] == 0.9 and flat["agreement"] == 0.93
    (ds,) = r.inputs.dataset_inputs
    assert ds.dataset.name == ds.dataset.digest == snap.id
    assert {t.key: t.value for t in ds.tags}["mlflow.data.context"] == "train"
    assert r.data.tags["kdops.snapshot.train"] == snap.id
    names = {a.path for a in tracking.client.list_artifacts(run.run_id)} | \
        {a.path for a in tracking.client.list_artifacts(run.run_id, "figures")}
    assert {"eval_report.json", "figures/curves.png"} <= names
    with pytest.raises(RuntimeError), tracking.run("broken") as failed:
        raise RuntimeError("boom")
    assert tracking.get_run(failed.run_id).info.status == "FAILED"
    assert tracking.run_tag(run.run_id, "kdops.snapshot.train") == snap.id


def test_register_tags_lineage_is_idempotent_and_downloads(reg, tracking, variants, tmp_path):
    from kdops.artifacts import code_version

    name = "reg-lineage"
    with tracking.run("train") as run:
        pass
    lineage = {"teacher_id": "minilm-ft-3", "snapshot_ids": {"train": "aa11", "eval": "bb22"}, "cache_key": "ck-7",
               "topk": 8}
    v1 = reg.register(variants[0], run.run_id, name, lineage)
    assert reg.register(variants[0], run.run_id, name, lineage) == v1  # re-run after a crash: no duplicate
    assert len(reg.versions(name)) == 1
    lin = reg.lineage(name, v1)
    # one schema (kdops.artifacts.Lineage): a key outside it lands in details, the code version is the artifact's
    assert lin["teacher_id"] == "minilm-ft-3" and lin["snapshot_ids"] == {"train": "aa11", "eval": "bb22"}
    assert lin["cache_key"] == "ck-7" and lin["details"]["topk"] == 8 and lin["parent_version"] is None
    assert lin["code_version"] == code_version()
    reg.promote(name, v1, "first")
    v2 = reg.register(variants[1], run.run_id, name, {"soft_label_cache_key": "ck-old"})  # the older vocabulary
    assert v2 == v1 + 1 and reg.lineage(name, v2)["parent_version"] == v1  # parent = champion at the time
    assert reg.lineage(name, v2)["cache_key"] == "ck-old" and reg.lineage(name, v2)["teacher_id"] == "tiny-teacher"
    with tracking.run("train-again") as run2:
        pass
    assert reg.register(variants[0], run2.run_id, name, lineage) == v2 + 1  # another run is a new version
    rows = reg.versions(name)
    assert [(r["version"], r["kind"], r["aliases"]) for r in rows] == \
        [(v1, "classifier", ["champion"]), (v2, "classifier", []), (v2 + 1, "classifier", [])]
    path = reg.download(name, "champion", dst=tmp_path / "dl")
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in variants[0].iterdir())
    model, _, art = load_student(path)
    assert art.weights_sha256 == file_sha256(variants[0] / "model.safetensors")
    assert not list(path.glob("*.pkl")) and not list(path.glob("MLmodel"))
    assert reg.download(name, v1, dst=tmp_path / "dl") == path  # cached copy reused
    assert type(reg.load(name, v2)[0]).__name__ == type(model).__name__


def test_champion_info_is_typed_and_reads_the_promotion_summary(reg, tracking, variants, tmp_path):
    from kdops.registry import Champion

    name = "reg-champion"
    assert reg.champion_info(name) is None
    with tracking.run("train") as run:
        pass
    a, b = (reg.register(d, run.run_id, name, {"snapshot_ids": {"train": f"snap-{i}"}}) for i, d in enumerate(variants[:2]))
    summary = {"retention": 0.98, "per_domain": {"movie": {"accuracy": 0.9, "n": 120}}}
    reg.promote(name, a, "first", summary)
    reg.promote(name, b, "second", {"retention": 0.99})
    reg.rollback(name, "back")  # a rollback records no summary: the champion's is its promotion's
    champ = reg.champion_info(name, download_dir=tmp_path / "champ")
    assert isinstance(champ, Champion)
    assert (champ.version, champ.report, champ.lineage["snapshot_ids"]) == (a, summary, {"train": "snap-0"})
    assert champ.artifact == tmp_path / "champ"
    assert champ.read().weights_sha256 == file_sha256(variants[0] / "model.safetensors")
    assert champ.as_dict()["artifact"] == str(tmp_path / "champ") and champ.as_dict()["version"] == a
    reg.set_alias(name, "champion", b)  # made champion outside a promotion: no summary to gate against
    assert reg.champion_info(name, download_dir=tmp_path / "other").report == {"retention": 0.99}
    with pytest.raises(Exception):
        champ.version = 3  # frozen


def test_aliases_promote_rollback_and_append_only_ledger(reg, tracking, variants):
    from kdops.registry import RegistryError

    name = "reg-promotion"
    with tracking.run("train") as run:
        pass
    v = [reg.register(d, run.run_id, name, {"teacher_id": "t"}) for d in variants]
    assert reg.champion(name) is None and reg.get_version_by_alias(name, "challenger") is None
    reg.set_alias(name, "challenger", v[0])
    assert reg.challenger(name) == v[0]
    reg.promote(name, v[0], "bootstrap", {"overall": {"accuracy": 0.7}}, actor="alice")
    assert reg.champion(name) == v[0] and reg.challenger(name) is None  # promotion consumes the challenger
    reg.promote(name, v[1], "gate passed", REPORT, actor="flow")
    n = len(reg.ledger(name))
    reg.promote(name, v[1], "re-run")  # already champion: nothing new recorded
    assert len(reg.ledger(name)) == n
    reg.review(name, v[2], "retention below threshold", REPORT)
    assert reg.challenger(name) == v[2]
    reg.promote(name, v[2], "approved by reviewer", REPORT, actor="bob")
    before = reg.ledger(name)
    assert reg.rollback_target(name) == (v[2], v[1])  # planning moves nothing
    assert reg.champion(name) == v[2] and len(reg.ledger(name)) == len(before)
    assert reg.rollback(name, "p99 latency regression", actor="oncall")["version"] == v[1]
    assert reg.champion(name) == v[1]
    assert reg.rollback(name, "still bad")["version"] == v[0]  # repeated rollback walks further back
    with pytest.raises(RegistryError, match="no recorded previous champion"):
        reg.rollback(name, "nothing left")
    reg.reject(name, v[2], "rolled back twice", REPORT)
    led = reg.ledger(name)
    assert led[:len(before)] == before  # append-only: earlier entries never change
    assert [e["action"] for e in led] == ["promote", "promote", "review", "promote", "rollback", "rollback", "reject"]
    assert [(e["version"], e["previous_champion"]) for e in led] == \
        [(v[0], None), (v[1], v[0]), (v[2], v[1]), (v[2], v[1]), (v[1], v[2]), (v[0], v[1]), (v[2], v[0])]
    assert led[0]["actor"] == "alice" and led[1]["report_summary"]["overall"]["accuracy"] == 0.81
    assert all(e["time"] and e["reason"] for e in led)
    states = {r["version"]: (r["state"], r["aliases"]) for r in reg.versions(name)}
    assert states == {v[0]: ("champion", ["champion"]), v[1]: ("rolled_back", []), v[2]: ("rejected", [])}
    assert reg.rollback(name, "explicit", to_version=v[2])["version"] == v[2]
    with pytest.raises(RegistryError):
        reg.promote(name, 999, "no such version")
    with pytest.raises(RegistryError):
        reg.reject(name, 999, "no such version")


def test_review_makes_a_challenger_and_reject_clears_it_in_the_ledger(reg, tracking, variants):
    name = "reg-challenger"
    with tracking.run("train") as run:
        pass
    champ, cand = (reg.register(d, run.run_id, name, {"teacher_id": "t"}) for d in variants[:2])
    reg.promote(name, champ, "first")
    entry = reg.review(name, cand, "slice 'tweets' accuracy 0.8950 (limit >= 0.9000): within the review band",
                       {"retention": 0.97}, actor="distill_flow")
    assert (reg.champion(name), reg.challenger(name)) == (champ, cand)  # the champion keeps serving meanwhile
    assert {k: entry[k] for k in ("action", "version", "previous_champion", "actor")} == \
        {"action": "review", "version": cand, "previous_champion": champ, "actor": "distill_flow"}
    entry = reg.reject(name, cand, "review case 7: reject by ana", {"retention": 0.97}, actor="ana")
    assert (reg.champion(name), reg.challenger(name)) == (champ, None)
    assert [(e["action"], e["version"], e["actor"]) for e in reg.ledger(name)] == \
        [("promote", champ, reg.ledger(name)[0]["actor"]), ("review", cand, "distill_flow"), ("reject", cand, "ana")]
    assert {r["version"]: r["state"] for r in reg.versions(name)} == {champ: "champion", cand: "rejected"}


def test_a_failed_ledger_write_leaves_the_alias_where_it_was(reg, tracking, variants, monkeypatch):
    from kdops.registry import Registry

    name = "reg-atomic"
    with tracking.run("train") as run:
        pass
    a, b, c = (reg.register(d, run.run_id, name, {"teacher_id": "t"}) for d in variants)
    reg.promote(name, a, "first")
    reg.promote(name, b, "second")
    reg.review(name, c, "close call")
    before = reg.ledger(name)

    def fail(*args, **kw):
        raise OSError("store unavailable")

    monkeypatch.setattr(Registry, "_append", fail)
    for step in (lambda: reg.promote(name, c, "approved"), lambda: reg.rollback(name, "bad"),
                 lambda: reg.review(name, a, "again")):
        with pytest.raises(OSError, match="store unavailable"):
            step()
        assert (reg.champion(name), reg.challenger(name)) == (b, c)
    monkeypatch.undo()
    assert reg.ledger(name) == before


def test_cli_reads_the_same_store(reg, tracking, variants):
    from typer.testing import CliRunner

    from kdops.registry.cli import app

    name = "reg-cli"
    with tracking.run("train") as run:
        pass
    a, b = (reg.register(d, run.run_id, name, {"teacher_id": "t"}) for d in variants[:2])
    reg.promote(name, a, "first")
    reg.promote(name, b, "second")
    cli = CliRunner()
    common = ["--name", name, "--tracking-uri", reg.tracking_uri]
    out = cli.invoke(app, ["versions", *common])
    assert out.exit_code == 0 and f"v{b}" in out.output and "champion" in out.output
    assert json.loads(cli.invoke(app, ["champion", *common, "--json"]).output)["champion"] == b
    out = cli.invoke(app, ["rollback", *common, "--reason", "bad", "--actor", "ops"])
    assert out.exit_code == 0, out.output
    assert reg.champion(name) == a
    ledger = json.loads(cli.invoke(app, ["ledger", *common, "--json"]).output)
    assert ledger[-1]["action"] == "rollback" and ledger[-1]["actor"] == "ops"
    assert cli.invoke(app, ["rollback", *common, "--reason", "again"]).exit_code == 1
    out = cli.invoke(app, ["ui", "--tracking-uri", reg.tracking_uri, "--port", "5123", "--dry-run"])
    assert out.exit_code == 0 and "mlflow server --backend-store-uri sqlite:///" in out.output and "5123" in out.output
    helps = [p.default.help for c in app.registered_commands
             for p in inspect.signature(c.callback).parameters.values() if hasattr(p.default, "help")]
    assert helps and all(helps)
