"""Promotion and rollback: one transaction across the registry's ``champion`` alias and what Triton serves.

- ``promote``: hot swap the candidate in, then ``Registry.promote`` (alias and ledger entry, or neither). A
  refused swap raises ``SwapError`` with the old version still serving, and the alias never moves; a registry
  step that fails after the swap puts the previously served version back on Triton, then raises.
- ``rollback``: the same two steps towards the version the registry rolls back to (the one the champion
  replaced, or an explicit one): swap its artifact in, then ``Registry.rollback``.
- ``act_on_decision``: the gate's verdict carried out. ``promote`` runs ``promote_flow``; ``review`` makes the
  candidate the ``challenger`` and opens a review case (``kdops review approve`` promotes it through
  ``promote``); ``reject`` is written to the ledger. Either way the champion keeps serving.

Without a Triton (``ctx.triton_url`` empty) the registry step is the whole transaction. The functions run inside
a Prefect flow (each step a task run, shown in the UI) and from the CLI (plain calls: no Prefect API needed).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

from prefect import flow, get_run_logger, task
from prefect.context import FlowRunContext

from flows.tasks import LoopContext, hot_swap_task, open_review, swap_config

log = logging.getLogger(__name__)


class PromotionError(RuntimeError):
    """The registry step failed after a swap and the served version could not be put back: the message says
    what Triton serves and what the registry says, so an operator can finish by hand."""


def _step(fn, *args):
    """A task run (or subflow) inside a flow run: retries, the UI; the plain function from the CLI."""
    return fn(*args) if FlowRunContext.get() else fn.fn(*args)


def _logger():
    return get_run_logger() if FlowRunContext.get() else log


def _registry(ctx: LoopContext):
    from kdops.registry import Registry

    return Registry(tracking_uri=ctx.uri)


@task(name="swap-back", cache_policy=None)
def swap_back(ctx: LoopContext) -> dict | None:
    """Serve again what Triton served before the last swap (from the swap archive); None when nothing was."""
    from serving.client import ServingClient
    from serving.swap import read_state, rollback

    if len(read_state(ctx.repository, ctx.model)["history"]) < 2:
        return None
    client = ServingClient(ctx.triton_url, admin_key=ctx.admin_key, grpc_url=ctx.triton_grpc_url)
    return rollback(client, ctx.model, ctx.repository, swap_config(ctx), steps=1).to_dict()


@task(name="registry-promote", cache_policy=None)  # the registry retries transient store errors itself
def registry_promote(ctx: LoopContext, version: int, reason: str, summary: dict | None, actor: str) -> dict:
    return _registry(ctx).promote(ctx.model, version, reason, summary, actor=actor)


@task(name="registry-rollback", cache_policy=None)
def registry_rollback(ctx: LoopContext, to_version: int, reason: str, actor: str | None) -> dict:
    return _registry(ctx).rollback(ctx.model, reason, actor=actor, to_version=to_version)


@task(name="registry-record", retries=2, retry_delay_seconds=[2, 5], cache_policy=None)
def registry_record(ctx: LoopContext, action: str, version: int, reason: str, summary: dict | None,
                    actor: str) -> dict | None:
    """A gate's ``review`` (the candidate becomes the challenger) or ``reject``, in the ledger. None when the
    version is the champion already (a re-run round): there is nothing to decide."""
    reg = _registry(ctx)
    if reg.champion(ctx.model) == int(version):
        return None
    record = {"review": reg.review, "reject": reg.reject}[action]
    return record(ctx.model, version, reason, summary, actor=actor)


def _transaction(ctx: LoopContext, artifact: str | None, registry_step: Callable[[], dict], what: str) -> dict:
    """Swap ``artifact`` in (when there is a Triton), then ``registry_step()``; undo the swap if that fails."""
    swap = _step(hot_swap_task, ctx, artifact) if ctx.triton_url else None  # SwapError: nothing moved
    try:
        entry = registry_step()
    except Exception as e:
        if swap is None:
            raise
        _logger().error("%s: the registry step failed after the swap (%s); serving the previous version again", what, e)
        try:
            back = _step(swap_back, ctx)
        except Exception as undo:
            raise PromotionError(f"{what}: the registry step failed ({e}) and putting the previous version back on "
                                 f"Triton failed too ({undo}); Triton serves {swap['label']}, the registry did not "
                                 "move. Swap the champion's artifact in by hand (kdops serve swap).") from e
        if back is None:
            raise PromotionError(f"{what}: the registry step failed ({e}); nothing was served before this swap, so "
                                 f"{swap['label']} stays loaded though the registry did not move.") from e
        raise
    return {"swap": swap, "ledger": entry}


def promote(ctx: LoopContext, version: int, artifact: str, reason: str, summary: dict | None = None,
            actor: str = "promote_flow") -> dict:
    """Serve ``artifact`` (registered as ``version``) and make it the champion, or neither."""
    _registry(ctx).model_version(ctx.model, version)  # an unknown version is refused before anything moves
    out = _transaction(ctx, artifact, lambda: _step(registry_promote, ctx, version, reason, summary, actor),
                       f"promote v{version}")
    _logger().info("v%s is champion%s", version, f" and serving as {out['swap']['label']}" if out["swap"] else "")
    return out


def rollback(ctx: LoopContext, reason: str, to_version: int | None = None, actor: str | None = "rollback_flow") -> dict:
    """Put back the champion the current one replaced (or ``to_version``): in the registry and on Triton."""
    reg = _registry(ctx)
    current, target = reg.rollback_target(ctx.model, to_version)
    artifact = str(reg.download(ctx.model, target, ctx.paths.downloads(ctx.model, target))) if ctx.triton_url else None
    out = _transaction(ctx, artifact, lambda: _step(registry_rollback, ctx, target, reason, actor),
                       f"rollback v{current} -> v{target}")
    _logger().info("rolled back v%s -> v%s%s", current, target, " on Triton too" if out["swap"] else "")
    return out


@flow(name="promote_flow")
def promote_flow(ctx: LoopContext, version: int, artifact: str, reason: str, summary: dict | None = None,
                 actor: str = "promote_flow") -> dict:
    """Hot swap on Triton and the ``champion`` alias, as one transaction."""
    return promote(ctx, version, artifact, reason, summary, actor)


@flow(name="rollback_flow")
def rollback_flow(ctx: LoopContext, reason: str, to_version: int | None = None, actor: str = "rollback_flow") -> dict:
    """The previous champion back, in the registry and on Triton, as one transaction."""
    return rollback(ctx, reason, to_version, actor)


def act_on_decision(ctx: LoopContext, decision, version: int, artifact: str, summary: dict, deploy: bool) -> dict:
    """The gate's verdict carried out; returns what to add to the flow's result. ``promote`` runs ``promote_flow``
    when deploying; ``review`` makes the candidate the challenger and opens a case for a person; ``reject`` is
    written to the ledger."""
    reason = "; ".join(decision.reasons)
    if decision.action == "promote":
        return {"promotion": _step(promote_flow, ctx, version, artifact, reason, summary)} if deploy else {}
    entry = _step(registry_record, ctx, decision.action, version, reason, summary, "gate")
    if decision.action == "review" and entry is not None:
        payload = {"model": ctx.model, "version": version, "summary": summary, "artifact": artifact}
        return {"ledger": entry, "review_id": _step(open_review, ctx, "candidate", payload, reason)}
    return {"ledger": entry}


def decide_candidate(ctx: LoopContext, case: dict, decision: str, reviewer: str) -> dict | None:
    """A reviewer's ``approve`` (promoted through ``promote``: swap and alias, or neither) or ``reject`` (ledger)
    of a ``candidate`` case; None for other decisions."""
    p = case["payload"]
    ctx = dataclasses.replace(ctx, model=p.get("model") or ctx.model)
    version, reason = int(p["version"]), f"review case {case['id']}: {decision} by {reviewer}"
    if decision == "reject":
        return _registry(ctx).reject(ctx.model, version, reason, p.get("summary"), actor=reviewer)
    if decision != "approve":
        return None
    artifact = p.get("artifact")
    if ctx.triton_url and not (artifact and Path(artifact, "kdops.json").is_file()):
        # made on another machine, or cleaned up since: the registry's copy
        artifact = str(_registry(ctx).download(ctx.model, version, ctx.paths.downloads(ctx.model, version)))
    return promote(ctx, version, artifact, reason, p.get("summary"), actor=reviewer)
