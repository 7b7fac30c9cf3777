"""What a check run leaves behind: an Evidently HTML report, a row of drift history, a dashboard.

The report is for people: it shows Evidently's own drift views (descriptor distributions, the text domain
classifier's typical words, embedding drift) next to kdops' test table. The verdict does not read it: it
comes from ``monitoring.checks`` (exact p-values at the Bonferroni level), so the two may disagree on a
borderline column, and the report says which numbers decided.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from monitoring.checks import ReferenceProfile, text_descriptors
from monitoring.config import MonitorConfig
from monitoring.stats import TestResult
from monitoring.verdict import Verdict


def _frame(texts: Sequence[str], descriptors: pd.DataFrame, probabilities, embeddings,
           label_names: Sequence[str] | None, pca) -> pd.DataFrame:
    df = pd.DataFrame({"text": list(texts)})
    df = pd.concat([df, descriptors.reset_index(drop=True)], axis=1)
    if probabilities is not None:
        p = np.asarray(probabilities, float)
        names = list(label_names) if label_names else [str(i) for i in range(p.shape[1])]
        df["predicted_label"] = [names[i] for i in p.argmax(1)]
        df["confidence"] = p.max(1)
    if embeddings is not None and pca is not None:
        z = pca.transform(np.asarray(embeddings, float))
        for j in range(z.shape[1]):
            df[f"emb_{j}"] = z[:, j]
    return df


def write_report(ref: ReferenceProfile, current: pd.DataFrame, results: Sequence[TestResult], decision: Verdict,
                 config: MonitorConfig, path: str | Path, max_rows: int = 2000,
                 embedding_view: bool = False) -> Path:
    """Run an Evidently Report (reference vs current) and save it as HTML; returns the path.

    Both sides are subsampled to ``max_rows``: a report for a person does not need every row. Text and
    embedding drift are shown with Evidently's absolute ROC-AUC thresholds (0.55): its percentile variant
    simulates 1,000 random classifiers (6 s for 2,500 rows, measured) to say less than our exact test does.
    Embeddings appear as drift of their first 8 principal components; Evidently's ``EmbeddingsDrift`` view
    (``embedding_view=True``) renders a t-SNE of every row, 51 s for 2,500 rows on this CPU (measured).
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift, ValueDrift
    from evidently.metrics.embeddings import ModelDriftMethod
    from evidently.presets import DataDriftPreset
    from sklearn.decomposition import PCA

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    ri = np.sort(rng.choice(len(ref.texts), min(max_rows, len(ref.texts)), replace=False))
    ci = np.sort(rng.choice(len(current), min(max_rows, len(current)), replace=False))
    cur = current.iloc[ci].reset_index(drop=True)
    has_probs = ref.probabilities is not None and "probabilities" in cur.columns
    has_emb = ref.embeddings is not None and "embedding" in cur.columns
    pca = None
    if has_emb:
        k = min(8, ref.embeddings.shape[1], len(ri) - 1)  # 8 components: enough to see, few enough to render
        pca = PCA(n_components=k, random_state=config.seed).fit(ref.embeddings[ri])
    r_df = _frame([ref.texts[i] for i in ri], ref.descriptors.iloc[ri],
                  ref.probabilities[ri] if has_probs else None, ref.embeddings[ri] if has_emb else None,
                  ref.label_names, pca)
    c_df = _frame(cur["text"].tolist(), text_descriptors(cur["text"], ref.doc_freq),
                  np.stack(cur["probabilities"].map(np.asarray)) if has_probs else None,
                  np.stack(cur["embedding"].map(np.asarray)) if has_emb else None, ref.label_names, pca)
    numeric = list(config.text.descriptors) + (["confidence"] if has_probs else [])
    emb_cols = [c for c in r_df.columns if c.startswith("emb_")]
    definition = DataDefinition(
        text_columns=["text"], numerical_columns=numeric + emb_cols,
        categorical_columns=["predicted_label"] if has_probs else [],
        embeddings={"embedding": emb_cols} if emb_cols else None,
    )
    # The per-column tests use kdops' level (Bonferroni alpha) so Evidently's table matches the verdict's bar.
    metrics = [
        DataDriftPreset(columns=numeric + emb_cols + (["predicted_label"] if has_probs else []), num_method="ks",
                        cat_method="chisquare", threshold=config.alpha),
        ValueDrift(column="text", method="abs_text_content_drift"),
    ]
    if emb_cols and embedding_view:
        metrics.append(EmbeddingsDrift(embeddings_name="embedding", drift_method=ModelDriftMethod(bootstrap=False)))
    meta = {"kdops_verdict": decision.decision, "kdops_reasons": ", ".join(decision.reasons) or "none",
            "kdops_tests": json.dumps([r.as_dict() for r in results])}
    report = Report(metrics, metadata=meta)
    snapshot = report.run(Dataset.from_pandas(c_df, definition), Dataset.from_pandas(r_df, definition))
    snapshot.save_html(str(path))
    return path


def append_history(path: str | Path, results: Sequence[TestResult], decision: Verdict, action: str,
                   report_path: str | Path | None = None, window_id: str | None = None,
                   timestamp: datetime | None = None, estimated_acc: float | None = None) -> dict:
    """Append one window's row to a JSONL drift history; returns the row. ``estimated_acc``: the student's label-free
    estimated accuracy on the window (``monitoring.checks.estimated_accuracy``), when a teacher labelled it."""
    ts = timestamp or datetime.now(timezone.utc)
    row = {
        "timestamp": ts.isoformat(), "window_id": window_id, "decision": decision.decision, "action": action,
        "reasons": list(decision.reasons), "report": str(report_path) if report_path else None,
        "tests": {r.name: {"statistic": r.statistic, "p_value": r.p_value, "alpha": r.alpha, "fired": r.fired}
                  for r in results},
        "estimated_acc": estimated_acc,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, allow_nan=True) + "\n")
    return row


def read_history(path: str | Path) -> pd.DataFrame:
    """The history as a long table: timestamp, window_id, decision, action, test, statistic, p_value, alpha, fired."""
    rows = []
    path = Path(path)
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                h = json.loads(line)
                for name, t in h["tests"].items():
                    rows.append({"timestamp": h["timestamp"], "window_id": h["window_id"], "decision": h["decision"],
                                 "action": h["action"], "test": name, **t})
    cols = ["timestamp", "window_id", "decision", "action", "test", "statistic", "p_value", "alpha", "fired"]
    df = pd.DataFrame(rows, columns=cols)
    df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True)
    return df


def render_dashboard(history_path: str | Path, out_path: str | Path) -> Path:
    """A PNG of -log10(p) per test over windows, with the alarm level and the actions taken."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    df = read_history(history_path)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(10, 4.5))
    ax = fig.add_subplot()
    if df.empty:
        ax.text(0.5, 0.5, "no windows yet", ha="center")
    else:
        order = {ts: i for i, ts in enumerate(sorted(df["timestamp"].unique()))}
        df["window"] = df["timestamp"].map(order)
        for name, g in df.groupby("test"):
            ax.plot(g["window"], -np.log10(g["p_value"].clip(lower=1e-30)), marker="o", ms=3, label=name)
        ax.axhline(-np.log10(df["alpha"].iloc[0]), color="k", ls="--", lw=1, label="alarm level (Bonferroni)")
        acts = df.drop_duplicates("window")
        for _, r in acts[acts["action"] != "ok"].iterrows():
            ax.axvline(r["window"], color="r" if r["action"] == "retrain" else "orange", alpha=0.4)
        ax.set_xlabel("window")
        ax.set_ylabel("-log10 p  (capped at 30)")
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    ax.set_title("kdops drift: test p-values per window (red: retrain, orange: review)")
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    return out_path
