"""``kdops up``: the loop as a long-running service.

One process starts Prefect's API server (or uses ``$PREFECT_API_URL``), points at the MLflow store (the
embedded SQLite file or ``$MLFLOW_TRACKING_URI``), starts tritonserver (or attaches to one), puts the
registry's champion on it, and serves these deployments with ``prefect.serve``:

- ``monitor_tick/kdops-monitor`` on an interval schedule (``flows/monitor.py``);
- ``distill_flow/kdops-distill`` (any task kind): on demand or started by the monitor, and, with ``retrain_cron`` or
  ``retrain_interval_s``, on that schedule: a scheduled run has no ``train_id`` and trains on the snapshots queued
  from the watched directory since the last round (``flows/sources.py``);
- ``ingest_tick/kdops-ingest`` (with ``watch_dir``): scans the watched directory on the monitor's interval, each new
  file ingested once and queued;
- ``promote_flow/kdops-promote``, ``rollback_flow/kdops-rollback`` and ``review_flow/kdops-review``,
  run on demand (from the UI, ``prefect deployment run``, or the monitor).

With ``work_pool`` (``kdops up --work-pool NAME``) the same deployments are registered on a Prefect process work pool
and run by ``prefect worker`` processes, here and on other machines (``flows/workpool.py``; README, "Scaling out").
Flow parameters are ids and paths only: Prefect stores them in its API.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from flows.monitor import current_champion, monitor_tick
from flows.tasks import MODEL, LoopContext, swap_config
from kdops.artifacts import Artifact
from kdops.data import DataSchema
from kdops.registry import Champion

log = logging.getLogger("kdops.up")


# -- the service ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UpConfig:
    """What ``kdops up`` starts and how often it checks."""

    home: str = field(metadata={"help": "kdops data directory (snapshots, registry store, Prefect database, logs)."})
    teacher_dir: str = field(default="", metadata={"help": "Teacher directory; empty: no teacher-disagreement check."})
    teacher_url: str = field(default="", metadata={"help": "A teacher served by Triton (HTTP host:port) instead of teacher_dir."})
    teacher_model: str = field(default="", metadata={"help": "The served teacher's model name."})
    teacher_api: str = field(default="", metadata={"help": "An OpenAI-compatible teacher (kdops.api_teacher.ApiTeacherConfig as JSON)."})
    interval_s: float = field(default=300.0, metadata={"help": "Seconds between monitor_tick runs."})
    window_s: float = field(default=3600.0, metadata={"help": "A tick looks back at most this many seconds."})
    min_rows: int = field(default=200, metadata={"help": "A tick checks a window once it holds this many predictions."})
    triton_url: str = field(default="", metadata={"help": "Attach to this Triton (HTTP host:port); empty: start tritonserver."})
    triton_grpc_url: str = field(default="", metadata={"help": "gRPC host:port of the attached Triton."})
    triton_key: str = field(default="", metadata={"help": "Model-control key of the attached Triton."})
    repository: str = field(default="", metadata={"help": "Triton model repository as seen from here; empty: <home>/triton-repo."})
    model: str = field(default=MODEL, metadata={"help": "Registered and served model name."})
    runtime: str = field(default="auto", metadata={"help": "auto: a classifier on CPU serves its ONNX graph (INT8 where gated); torch: the torch student."})
    redact_texts: bool = field(default=False, metadata={"help": "The prediction log keeps texts' SHA-256 only."})
    for_seconds: float | None = field(default=None, metadata={"help": "Stop after this many seconds; None: until a signal."})
    # new data and schedules (the project file's [data] and [schedule])
    watch_dir: str = field(default="", metadata={"help": "Directory where new data files land: each is ingested once and queued for the next scheduled round ('' : none)."})
    watch_interval_s: float = field(default=0.0, metadata={"help": "Seconds between scans of watch_dir (0: interval_s)."})
    schema: DataSchema = field(default_factory=DataSchema, metadata={"help": "How watched files and eval_data are read (the project's [data] columns)."})
    labels: tuple[str, ...] = field(default=(), metadata={"help": "The teacher's labels ([task] labels): watched data is mapped onto them; empty: as the data says."})
    label_map: dict[str, str] = field(default_factory=dict, metadata={"help": "Data label -> teacher label ([task.label_map])."})
    eval_data: str = field(default="", metadata={"help": "Held-out evaluation data for scheduled rounds and retrains: a file, snapshot id or corpus:... ('' : the champion's)."})
    kind: str = field(default="classifier", metadata={"help": "Task kind ([task] kind): a first scheduled round uses its default recipe."})
    recipe: str = field(default="", metadata={"help": "A first round's recipe name ('' : the kind's default); rounds continuing a champion use its kind's incremental recipe."})
    retrain_cron: str = field(default="", metadata={"help": "Cron (5 fields, UTC) for retraining rounds on newly arrived data ('' : none)."})
    retrain_interval_s: float = field(default=0.0, metadata={"help": "Or an interval in seconds between such rounds (0: none)."})
    openai_port: int = field(default=0, metadata={"help": "Port of the OpenAI-compatible front started when the kind generates text (0: a free one; -1: no front)."})
    work_pool: str = field(default="", metadata={"help": "Register the deployments on this Prefect process work pool and run them in `prefect worker` processes (flows/workpool.py); empty: prefect.serve in this process."})

    def __post_init__(self) -> None:
        from kdops import kinds

        if self.interval_s <= 0 or self.window_s <= 0 or self.min_rows < 1:
            raise ValueError("interval_s and window_s must be positive and min_rows at least 1.")
        if self.retrain_cron and self.retrain_interval_s:
            raise ValueError("set retrain_cron or retrain_interval_s, not both.")
        if self.retrain_interval_s < 0 or self.watch_interval_s < 0:
            raise ValueError("retrain_interval_s and watch_interval_s must not be negative.")
        if self.retrain_cron:
            from prefect.client.schemas.schedules import CronSchedule

            CronSchedule(cron=self.retrain_cron)  # pydantic's ValidationError is a ValueError: a bad cron fails here
        kinds.get(self.kind)
        if self.recipe:
            from kdops.recipes import recipe

            if recipe(self.recipe).kind.value != self.kind:
                raise ValueError(f"recipe {self.recipe!r} is not a {self.kind} recipe.")
        if self.triton_url and not (self.repository and self.triton_key):
            raise ValueError("an attached Triton needs its model repository (as seen from here) and its admin key.")
        if self.for_seconds is not None and self.for_seconds <= 0:
            raise ValueError("for_seconds must be positive.")

    @property
    def first_recipe(self) -> str:
        from kdops import kinds

        return self.recipe or kinds.get(self.kind).default_recipe

    @property
    def retrain_schedule(self) -> dict:
        """``to_deployment`` keywords for the scheduled retraining rounds (none: on demand only)."""
        from datetime import timedelta

        if self.retrain_cron:
            return {"cron": self.retrain_cron}
        return {"interval": timedelta(seconds=self.retrain_interval_s)} if self.retrain_interval_s else {}


def build_deployments(ctx: LoopContext, cfg: UpConfig, label_names: list[str] | None, eval_id: str | None = None) -> list:
    """The served deployments. Default parameters hold ids and paths (the context), nothing large. ``eval_id``: the
    evaluation snapshot of scheduled rounds and monitor retrains (None: the champion's)."""
    from datetime import timedelta

    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.types.entrypoint import EntrypointType

    from flows.loop import distill_flow
    from flows.promotion import promote_flow, rollback_flow
    from flows.review import review_flow
    from flows.sources import ingest_tick

    c = dataclasses.asdict(ctx)
    evaluation = {"eval_id": eval_id} if eval_id else {}
    once = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
    # Module entrypoints: a run imports flows.up etc. from the installed package, whatever its working directory.
    common = {"entrypoint_type": EntrypointType.MODULE_PATH, "tags": ["kdops"]}
    review_params = {"ctx": c, **({"label_names": label_names} if label_names else {})}
    deployments = [
        # A tick that finds the previous one still running is dropped, not queued behind it.
        monitor_tick.to_deployment("kdops-monitor", interval=timedelta(seconds=cfg.interval_s),
                                   parameters={"ctx": c, "window_s": cfg.window_s, "min_rows": cfg.min_rows, **evaluation},
                                   concurrency_limit=once,
                                   description="Check served traffic against the champion; retrain or open a review.", **common),
        # One distillation at a time: rounds queue rather than share the CPU; a scheduled run (no train_id) trains
        # on the snapshots queued from the watched directory since the last round.
        distill_flow.to_deployment("kdops-distill", parameters={"ctx": c, "recipe": cfg.first_recipe, **evaluation},
                                   concurrency_limit=1, **cfg.retrain_schedule,
                                   description="One distillation round of any task kind -> gate -> register -> promote | review; "
                                               "scheduled runs train on the newly arrived data.", **common),
        promote_flow.to_deployment("kdops-promote", parameters={"ctx": c},
                                   description="Hot swap on Triton and move the champion alias (a transaction).", **common),
        rollback_flow.to_deployment("kdops-rollback", parameters={"ctx": c},
                                    description="Serve the previous champion again and move the alias back (a transaction).",
                                    **common),
        review_flow.to_deployment("kdops-review", parameters=review_params,
                                  description="Work the review queue from the Prefect UI (pauses for a form).", **common),
    ]
    if cfg.watch_dir:
        deployments.append(ingest_tick.to_deployment(
            "kdops-ingest", interval=timedelta(seconds=cfg.watch_interval_s or cfg.interval_s), concurrency_limit=once,
            parameters={"ctx": c, "watch_dir": cfg.watch_dir, "data_schema": dataclasses.asdict(cfg.schema),
                        "labels": list(cfg.labels) or None, "label_map": cfg.label_map or None},
            description="Ingest each new file in the watched directory once and queue it for the next scheduled round.", **common))
    return deployments


class _Stop(Exception):
    """Raised in the main thread by our SIGTERM handler before the Prefect runner installs its own."""


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def run_up(cfg: UpConfig, echo=print) -> None:
    """Start everything, serve the deployments until a signal or ``cfg.for_seconds``, then stop it all."""
    from contextlib import ExitStack

    from prefect.settings import PREFECT_API_URL, PREFECT_RUNNER_POLL_FREQUENCY, temporary_settings

    from flows.services import PrefectServer, reconcile_orphaned_runs
    from flows.status import announce, withdraw
    from kdops.paths import Home
    from serving.server import ServerConfig, TritonServer
    from kdops.proc import Watchdog
    from serving.watchdog import TritonWatchdog

    paths = Home.at(cfg.home)
    paths.root.mkdir(parents=True, exist_ok=True)
    home = paths.root
    # Flow runs are child processes of the runner: they find the same data directory through the environment.
    os.environ["KDOPS_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    tracking_uri = paths.tracking_uri
    repo = Path(cfg.repository or paths.triton_repo).resolve()
    plog = paths.predictions()
    if not os.environ.get("PREFECT_API_URL"):
        _check_scheduler_deps(echo)
    eval_id = _eval_snapshot(cfg, paths)  # a bad [data] test fails here, before any server starts
    previous_term = signal.signal(signal.SIGTERM, _raise_stop)  # a SIGTERM during start-up still cleans up
    try:
        with ExitStack() as stack:
            prefect = stack.enter_context(PrefectServer(home))
            # The runner looks for due runs every 10 s by default: a shorter monitor interval would tick late.
            poll = max(1, min(10, int(min(cfg.interval_s, cfg.watch_interval_s or cfg.interval_s))))
            stack.enter_context(temporary_settings({PREFECT_API_URL: prefect.url, PREFECT_RUNNER_POLL_FREQUENCY: poll}))
            if not prefect.external:  # a dead server comes back on the same port and database
                stack.enter_context(Watchdog("prefect server", lambda: prefect.died, prefect.restart, interval_s=2.0))
            if not prefect.external:  # only this process ever ran the embedded server's deployments
                orphans = reconcile_orphaned_runs()
                if orphans:
                    echo(f"reconciled {len(orphans)} run(s) a previous kdops up left unfinished: {', '.join(orphans)}")
            announce(paths, prefect_api=prefect.url, model=cfg.model, watch=cfg.watch_dir)
            stack.callback(withdraw, paths)
            triton = stack.enter_context(TritonServer(ServerConfig(
                repository=str(repo), url=cfg.triton_url, grpc_url=cfg.triton_grpc_url, admin_key=cfg.triton_key,
                log_file=str(paths.triton / "tritonserver.log") if not cfg.triton_url else "")))
            # The admin key reaches the served runs (child processes) through the environment, not through
            # deployment parameters, which the Prefect API and UI show to anyone who can read them.
            os.environ["KDOPS_TRITON_ADMIN_KEY"] = triton.admin_key
            announce(paths, prefect_api=prefect.url, model=cfg.model, watch=cfg.watch_dir, triton=triton.url,
                     metrics=triton.metrics_url)
            ctx = LoopContext(home=str(home), teacher_dir=cfg.teacher_dir, teacher_url=cfg.teacher_url,
                              teacher_model=cfg.teacher_model, teacher_api=cfg.teacher_api, tracking_uri=tracking_uri, triton_url=triton.url,
                              triton_grpc_url=triton.grpc_url, triton_key="", repository=str(repo),
                              model=cfg.model, prediction_log=str(plog), runtime=cfg.runtime,
                              redact_texts=cfg.redact_texts)
            champion = current_champion.fn(ctx)
            version = champion.version if champion else None
            label_names = _deploy_champion(ctx, triton, champion, echo) if champion else None
            stack.enter_context(TritonWatchdog(triton))  # a dead tritonserver is started again, serving what it served
            front = _openai_front(stack, ctx, triton, cfg, champion)
            if front is not None:
                echo(f"OpenAI API: {front.url}/v1 (model {ctx.model}; clients switch from the teacher's by base URL)")
            _announce(echo, prefect, paths, ctx, triton, cfg, version)
            _first_scan(ctx, cfg, echo)
            if cfg.work_pool:  # the same deployments, run by `prefect worker` processes (here and on other machines)
                from flows.workpool import serve_on_pool

                serve_on_pool(build_deployments(ctx, cfg, label_names, eval_id), cfg.work_pool, prefect.url,
                              paths.prefect / "worker.log", cfg.for_seconds, echo, poll_s=poll)
            else:
                _serve(build_deployments(ctx, cfg, label_names, eval_id), cfg.for_seconds, echo)
    except (_Stop, KeyboardInterrupt, SystemExit) as e:
        # SystemExit: the Prefect runner's own SIGTERM handler stops it and exits; the servers are already
        # stopped by the ExitStack when this runs.
        log.info("kdops up stopped (%s)", type(e).__name__)
    finally:
        signal.signal(signal.SIGTERM, previous_term)
    echo("kdops up: stopped")


def _announce(echo, prefect, paths, ctx: LoopContext, triton, cfg: UpConfig, version: int | None) -> None:
    """Where each part runs, for the operator."""
    ui = prefect.url.removesuffix("/api")
    echo(f"Prefect API: {prefect.url}")
    echo(f"Prefect UI: {ui}{'' if prefect.external else ' (embedded, database ' + str(paths.prefect) + ')'}")
    echo(f"MLflow store: {ctx.uri}  (browse: kdops registry ui)")
    echo(f"Triton: http://{triton.url} (gRPC {triton.grpc_url}){' attached' if cfg.triton_url else ''}; "
         f"model {cfg.model}: {'v' + str(version) if version is not None else 'no champion yet'}")
    echo(f"Prediction log: {ctx.prediction_log}; loop state: {paths.loop_state(ctx.model).parent}")
    if cfg.watch_dir:
        echo(f"Watching {cfg.watch_dir} every {cfg.watch_interval_s or cfg.interval_s:g} s; queue: {paths.sources}")
    sched = cfg.retrain_schedule
    echo("Retraining on new data: " + (f"cron {cfg.retrain_cron} (UTC)" if "cron" in sched else
                                       f"every {cfg.retrain_interval_s:g} s" if sched else "on demand only (no schedule)"))


def _eval_snapshot(cfg: UpConfig, paths) -> str | None:
    """``cfg.eval_data`` as a saved snapshot (labels mapped onto the teacher's), or None."""
    if not cfg.eval_data:
        return None
    from kdops.cli_common import resolve_data
    from kdops.data import from_rows
    from kdops.labels import align_labels

    snap = resolve_data(cfg.eval_data, cfg.schema)
    if cfg.labels:
        snap = from_rows(align_labels(snap.rows, cfg.labels, cfg.label_map, source=cfg.eval_data), tuple(cfg.labels))
    snap.save(paths.snapshots)
    return snap.id


def _first_scan(ctx: LoopContext, cfg: UpConfig, echo) -> None:
    """Files that landed while kdops up was down are queued now, not one interval later."""
    if not cfg.watch_dir:
        return
    from kdops.sources import scan_watch_dir

    for r in scan_watch_dir(ctx.paths, cfg.watch_dir, cfg.schema, cfg.labels, cfg.label_map):
        echo(r.summary())


def _serve(deployments: list, for_seconds: float | None, echo) -> None:
    """``prefect.serve`` until Ctrl-C, SIGTERM or ``for_seconds``."""
    from prefect import serve

    timer = None
    if for_seconds:
        # SIGINT is what Ctrl-C sends: prefect.serve handles it by shutting the runner down and returning.
        timer = threading.Timer(for_seconds, os.kill, (os.getpid(), signal.SIGINT))
        timer.daemon = True
        timer.start()
    try:
        serve(*deployments, print_starting_message=True)
    finally:
        if timer is not None:
            timer.cancel()
        # Already stopping: a further SIGTERM must not cut the servers' shutdown short (the runner's
        # handler, still installed, would try to stop a runner that has stopped).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        echo("kdops up: stopping")


def _check_scheduler_deps(echo) -> None:
    """Prefect 3.8's scheduler inserts runs in bulk through an ORM hybrid property that SQLAlchemy 2.1 refuses
    (``InvalidRequestError: Can't evaluate bulk DML statement``, in the server log only): every schedule would
    silently never fire. Say so where the operator looks."""
    from importlib.metadata import version

    v = version("sqlalchemy")
    if tuple(int(x) for x in v.split(".")[:2]) >= (2, 1):
        echo(f"WARNING: SQLAlchemy {v} breaks the embedded Prefect server's scheduler (no scheduled run is ever "
             "created; deployments still run on demand). Install sqlalchemy<2.1.")


def _openai_front(stack, ctx: LoopContext, triton, cfg: UpConfig, champion: Champion | None):
    """An OpenAI-compatible front over the served model when the task kind generates text (a causal LM): it calls
    the stable model name, so every later swap is invisible to its clients."""
    from kdops import kinds

    if cfg.openai_port < 0 or not kinds.get(cfg.kind).serving.generates:
        return None
    from serving.openai_front import FrontConfig, OpenAIFront

    tokenizer = str(Artifact.read(champion.artifact).path) if champion else ""  # counts prompt tokens in usage
    front = OpenAIFront(FrontConfig(triton.url, ctx.model, grpc_url=triton.grpc_url, tokenizer=tokenizer,
                                    port=cfg.openai_port))
    return stack.enter_context(front)


def _deploy_champion(ctx: LoopContext, triton, champion: Champion, echo) -> list[str]:
    """Serve the registry's champion on Triton unless the attached server already serves its weights."""
    from serving.swap import deploy, read_state

    art = Artifact.read(champion.artifact)
    history = read_state(ctx.repository, ctx.model)["history"]
    if ctx.triton_url and history and triton.cfg.url:
        try:
            if Artifact.read(history[-1]["artifact"]).weights_sha256 == art.weights_sha256:
                echo(f"Triton already serves v{champion.version} ({history[-1]['label']})")
                return list(art.label_names)
        except Exception:  # the served artifact is gone or unreadable: deploy again
            pass
    res = deploy(triton, ctx.model, art.path, ctx.repository, swap_config(ctx))
    echo(f"deployed champion v{champion.version} as {res.label} ({res.timings_s.get('total', 0):.1f} s)")
    return list(art.label_names)
