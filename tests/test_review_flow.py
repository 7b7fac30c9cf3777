"""The review loop on a real Prefect API: review_flow pauses for a typed form, a reviewer resumes it with
decisions, the queue and the registry change, and labelled cases reach the next round's snapshots."""

import threading
import time

import pytest


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _paused_run(flow_name: str, timeout_s: float = 60):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    deadline = time.time() + timeout_s
    with get_client(sync_client=True) as client:
        while time.time() < deadline:
            for run in client.read_flow_runs(limit=50, sort=FlowRunSort.EXPECTED_START_TIME_DESC):
                if run.state and run.state.is_paused() and client.read_flow(run.flow_id).name == flow_name:
                    return run
            time.sleep(0.5)
    raise AssertionError(f"no paused {flow_name} run within {timeout_s} s")


@pytest.mark.server
def test_review_flow_pauses_for_a_form_and_applies_decisions(tmp_path, harness, tiny_student_dir):
    from prefect.flow_runs import resume_flow_run

    from flows.review import review_flow
    from flows.tasks import LoopContext, save_snapshot, with_review_labels
    from kdops.data import Snapshot
    from kdops.registry import Registry, Tracking
    from kdops.review import ReviewQueue

    import pandas as pd

    ctx = LoopContext(home=str(tmp_path / "home"), teacher_dir="unused", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    reg = Registry(tracking_uri=ctx.tracking_uri)
    with Tracking(store=reg.store).run("candidate") as run:
        version = reg.register(tiny_student_dir, run.run_id, name=ctx.model)
    reg.review(ctx.model, version, "slice movie dropped 2.1 points", {"retention": 0.97}, actor="gate")
    queue = ReviewQueue(tmp_path / "home" / "review.sqlite")
    good = queue.add("low_confidence", {"text": "a truly wonderful film"}, "confidence 0.51")
    bad = queue.add("disagreement", {"text": "not sure about this one"}, "teacher says neg")
    skipped = queue.add("low_confidence", {"text": "meh"}, "confidence 0.50")
    cand = queue.add("candidate", {"model": ctx.model, "version": version, "summary": {"retention": 0.97}},
                     "slice movie dropped 2.1 points")

    result = {}
    t = threading.Thread(target=lambda: result.update(review_flow(ctx, ["neg", "pos"], poll_s=1)), daemon=True)
    t.start()
    run = _paused_run("review_flow")
    # what the Prefect UI shows: the open cases in the form's description, one pre-filled row per case
    assert queue.get(good)["status"] == "open"
    resume_flow_run(run.id, run_input={"reviewer": "ana", "decisions": [
        {"case_id": good, "decision": "label", "label": "pos"},
        {"case_id": bad, "decision": "label", "label": "maybe"},  # not a label: reported, not applied
        {"case_id": skipped, "decision": "skip"},
        {"case_id": cand, "decision": "approve"},
    ]})
    t.join(90)
    assert not t.is_alive(), "review_flow did not finish after resume"

    assert result["applied"] == [{"case_id": good, "decision": "label", "label": "pos"},
                                 {"case_id": cand, "decision": "approve", "label": None}]
    assert [e["case_id"] for e in result["errors"]] == [bad]
    assert queue.get(good)["status"] == "labelled" and queue.get(good)["reviewer"] == "ana"
    assert queue.get(bad)["status"] == "open" and queue.get(skipped)["status"] == "open"
    # the approved challenger is promoted (no Triton here: the registry step is the whole transaction)
    assert (reg.champion(ctx.model), reg.challenger(ctx.model)) == (version, None)
    assert [(e["action"], e["version"], e["actor"]) for e in reg.ledger(ctx.model)] == \
        [("review", version, "gate"), ("promote", version, "ana")]
    assert queue.get(cand)["status"] == "approved"

    # the labelled case is a hard label in the next round, and a golden evaluation row
    labels = ("neg", "pos")
    train_id = save_snapshot(ctx, pd.DataFrame({"text": ["new traffic one", "new traffic two"], "label": [None, None]}), labels)
    eval_id = save_snapshot(ctx, pd.DataFrame({"text": ["held out"], "label": ["neg"], "domain": ["movie"]}), labels)
    new_train, new_eval = with_review_labels(ctx, train_id, eval_id)
    snaps = tmp_path / "home" / "snapshots"
    train = Snapshot.load(snaps, new_train).rows
    assert new_train != train_id and len(train) == 3
    assert train.set_index("text").loc["a truly wonderful film", "label"] == "pos"
    ev = Snapshot.load(snaps, new_eval).rows
    assert ev[ev["domain"] == "golden"]["text"].tolist() == ["a truly wonderful film"]
    assert with_review_labels(ctx, new_train, new_eval) == (new_train, new_eval)  # nothing new: same ids
