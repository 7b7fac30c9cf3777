"""``kdops round``: one round of the project's task through the same ``distill_flow`` the service runs.

The project's training data (labels checked against the teacher, mapped where kdops.toml says) -> teacher outputs
(cached) -> distil (a first student, or the registry's champion continued with replay) -> evaluation on the
project's test data -> gate -> MLflow version -> the champion alias (and Triton, with ``--serve``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def run_project_round(session, train: str | None, test: str | None, recipe_name: str | None, serve: bool,
                      json_out: Path | None, echo=print) -> dict:
    from contextlib import ExitStack

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.demo import _quiet_logs
    from flows.loop import distill_flow
    from flows.monitor import current_champion
    from flows.services import PrefectServer
    from flows.tasks import LoopContext, save_snapshot
    from kdops import kinds
    from kdops.errors import UserError
    from kdops.paths import Home
    from serving.server import ServerConfig, TritonServer

    p = session.project
    teacher = session.teacher()  # opened first: a wrong teacher or label set fails before any server starts
    directory, url, model_name = session.teacher_location()
    train_spec, test_spec = train or p.data.train, test or p.data.test
    if not test_spec:
        raise UserError("no test data to gate the round on: pass --test or set [data] test in kdops.toml.")
    labels = getattr(teacher, "label_names", None)
    tr = session.aligned(session.data(train_spec, what="train"), labels, train_spec)
    te = session.aligned(session.data(test_spec, what="test"), labels, test_spec)
    labels = tuple(labels) if labels else None
    paths = Home.from_env()
    paths.mlflow.mkdir(parents=True, exist_ok=True)
    _quiet_logs()
    t0 = time.time()
    with ExitStack() as stack:
        prefect = stack.enter_context(PrefectServer(paths.root))
        stack.enter_context(temporary_settings({PREFECT_API_URL: prefect.url}))
        triton = stack.enter_context(TritonServer(ServerConfig(
            repository=str(paths.triton_repo), log_file=str(paths.triton / "tritonserver-round.log")))) if serve else None
        ctx = LoopContext(home=str(paths.root), teacher_dir=str(directory or ""), teacher_url=url, teacher_model=model_name,
                          teacher_api=session.teacher_api(),
                          tracking_uri=paths.tracking_uri, model=p.serve.model,
                          triton_url=triton.url if triton else "", triton_grpc_url=triton.grpc_url if triton else "",
                          triton_key=triton.admin_key if triton else "", repository=str(paths.triton_repo),
                          prediction_log=str(paths.predictions()))
        champion = current_champion.fn(ctx)
        kind = kinds.get(p.kind)
        recipe = _recipe(recipe_name or p.student.recipe or (kind.incremental_recipe if champion else kind.default_recipe), p)
        replay = [sid for sid in [champion.lineage.get("snapshot_ids", {}).get("train")] if sid] if champion else []
        echo(f"round on {len(tr)} training rows ({train_spec}), gated on {len(te)} test rows ({test_spec}); "
             f"recipe {recipe.name}; champion {'v' + str(champion.version) if champion else 'none (first round)'}")
        out = distill_flow(ctx, save_snapshot(ctx, tr, labels), save_snapshot(ctx, te, labels), recipe, champion,
                           deploy=True, replay_ids=replay)
    result = {"version": out["version"], "decision": out["decision"], "artifact": out["artifact"],
              "summary": out["summary"], "model": p.serve.model, "served": triton is not None and "promotion" in out,
              "seconds": round(time.time() - t0, 1)}
    d, s = result["decision"], result["summary"]
    echo(f"v{result['version']} of {p.serve.model}: gate {d['action']} ({'; '.join(d['reasons'])})")
    if "retention" in s:
        echo(f"student accuracy {s['accuracy']:.3f}, retention {s['retention']:.3f} of the teacher; artifact {result['artifact']}")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2, default=str))
    return result


def _recipe(name: str, project):
    """The named recipe with the project's [student] keys and gate thresholds."""
    from dataclasses import fields, replace

    from kdops.recipes import recipe, with_student

    st = project.student
    r = with_student(recipe(name), st.layers, st.embedding_size, st.epochs)
    known = {f.name for f in fields(r.gate)}
    gate = {k: v for k, v in vars(project.gate).items() if k in known}
    return replace(r, gate=replace(r.gate, **gate)) if gate else r
