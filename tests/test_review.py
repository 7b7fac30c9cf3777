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
    b = q.add("candidate", {"model_version": "3"}, "gate said review")
    c = q.add("candidate", {"model_version": "4"}, "gate said review")
    run = CliRunner().invoke
    out = run(review_app, ["list", "--db", str(db)])
    assert out.exit_code == 0 and "the film was long" in out.output
    assert '"model_version": "3"' in run(review_app, ["show", str(b), "--db", str(db)]).output
    assert run(review_app, ["label", str(a), "neg", "--reviewer", "ana", "--db", str(db)]).exit_code == 0
    assert run(review_app, ["approve", str(b), "-r", "ana", "--db", str(db)]).exit_code == 0
    assert run(review_app, ["reject", str(c), "-r", "ana", "--db", str(db)]).exit_code == 0
    assert run(review_app, ["reject", str(c), "--db", str(db)]).exit_code == 1  # already decided
    assert run(review_app, ["show", "99", "--db", str(db)]).exit_code == 1
    assert [x["status"] for x in ReviewQueue(db).list()] == ["labelled", "approved", "rejected"]
    assert "no cases" in run(review_app, ["list", "--db", str(db)]).output
    helps = run(review_app, ["label", "--help"]).output
    assert "--reviewer" in helps and "correct label" in helps
