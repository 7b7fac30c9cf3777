"""The MLflow adapter, the only code in kdops that imports ``mlflow`` (STYLE 6), imported lazily inside methods.

- ``Tracking`` (``tracking.py``): runs, params, metrics, the evaluation report, figures, artifacts, input snapshots.
- ``Registry`` (``models.py`` on ``versions.py``): registered student versions with lineage, downloads, the
  ``champion`` / ``challenger`` aliases and the append-only promotion ledger (``ledger.py``);
  ``Registry.champion_info`` gives the typed ``Champion``.
- ``Store`` (``store.py``): where the store is (argument, ``$MLFLOW_TRACKING_URI``, or the embedded SQLite store
  under the kdops home), one ``MlflowClient`` for it, the cross-process lock and retries on transient errors.
  Pass one ``store=`` to a ``Tracking`` and a ``Registry`` to share a client.
- ``kdops registry ...`` is ``cli.py``.
"""

from kdops.registry.ledger import ACTIONS
from kdops.registry.models import Champion, Registry
from kdops.registry.store import RegistryConfig, RegistryError, Store, flatten, numeric_leaves
from kdops.registry.tracking import RunLog, Tracking
from kdops.registry.versions import CHALLENGER, CHAMPION, DEFAULT_MODEL

__all__ = ["ACTIONS", "CHALLENGER", "CHAMPION", "DEFAULT_MODEL", "Champion", "Registry", "RegistryConfig",
           "RegistryError", "RunLog", "Store", "Tracking", "flatten", "numeric_leaves"]
