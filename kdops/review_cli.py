"""``kdops review ...``: the review queue's typer sub-app.

A ``candidate`` case is a model: approving or rejecting it moves the registry and Triton, which kdops/ cannot
reach, so this app refuses those two and the ``kdops`` command mounts ``flows.promotion_cli.review_app`` instead,
whose ``approve`` / ``reject`` decide candidates through ``flows.promotion``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from kdops.review import KINDS, STATUSES, ReviewError, ReviewQueue

review_app = typer.Typer(help="Inspect and decide the cases that need a person.", no_args_is_help=True)

DbOption = typer.Option(None, "--db", help="Review-queue SQLite file; default $KDOPS_HOME/review.sqlite.")
ReviewerOption = typer.Option(None, "--reviewer", "-r", help="Who decides; default $USER.")


def _queue(db: Path | None) -> ReviewQueue:
    if db is None:
        from kdops.paths import home

        db = home() / "review.sqlite"
    return ReviewQueue(db)


def _who(reviewer: str | None) -> str:
    return reviewer or os.environ.get("USER", "unknown")


def _decide(db, case_id, decision, label, reviewer) -> None:
    try:
        queue = _queue(db)
        if decision in ("approve", "reject") and queue.get(case_id)["kind"] == "candidate":
            raise ReviewError(f"case {case_id} is a candidate model: `kdops review {decision}` decides it in the "
                              "registry (and on Triton), not this queue-only command.")
        c = queue.decide(case_id, decision, label=label, reviewer=_who(reviewer))
    except ReviewError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    typer.echo(f"case {c['id']}: {c['status']} by {c['reviewer']}" + (f" as {c['label']!r}" if c["label"] else ""))


@review_app.command("list")
def list_cases(
    status: str = typer.Option("open", "--status", "-s", help=f"One of {STATUSES}, or 'all'."),
    kind: str = typer.Option(None, "--kind", "-k", help=f"Only this kind: one of {KINDS}."),
    limit: int = typer.Option(50, "--limit", "-n", help="Show at most this many cases."),
    db: Path = DbOption,
) -> None:
    """List cases, oldest first."""
    cases = _queue(db).list(None if status == "all" else status, kind, limit)
    for c in cases:
        text = str(c["payload"].get("text", json.dumps(c["payload"])))[:60]
        typer.echo(f"{c['id']:>6}  {c['status']:<9} {c['kind']:<15} {c['reason'][:30]:<30}  {text}")
    if not cases:
        typer.echo("no cases")


@review_app.command("show")
def show(case_id: int = typer.Argument(..., help="Case id."), db: Path = DbOption) -> None:
    """Print one case as JSON."""
    try:
        typer.echo(json.dumps(_queue(db).get(case_id), indent=2))
    except ReviewError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e


@review_app.command("approve")
def approve(case_id: int = typer.Argument(..., help="Case id."), reviewer: str = ReviewerOption,
            db: Path = DbOption) -> None:
    """Approve a case (e.g. promote a candidate the gate sent to review)."""
    _decide(db, case_id, "approve", None, reviewer)


@review_app.command("reject")
def reject(case_id: int = typer.Argument(..., help="Case id."), reviewer: str = ReviewerOption,
           db: Path = DbOption) -> None:
    """Reject a case (e.g. a candidate, or a text not worth labelling)."""
    _decide(db, case_id, "reject", None, reviewer)


@review_app.command("label")
def label(case_id: int = typer.Argument(..., help="Case id."),
          value: str = typer.Argument(..., help="The correct label for the case's text."),
          reviewer: str = ReviewerOption, db: Path = DbOption) -> None:
    """Give a text case its correct label: it joins the next distillation round and the frozen golden set."""
    _decide(db, case_id, "label", value, reviewer)
