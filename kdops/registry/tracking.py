"""Run tracking: what a training, evaluation or monitoring run records (params, metrics, the evaluation report,
figures, artifacts, input snapshots, tags). Model versions, aliases and the ledger are ``kdops.registry.models``."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Iterator

from kdops.registry.store import OnStore, Store, actor, flatten, numeric_leaves


class RunLog:
    """The handle ``Tracking.run`` yields: everything a run records, on its store's client."""

    def __init__(self, store: Store, run_id: str):
        self._store, self._run_id = store, run_id

    @property
    def run_id(self) -> str:
        return self._run_id

    def _batch(self, **kw) -> None:
        self._store.retry(lambda: self._store.client.log_batch(self._run_id, **kw))

    def log_params(self, params: dict) -> None:
        """Flatten nested configs (loss, schedule, student) to ``loss.alpha``-style params."""
        from mlflow.entities import Param

        items = [Param(k, (json.dumps(v) if isinstance(v, (list, tuple)) else str(v))[:6000])
                 for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self._batch(params=items[i:i + 100])

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Log the numeric leaves of ``metrics`` (nested allowed) at ``step`` (e.g. the epoch)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step or 0) for k, v in numeric_leaves(metrics).items()]
        for i in range(0, len(items), 1000):
            self._batch(metrics=items[i:i + 1000])

    def log_eval_report(self, report: dict, name: str = "eval_report", step: int | None = None) -> dict:
        """The evaluation report as ``<name>.json`` plus its numeric leaves as metrics; returns those metrics."""
        self._store.retry(lambda: self._store.client.log_dict(self._run_id, report, f"{name}.json"))
        flat = numeric_leaves(report)
        self.log_metrics(flat, step=step)
        return flat

    def log_figure(self, fig, name: str) -> str:
        path = name if name.endswith((".png", ".svg", ".pdf")) else f"figures/{name}.png"
        self._store.retry(lambda: self._store.client.log_figure(self._run_id, fig, path))
        return path

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        log = self._store.client.log_artifacts if path.is_dir() else self._store.client.log_artifact
        self._store.retry(lambda: log(self._run_id, str(path), artifact_path))

    def log_snapshot(self, snapshot, context: str = "train") -> None:
        """Record a data snapshot as a run input whose name and digest are the snapshot's content id."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        # Same as mlflow.log_input(dataset, context) but on this store's client, not the global run.
        ds = mlflow.data.from_pandas(snapshot.rows, name=snapshot.id, digest=snapshot.id,
                                     targets="label" if snapshot.rows["label"].notna().any() else None)
        inp = DatasetInput(dataset=ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        self._store.retry(lambda: self._store.client.log_inputs(self._run_id, datasets=[inp]))
        self.set_tags({f"kdops.snapshot.{context}": snapshot.id})

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self._store.retry(lambda k=k, v=v: self._store.client.set_tag(self._run_id, k, str(v)))


class Tracking(OnStore):
    """Runs in experiments: ``with Tracking(uri).run("distill-ab12") as run: run.log_metrics(...)``."""

    @contextlib.contextmanager
    def run(self, name: str, experiment: str = "kdops", tags: dict | None = None,
            run_id: str | None = None) -> Iterator[RunLog]:
        """A run that ends FINISHED, or FAILED if the block raises. ``run_id`` resumes an existing run
        (a flow re-run after a crash keeps logging into the same run)."""
        store = self.store
        if run_id is None:
            from kdops.artifacts import code_version

            all_tags = {"mlflow.source.git.commit": code_version(), "mlflow.user": actor(),
                        **{k: str(v) for k, v in (tags or {}).items()}}
            exp_id = store.experiment_id(experiment)
            run_id = store.retry(lambda: store.client.create_run(exp_id, run_name=name, tags=all_tags)).info.run_id
        else:
            store.retry(lambda: store.client.update_run(run_id, status="RUNNING"))
        try:
            yield RunLog(store, run_id)
        except BaseException:
            store.retry(lambda: store.client.set_terminated(run_id, "FAILED"))
            raise
        store.retry(lambda: store.client.set_terminated(run_id, "FINISHED"))

    def log(self, run_id: str) -> RunLog:
        """The handle of an existing run, to add to it outside a ``run`` block."""
        return RunLog(self.store, run_id)

    def get_run(self, run_id: str):
        return self.store.client.get_run(run_id)

    def run_tag(self, run_id: str, key: str) -> str | None:
        """One tag of a run (``kdops.snapshot.eval``, say), or None."""
        return self.get_run(run_id).data.tags.get(key)
