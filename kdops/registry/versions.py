"""Registered student versions: registration with lineage, reading them back, downloads and loading.

Student artifacts are logged as plain files (safetensors + JSON + tokenizer); no mlflow flavour, no pickle.
``download`` gives the directory back; ``load`` goes through ``kdops.kinds``. Aliases and the ledger are
``kdops.registry.models``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from dataclasses import replace
from pathlib import Path

from kdops.registry.store import OnStore, RegistryError
from kdops.registry.store import actor as acting

CHAMPION, CHALLENGER = "champion", "challenger"
DEFAULT_MODEL = "kdops-student"
LINEAGE_PREFIX = "kdops.lineage."
SHA_TAG, PATH_TAG, STATE_TAG, KIND_TAG = "kdops.weights_sha256", "kdops.artifact_path", "kdops.state", "kdops.kind"

RUNTIME_TAG, INT8_TAG = "kdops.serving_runtime", "kdops.int8_gate"


def serving_tags(art) -> dict[str, str]:
    """What the version is served as on this machine's CPU (``onnx-int8``, ``onnx-fp32`` or ``torch``) and its INT8
    gate per CPU family: the registry's record of which artifact file serves."""
    from kdops.onnx_predict import choose_graph, onnx_meta

    choice = choose_graph(art)
    tags = {RUNTIME_TAG: choice.runtime if choice else "torch"}
    gates = onnx_meta(art).get("int8_gate")
    if gates:
        tags[INT8_TAG] = json.dumps({f: {k: g[k] for k in ("passed", "agreement", "max_drop_points", "reason")}
                                     for f, g in gates.items()})
    return tags


def decode_lineage(tags: dict[str, str]) -> dict:
    """Lineage tags as ``kdops.artifacts.Lineage`` fields; older vocabularies are migrated on read."""
    from kdops.artifacts import Lineage

    raw = {}
    for k, v in tags.items():
        if k.startswith(LINEAGE_PREFIX):
            try:
                raw[k[len(LINEAGE_PREFIX):]] = json.loads(v)
            except json.JSONDecodeError:
                raw[k[len(LINEAGE_PREFIX):]] = v
    try:
        return Lineage.from_dict(raw).to_dict()
    except (TypeError, ValueError):  # a hand-made tag outside any schema: shown as it is
        return raw


class Versions(OnStore):
    """The registered versions of one MLflow store. Construction touches nothing."""

    # -- registration --------------------------------------------------------------------------

    def register(self, student_dir: str | Path, run_id: str, name: str = DEFAULT_MODEL,
                 lineage: dict | None = None) -> int:
        """Log the artifact directory to ``run_id`` and create a model version tagged with its lineage.

        Idempotent: the same weights registered again for the same run return the existing version. The
        lineage is the artifact's (``kdops.artifacts.Lineage``) updated by ``lineage``; an unset
        ``parent_version`` becomes the champion now, an unset ``code_version`` this checkout's commit.
        """
        from kdops.artifacts import WEIGHTS, Lineage, code_version, file_sha256, read_artifact
        from kdops.registry.tracking import RunLog

        student_dir = Path(student_dir)
        art = read_artifact(student_dir)
        sha = art.weights_sha256 or file_sha256(student_dir / WEIGHTS)
        artifact_path = f"students/{sha[:16]}"  # content-addressed: a re-run overwrites identical files
        existing = self._find_version(name, run_id, sha)
        if existing is not None:
            return existing
        RunLog(self.store, run_id).log_artifact(student_dir, artifact_path)
        source = f"{self.client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
        with self.store.locked():
            existing = self._find_version(name, run_id, sha)
            if existing is not None:
                return existing
            self._ensure_model(name)
            given = {k: v for k, v in Lineage.from_dict(lineage).to_dict().items() if v not in (None, "", {}, [])}
            details = {**art.lineage.details, **given.pop("details", {})}
            lin = replace(art.lineage, **given, details=details)
            if lin.parent_version is None:
                lin = replace(lin, parent_version=self.champion(name))
            lin = replace(lin, code_version=lin.code_version or code_version())
            tags = {f"{LINEAGE_PREFIX}{k}": v if isinstance(v, str) else json.dumps(v, default=str)
                    for k, v in lin.to_dict().items() if v not in (None, "", {}, [])}
            tags.update({SHA_TAG: sha, PATH_TAG: artifact_path, KIND_TAG: art.kind.value,
                         "kdops.registered_by": acting(), **serving_tags(art)})
            mv = self.store.retry(lambda: self.client.create_model_version(
                name, source, run_id=run_id, tags=tags, description=f"{art.kind.value} student {sha[:12]}"))
        version = int(mv.version)
        # Without a shared lock (remote server) two flows can both pass the check above; both then
        # see the duplicates, agree that the lowest version wins, and delete their own extra one.
        dupes = sorted(int(v.version) for v in self._versions_for(name, run_id) if v.tags.get(SHA_TAG) == sha)
        if dupes and dupes[0] != version:
            self.store.retry(lambda: self.client.delete_model_version(name, str(version)))
            return dupes[0]
        return version

    def _ensure_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.store.retry(lambda: self.client.create_registered_model(name))
        except MlflowException as e:
            if "already exists" not in str(e).lower():
                raise

    def _versions_for(self, name: str, run_id: str) -> list:
        from mlflow.exceptions import MlflowException

        try:
            return self.store.retry(lambda: self.client.search_model_versions(
                f"name = '{name}' and run_id = '{run_id}'"))
        except MlflowException as e:
            if "not found" in str(e).lower() or "RESOURCE_DOES_NOT_EXIST" in str(e):
                return []
            raise

    def _find_version(self, name: str, run_id: str, sha: str) -> int | None:
        found = [int(v.version) for v in self._versions_for(name, run_id) if v.tags.get(SHA_TAG) == sha]
        return min(found) if found else None

    # -- reading versions ----------------------------------------------------------------------

    def model_version(self, name: str, version_or_alias: int | str):
        """The MLflow ModelVersion for a number (``3``, ``"3"``) or an alias (``"champion"``)."""
        from mlflow.exceptions import MlflowException

        try:
            if str(version_or_alias).isdigit():
                return self.client.get_model_version(name, str(version_or_alias))
            return self.client.get_model_version_by_alias(name, str(version_or_alias))
        except MlflowException as e:
            raise RegistryError(f"{name}: no version or alias {version_or_alias!r} ({e.message}).") from e

    def lineage(self, name: str, version_or_alias: int | str) -> dict:
        """The lineage of a version as ``kdops.artifacts.Lineage`` fields."""
        return decode_lineage(self.model_version(name, version_or_alias).tags)

    def versions(self, name: str = DEFAULT_MODEL) -> list[dict]:
        """All versions, oldest first: number, aliases, run, weights sha, kind, state, lineage."""
        from mlflow.exceptions import MlflowException

        try:  # search results do not carry aliases; the registered model does
            aliases = self.store.retry(lambda: self.client.get_registered_model(name)).aliases
        except MlflowException:
            return []
        rows = [{"version": int(mv.version), "run_id": mv.run_id,
                 "aliases": sorted(a for a, v in aliases.items() if str(v) == str(mv.version)),
                 "created": mv.creation_timestamp, "weights_sha256": mv.tags.get(SHA_TAG, ""),
                 "kind": mv.tags.get(KIND_TAG, ""), "state": mv.tags.get(STATE_TAG, ""),
                 "serving_runtime": mv.tags.get(RUNTIME_TAG, "torch"), "lineage": decode_lineage(mv.tags)}
                for mv in self.store.retry(lambda: self.client.search_model_versions(f"name = '{name}'"))]
        return sorted(rows, key=lambda r: r["version"])

    def download(self, name: str, version_or_alias: int | str, dst: str | Path | None = None) -> Path:
        """The artifact directory of a version (default ``Home.downloads``; reused while its weights match)."""
        from kdops.artifacts import ArtifactError, read_artifact

        mv = self.model_version(name, version_or_alias)
        sha, path = mv.tags.get(SHA_TAG, ""), mv.tags.get(PATH_TAG)
        if not path:
            raise RegistryError(f"{name} v{mv.version} was not registered by kdops (no {PATH_TAG} tag).")
        if dst is None:
            from kdops.paths import Home

            dst = Home.from_env().downloads(name, int(mv.version))
        dst = Path(dst)
        if dst.is_dir():
            with contextlib.suppress(ArtifactError):
                if read_artifact(dst).weights_sha256 == sha:
                    return dst
            shutil.rmtree(dst)
        tmp = dst.with_name(f"{dst.name}.partial-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        try:
            got = Path(self.store.retry(lambda: self.client.download_artifacts(mv.run_id, path, str(tmp))))
            if read_artifact(got).weights_sha256 != sha:
                raise ArtifactError(f"{name} v{mv.version}: downloaded weights do not match the registered sha.")
            with contextlib.suppress(OSError):  # another process may have finished the same download
                got.rename(dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dst

    def load(self, name: str, version_or_alias: int | str, device: str = "cpu"):
        """``(model, tokenizer, artifact)`` of a version, whatever its kind."""
        from kdops import kinds

        return kinds.load(self.download(name, version_or_alias), device=device)

    # -- aliases (read) ---------------------------------------------------------------------------

    def get_version_by_alias(self, name: str, alias: str) -> int | None:
        from mlflow.exceptions import MlflowException

        try:
            return int(self.client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            return None

    def champion(self, name: str = DEFAULT_MODEL) -> int | None:
        return self.get_version_by_alias(name, CHAMPION)

    def challenger(self, name: str = DEFAULT_MODEL) -> int | None:
        return self.get_version_by_alias(name, CHALLENGER)
