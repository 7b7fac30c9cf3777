"""A restart of ``kdops up`` on the same home: runs its predecessor left non-terminal are reconciled, so a
deployment with one concurrency slot (cancel new on collision) runs again. Real Prefect API server."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    from flows.services import PrefectServer

    with PrefectServer(tmp_path_factory.mktemp("prefect")) as server:
        yield server


def test_the_ui_is_pointed_at_the_api_it_was_started_with(prefect_server):
    """The UI reads its API address from /ui-settings: it must be this server's, not Prefect's default port."""
    import json
    import urllib.request

    base = prefect_server.url.removesuffix("/api")
    with urllib.request.urlopen(f"{base}/ui-settings", timeout=30) as r:
        assert json.loads(r.read())["api_url"] == prefect_server.url


def test_a_run_left_pending_no_longer_blocks_its_deployment_after_reconciliation(prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy, ConcurrencyOptions, StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Pending

    from flows.services import reconcile_orphaned_runs

    with temporary_settings({PREFECT_API_URL: prefect_server.url}), get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("monitor_tick")
        once = ConcurrencyOptions(collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
        dep = client.create_deployment(flow_id, "kdops-monitor", tags=["kdops"], concurrency_limit=1,
                                       concurrency_options=once)
        other = client.create_deployment(flow_id, "someone-else", concurrency_limit=1, concurrency_options=once)

        def tick(deployment):  # what the runner does with a due run: propose PENDING, which takes the slot
            run = client.create_flow_run_from_deployment(deployment)
            client.set_flow_run_state(run.id, Pending())
            return client.read_flow_run(run.id)

        left = tick(dep)  # the run a killed `kdops up` left in "Submitting"
        assert left.state.type == StateType.PENDING
        blocked = tick(dep)
        assert blocked.state.type == StateType.CANCELLED  # the symptom: every later tick cancelled on arrival
        foreign = tick(other)

        assert reconcile_orphaned_runs() == [left.name]
        assert client.read_flow_run(left.id).state.type == StateType.CANCELLED
        assert client.read_flow_run(foreign.id).state.type == StateType.PENDING  # not a kdops deployment: untouched
        after = tick(dep)
        assert after.state.type == StateType.PENDING  # the slot is free again
        assert reconcile_orphaned_runs() == [after.name]  # and the next start-up finds this one
