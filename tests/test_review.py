"""Review queue: round trip, restart (re-open the DB), decisions are final, the golden set is frozen; CLI."""

from __future__ import annotations

import sqlite3

import pytest
from typer.testing import CliRunner

from kdops.review import ReviewError, ReviewQueue
from kdops.review_cli import review_app


def test_round_trip_survives_restart(tmp_path):
    db = tmp_path / "review.sqlite"
    q = ReviewQueue(db)
    a = q.add("low_confidence", {"text": "the plot was fine i guess", "confidence": 0.52}, "confidence < 0.6")
    b = q.add("disagreement", {"text": "battery died, love it", "student": "pos", "teacher": "neg"}, "teacher != student")
    c = q.add("candidate", {"model_version": "7", "gate": {"f1": 0.81}}, "gate said review")
    q.add("invalid_input", {"error": "text 0 is empty"}, "failed validation")
    del q

    q = ReviewQueue(db)  # a restart: a new process opens the same file
    assert [x["id"] for x in q.open()] == [a, b, c, 4]
    assert [x["id"] for x in q.open(kind="disagreement")] == [b]
    assert q.get(b)["payload"]["teacher"] == "neg"

    q.decide(a, "label", label="neg", reviewer="ana")
    q.decide(b, "label", label="pos", reviewer="ben")
    decided = q.decide(c, "approve", reviewer="ana")
    assert decided["status"] == "approved" and decided["reviewer"] == "ana" and decided["decided_at"]

    q = ReviewQueue(db)
    assert [x["id"] for x in q.open()] == [4]
    labelled = q.labelled_cases()
    assert list(labelled["text"]) == ["the plot was fine i guess", "battery died, love it"]
    assert list(labelled["label"]) == ["neg", "pos"]
    assert list(q.golden_set()["label"]) == ["neg", "pos"]
    assert q.counts() == {"open": 1, "labelled": 2, "approved": 1}


def test_decisions_are_final_and_validated(tmp_path):
    q = ReviewQueue(tmp_path / "r.sqlite")
    i = q.add("low_confidence", {"text": "meh"}, "low")
    with pytest.raises(ReviewError):
        q.decide(i, "label")  # no label
    with pytest.raises(ReviewError):
        q.decide(i, "maybe")
    with pytest.raises(ReviewError):
        q.add("gossip", {}, "x")
    with pytest.raises(ReviewError):
        q.decide(999, "approve")
    q.decide(i, "label", label="neg", reviewer="ana")
    with pytest.raises(ReviewError, match="already labelled"):
        q.decide(i, "label", label="pos", reviewer="eve")


def test_golden_set_is_frozen(tmp_path):
    db = tmp_path / "r.sqlite"
    q = ReviewQueue(db)
    i = q.add("disagreement", {"text": "not bad at all"}, "teacher != student")
    q.decide(i, "label", label="pos", reviewer="ana")
    before = q.golden_set()
    # Even writing to the file directly cannot change or drop a golden row.
    with sqlite3.connect(db) as raw:
        with pytest.raises(sqlite3.IntegrityError, match="frozen"):
            raw.execute("UPDATE golden SET label = 'neg'")
        with pytest.raises(sqlite3.IntegrityError, match="frozen"):
            raw.execute("DELETE FROM golden")
    # More labels only append.
    j = q.add("low_confidence", {"text": "so so"}, "low")
    q.decide(j, "label", label="neg", reviewer="ben")
    after = ReviewQueue(db).golden_set()
    assert after.iloc[:1].equals(before) and len(after) == 2
    # A case labelled with golden=False trains but stays out of the evaluation set.
    k = q.add("low_confidence", {"text": "fine"}, "low")
    q.decide(k, "label", label="pos", reviewer="ben", golden=False)
    assert len(q.golden_set()) == 2 and len(q.labelled_cases()) == 3


def test_cli_list_show_label_approve_reject(tmp_path):
    db = tmp_path / "r.sqlite"
    q = ReviewQueue(db)
    a = q.add("low_confidence", {"text": "the film was long"}, "confidence 0.51")
    b = q.add("drift", {"window_id": "w-3"}, "two alarms in three windows")
    c = q.add("invalid_input", {"error": "text 0 is empty"}, "failed validation")
    d = q.add("candidate", {"version": 4}, "gate said review")
    run = CliRunner().invoke
    out = run(review_app, ["list", "--db", str(db)])
    assert out.exit_code == 0 and "the film was long" in out.output
    assert '"window_id": "w-3"' in run(review_app, ["show", str(b), "--db", str(db)]).output
    assert run(review_app, ["label", str(a), "neg", "--reviewer", "ana", "--db", str(db)]).exit_code == 0
    assert run(review_app, ["approve", str(b), "-r", "ana", "--db", str(db)]).exit_code == 0
    assert run(review_app, ["reject", str(c), "-r", "ana", "--db", str(db)]).exit_code == 0
    assert run(review_app, ["reject", str(c), "--db", str(db)]).exit_code == 1  # already decided
    assert run(review_app, ["show", "99", "--db", str(db)]).exit_code == 1
    # a candidate model is decided where the registry and Triton move (flows.promotion_cli), not queue-only
    out = run(review_app, ["approve", str(d), "-r", "ana", "--db", str(db)])
    assert out.exit_code == 1 and f"case {d} is a candidate model" in out.output
    assert [x["status"] for x in ReviewQueue(db).list()] == ["labelled", "approved", "rejected", "open"]
    assert [x["id"] for x in ReviewQueue(db).open()] == [d]
    helps = run(review_app, ["label", "--help"]).output
    assert "--reviewer" in helps and "correct label" in helps


@pytest.fixture
def loop(tmp_path, monkeypatch, tiny_student_dir):
    """A registry (SQLite MLflow store) with a champion v1 and two candidates v2, v3; no Triton."""
    from test_registry import make_variant

    from flows.tasks import LoopContext
    from kdops.registry import Registry, Tracking

    monkeypatch.setenv("KDOPS_HOME", str(tmp_path / "home"))
    for var in ("KDOPS_TRITON_URL", "KDOPS_TRITON_GRPC_URL", "KDOPS_TRITON_ADMIN_KEY"):
        monkeypatch.delenv(var, raising=False)
    ctx = LoopContext(home=str(tmp_path / "home"), teacher_dir="", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                      model="rev")
    reg = Registry(tracking_uri=ctx.tracking_uri)
    dirs = [tiny_student_dir] + [make_variant(tiny_student_dir, tmp_path / f"v{i}", seed=30 + i) for i in (2, 3)]
    with Tracking(store=reg.store).run("train") as run:
        versions = [reg.register(d, run.run_id, "rev", {"teacher_id": "t"}) for d in dirs]
    reg.promote("rev", versions[0], "first", actor="test")
    return ctx, reg, versions, dirs


def test_gate_review_makes_a_challenger_and_the_cli_approval_promotes_it(loop):
    from flows.promotion import act_on_decision
    from flows.promotion_cli import review_app as loop_review_app
    from kdops.gate import Decision

    ctx, reg, (v1, v2, v3), dirs = loop
    db = ctx.paths.review_db
    summary = {"retention": 0.965, "per_domain": {"movie": {"accuracy": 0.81, "n": 400}}}
    why = "retention 0.9650 (limit >= 0.9700): missed by 0.0050, within the review band"
    out = act_on_decision(ctx, Decision("review", (why,)), v2, str(dirs[1]), summary, deploy=True)
    assert (reg.champion("rev"), reg.challenger("rev")) == (v1, v2)  # the champion keeps serving meanwhile
    case = ReviewQueue(db).get(out["review_id"])
    assert (case["kind"], case["reason"], case["payload"]) == \
        ("candidate", why, {"model": "rev", "version": v2, "summary": summary, "artifact": str(dirs[1])})
    assert {k: out["ledger"][k] for k in ("action", "version", "previous_champion", "actor", "reason")} == \
        {"action": "review", "version": v2, "previous_champion": v1, "actor": "gate", "reason": why}

    run = CliRunner().invoke
    common = ["--db", str(db), "--tracking-uri", ctx.tracking_uri]
    res = run(loop_review_app, ["approve", str(out["review_id"]), "-r", "ana", *common])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == [f"case {out['review_id']}: approved by ana",
                                       f"rev: v{v2} is champion; registry only (no --triton-url): the served model is unchanged"]
    assert (reg.champion("rev"), reg.challenger("rev")) == (v2, None)
    assert [(e["action"], e["version"], e["actor"]) for e in reg.ledger("rev")] == \
        [("promote", v1, "test"), ("review", v2, "gate"), ("promote", v2, "ana")]
    assert reg.ledger("rev")[-1]["report_summary"] == summary  # what the next round's gate reads back
    assert reg.champion_info("rev").report == summary
    res = run(loop_review_app, ["approve", str(out["review_id"]), "-r", "bob", *common])
    assert res.exit_code == 1 and "already approved (by ana)" in res.output


def test_gate_reject_and_a_reviewers_reject_are_written_to_the_ledger(loop):
    from flows.promotion import act_on_decision
    from flows.promotion_cli import review_app as loop_review_app
    from kdops.gate import Decision

    ctx, reg, (v1, v2, v3), dirs = loop
    db = ctx.paths.review_db
    why = "slice 'tweets' accuracy 0.7100 (limit >= 0.8000): missed by 0.0900"
    out = act_on_decision(ctx, Decision("reject", (why,)), v3, str(dirs[2]), {"retention": 0.91}, deploy=True)
    assert set(out) == {"ledger"} and not db.exists()  # no case for a person: nothing to decide
    assert (reg.champion("rev"), reg.challenger("rev")) == (v1, None)
    assert {k: reg.ledger("rev")[-1][k] for k in ("action", "version", "previous_champion", "actor", "reason")} == \
        {"action": "reject", "version": v3, "previous_champion": v1, "actor": "gate", "reason": why}
    assert {r["version"]: r["state"] for r in reg.versions("rev")} == {v1: "champion", v2: "", v3: "rejected"}
    # a re-run round whose weights are the champion's: nothing to record
    assert act_on_decision(ctx, Decision("reject", ("x",)), v1, str(dirs[0]), {}, deploy=True) == {"ledger": None}

    case_id = act_on_decision(ctx, Decision("review", ("close call",)), v2, str(dirs[1]), {}, deploy=True)["review_id"]
    run = CliRunner().invoke
    res = run(loop_review_app, ["reject", str(case_id), "-r", "ana", "--db", str(db), "--tracking-uri", ctx.tracking_uri])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == [f"case {case_id}: rejected by ana", f"rev: v{v2} rejected in the ledger"]
    assert (reg.champion("rev"), reg.challenger("rev")) == (v1, None)
    assert [(e["action"], e["version"], e["actor"]) for e in reg.ledger("rev")][-2:] == \
        [("review", v2, "gate"), ("reject", v2, "ana")]


def test_a_failed_approval_leaves_the_case_open_and_the_champion_in_place(loop):
    from flows.promotion_cli import review_app as loop_review_app

    ctx, reg, (v1, v2, v3), dirs = loop
    db = ctx.paths.review_db
    case_id = ReviewQueue(db).add("candidate", {"model": "rev", "version": 99, "summary": {}}, "gate said review")
    res = CliRunner().invoke(loop_review_app, ["approve", str(case_id), "-r", "ana", "--db", str(db),
                                               "--tracking-uri", ctx.tracking_uri])
    assert res.exit_code == 1 and res.output.startswith("error: rev: no version or alias 99 ")
    assert ReviewQueue(db).get(case_id)["status"] == "open" and reg.champion("rev") == v1


def test_informative_texts_disagreement_first_then_least_confident_within_a_daily_budget(tmp_path):
    import numpy as np

    from kdops.review import ReviewQueue, informative

    student = np.array([[0.9, 0.1], [0.55, 0.45], [0.2, 0.8], [0.6, 0.4], [0.99, 0.01]])
    teacher_rows = np.array([0, 2, 4])
    teacher = np.array([[0.1, 0.9], [0.3, 0.7], [0.4, 0.6]])  # row 0 and row 4 disagree; row 0 the surer
    picks = informative(student, teacher, teacher_rows, k=4, label_names=["neg", "pos"])
    assert [(i, kind) for i, kind, _ in picks] == [(0, "disagreement"), (4, "disagreement"), (1, "low_confidence"),
                                                   (3, "low_confidence")]
    assert picks[0][2] == "teacher says pos (0.90), student served neg"
    assert [i for i, _, _ in informative(student, k=2)] == [1, 3]  # no teacher: the least confident rows

    q = ReviewQueue(tmp_path / "r.sqlite")
    texts = [f"text {i}" for i in range(5)]
    first = q.add_texts([(texts[i], kind, why) for i, kind, why in picks], per_day=3)
    assert len(first) == 3 and [c["kind"] for c in q.open()] == ["disagreement", "disagreement", "low_confidence"]
    assert q.add_texts([("text 9", "low_confidence", "x")], per_day=3) == []  # today's budget is spent
    assert q.add_texts([(texts[0], "disagreement", "again"), ("text 8", "low_confidence", "x")], per_day=5) != []
    assert [c["payload"]["text"] for c in q.open()].count(texts[0]) == 1  # never asked twice
