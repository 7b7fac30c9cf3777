"""Computation of the declared checks for one window of served traffic.

Reference = what the serving champion was distilled on (texts; optionally its predictions and embeddings),
profiled once by ``profile_reference``. Current = a window of served traffic, a DataFrame with ``text`` and
optionally ``probabilities`` (list per row), ``embedding`` (vector per row). ``run_checks`` returns one
``TestResult`` per test; the verdict is left to ``monitoring.verdict`` (a pure function of these).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kdops.paths import atomic_write
from monitoring import stats
from monitoring.config import MonitorConfig
from monitoring.stats import TestResult

_WORD = re.compile(r"[^\W\d_]+")

# A teacher for the disagreement check: texts -> (N, num_labels) scores (logits or probabilities),
# e.g. ``kdops.teacher.HFTeacher(...).logits``.
TeacherFn = Callable[[list[str]], np.ndarray]


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def text_descriptors(texts: Sequence[str], doc_freq: Counter | None = None, loo: bool = False) -> pd.DataFrame:
    """Evidently's text descriptors (length, word count, non-letter share) plus an OOV share.

    OOV is measured against the reference vocabulary (``doc_freq``: in how many reference texts a word
    occurs), not Evidently's ``OOVWordsPercentage``: that one needs NLTK's English word list, which cannot be
    downloaded here, and "words the champion never saw" is the drift that matters for a distilled student.
    ``loo=True`` scores reference texts leave-one-out (a word only in this text counts as unseen), so the
    reference and a current window from the same source have the same OOV distribution.
    """
    from evidently import DataDefinition, Dataset
    from evidently.core.datasets import DatasetColumn
    from evidently.descriptors import CustomColumnDescriptor, NonLetterCharacterPercentage, TextLength, WordCount

    df = pd.DataFrame({"text": list(texts)})
    descriptors = [TextLength("text", alias="text_length"), WordCount("text", alias="word_count"),
                   NonLetterCharacterPercentage("text", alias="non_letter_share")]
    if doc_freq is not None:
        floor = 1 if loo else 0

        def oov_share(col: DatasetColumn) -> DatasetColumn:
            def share(t: str) -> float:
                w = _words(t)
                return 100.0 * sum(doc_freq.get(x, 0) <= floor for x in w) / len(w) if w else 0.0
            return DatasetColumn("num", col.data.map(share))

        descriptors.append(CustomColumnDescriptor("text", oov_share, alias="oov_share"))
    ds = Dataset.from_pandas(df, data_definition=DataDefinition(text_columns=["text"]), descriptors=descriptors)
    return ds.as_dataframe().drop(columns=["text"]).astype(float)


@dataclass
class ReferenceProfile:
    """Everything the checks need from the reference, computed once per champion."""

    texts: list[str]
    descriptors: pd.DataFrame  # (n, n_descriptors)
    doc_freq: Counter
    probabilities: np.ndarray | None  # (n, num_labels)
    embeddings: np.ndarray | None  # (n, dim)
    label_names: tuple[str, ...] | None = None

    # On disk: JSON, Parquet and an .npz read with allow_pickle=False. A profile is data, never code
    # (nothing in kdops is pickled).
    def save(self, directory: str | Path) -> Path:
        """Write the profile to ``directory`` (created): ``reference.parquet`` (texts + descriptors),
        ``arrays.npz`` (probabilities / embeddings), then ``profile.json`` last, so a directory with a
        ``profile.json`` always holds a complete profile. Flows pass this directory, not the profile:
        Prefect stores flow parameters in its API (512 KB limit)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if "text" in self.descriptors.columns:
            raise ValueError("a descriptor may not be named 'text'.")
        table = pd.concat([pd.DataFrame({"text": self.texts}), self.descriptors.reset_index(drop=True)], axis=1)
        table.to_parquet(directory / "reference.parquet", index=False)
        arrays = {k: np.asarray(v) for k, v in (("probabilities", self.probabilities), ("embeddings", self.embeddings))
                  if v is not None}
        np.savez(directory / "arrays.npz", **arrays)
        meta = {"format": 1, "rows": len(self.texts), "descriptors": list(self.descriptors.columns),
                "label_names": list(self.label_names) if self.label_names is not None else None,
                "doc_freq": dict(self.doc_freq)}
        atomic_write(directory / "profile.json", json.dumps(meta, ensure_ascii=False))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "ReferenceProfile":
        """Read a profile written by ``save``; raises FileNotFoundError when ``directory`` holds none."""
        directory = Path(directory)
        meta = json.loads((directory / "profile.json").read_text())
        if meta.get("format") != 1:
            raise ValueError(f"{directory}: unknown reference profile format {meta.get('format')!r}.")
        table = pd.read_parquet(directory / "reference.parquet")
        if len(table) != meta["rows"]:
            raise ValueError(f"{directory}: {len(table)} reference rows, profile.json says {meta['rows']}.")
        with np.load(directory / "arrays.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        return cls(texts=table["text"].tolist(), descriptors=table[meta["descriptors"]].astype(float),
                   doc_freq=Counter(meta["doc_freq"]), probabilities=arrays.get("probabilities"),
                   embeddings=arrays.get("embeddings"),
                   label_names=tuple(meta["label_names"]) if meta["label_names"] is not None else None)


def profile_reference(texts: Sequence[str], config: MonitorConfig, probabilities=None, embeddings=None,
                      label_names: Sequence[str] | None = None) -> ReferenceProfile:
    """Subsample the reference to ``config.max_reference`` rows (seeded) and precompute its descriptors."""
    texts = list(texts)
    idx = np.arange(len(texts))
    if len(texts) > config.max_reference:
        idx = np.sort(np.random.default_rng(config.seed).choice(len(texts), config.max_reference, replace=False))
    texts = [texts[i] for i in idx]
    doc_freq = Counter(w for t in texts for w in set(_words(t)))
    return ReferenceProfile(
        texts=texts,
        descriptors=text_descriptors(texts, doc_freq, loo=True),
        doc_freq=doc_freq,
        probabilities=None if probabilities is None else np.asarray(probabilities, float)[idx],
        embeddings=None if embeddings is None else np.asarray(embeddings, np.float32)[idx],
        label_names=tuple(label_names) if label_names is not None else None,
    )


def _column_matrix(current: pd.DataFrame, column: str) -> np.ndarray | None:
    if column not in current.columns or current[column].isna().any():
        return None
    return np.stack([np.asarray(v, float) for v in current[column]])


def text_tests(ref: ReferenceProfile, current: pd.DataFrame, config: MonitorConfig,
               cur_descriptors: pd.DataFrame | None = None) -> list[TestResult]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    a, cfg = config.alpha, config.text
    cur_d = cur_descriptors if cur_descriptors is not None else text_descriptors(current["text"], ref.doc_freq)
    out = [stats.ks(f"text.{d}", ref.descriptors[d].to_numpy(), cur_d[d].to_numpy(), a, "text")
           for d in cfg.descriptors]
    if cfg.domain_classifier:
        # Fit the vocabulary on both sides: it never sees which side a row is from, so the held-out test stays valid.
        vec = TfidfVectorizer(sublinear_tf=True, min_df=2, max_features=cfg.max_features, ngram_range=(1, 2))
        X = vec.fit_transform(ref.texts + current["text"].tolist())
        n = len(ref.texts)
        out.append(stats.classifier_two_sample("text.domain_classifier", X[:n], X[n:], a, "text", config.seed))
    return out


def embedding_tests(ref: ReferenceProfile, current: pd.DataFrame, config: MonitorConfig) -> list[TestResult]:
    cur = _column_matrix(current, "embedding")
    if not config.embedding.enabled or ref.embeddings is None or cur is None:
        return []
    from sklearn.decomposition import PCA

    k = min(config.embedding.pca_components, ref.embeddings.shape[1], len(ref.embeddings) - 1)
    pca = PCA(n_components=k, random_state=config.seed).fit(ref.embeddings)
    r, c = pca.transform(ref.embeddings), pca.transform(cur)
    scale = r.std(0) + 1e-8  # standardise so the linear classifier's regularisation treats components alike
    return [stats.classifier_two_sample("embedding.classifier", r / scale, c / scale, config.alpha, "embedding",
                                        config.seed)]


def prediction_tests(ref: ReferenceProfile, current: pd.DataFrame, config: MonitorConfig) -> list[TestResult]:
    cur = _column_matrix(current, "probabilities")
    if not config.prediction.enabled or ref.probabilities is None or cur is None:
        return []
    a, k = config.alpha, ref.probabilities.shape[1]
    return [
        stats.label_mix("prediction.label_mix", ref.probabilities.argmax(1), cur.argmax(1), k, a, "prediction"),
        stats.ks("prediction.confidence", ref.probabilities.max(1), cur.max(1), a, "prediction"),
    ]


def teacher_probabilities(scores: np.ndarray) -> np.ndarray:
    """A teacher's answers as probabilities: rows that already sum to 1 stay, logits get a softmax."""
    s = np.asarray(scores, np.float64)
    if (s >= 0).all() and np.allclose(s.sum(1), 1.0, atol=1e-3):
        return s
    z = np.exp(s - s.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def estimated_accuracy(student: np.ndarray, teacher: np.ndarray) -> float:
    """The student's accuracy without labels: the mean probability the teacher gives the label the student served.
    Exact if the teacher is calibrated (its probabilities are the labels' frequencies); a confident teacher makes it
    the agreement rate, a hesitant one discounts agreement where the teacher itself is unsure."""
    if not len(student):
        return float("nan")
    picked = np.asarray(student).argmax(1)
    return float(np.asarray(teacher)[np.arange(len(picked)), picked].mean())


def teacher_view(current: pd.DataFrame, config: MonitorConfig, teacher: TeacherFn | None,
                 sample: dict | None = None) -> tuple[list[TestResult], float | None]:
    """The teacher re-labels a seeded sample of the window: the disagreement test against what the student served,
    and the student's label-free estimated accuracy on it (None without a teacher). ``sample``, when given, receives
    the sampled rows (``index``) and the teacher's probabilities on them (``teacher``)."""
    cur = _column_matrix(current, "probabilities")
    if teacher is None or cur is None:
        return [], None
    cfg = config.disagreement
    idx = np.random.default_rng(config.seed).choice(len(current), cfg.sample_size(len(current)), replace=False)
    texts = current["text"].iloc[idx].tolist()
    t_probs = teacher_probabilities(teacher(texts))
    if sample is not None:
        sample.update(index=idx, teacher=t_probs)
    test = stats.disagreement("disagreement.teacher_student", t_probs.argmax(1) != cur[idx].argmax(1),
                              cfg.baseline_rate, cfg.tolerance, config.alpha)
    return [test], estimated_accuracy(cur[idx], t_probs)


def disagreement_test(current: pd.DataFrame, config: MonitorConfig, teacher: TeacherFn | None) -> list[TestResult]:
    """The teacher re-labels a seeded sample of the window; compared with what the student served."""
    return teacher_view(current, config, teacher)[0]


def check_window(ref: ReferenceProfile, current: pd.DataFrame, config: MonitorConfig,
                 teacher: TeacherFn | None = None, sample: dict | None = None) -> tuple[list[TestResult], float | None]:
    """All declared tests on one window, and the student's label-free estimated accuracy (None without a teacher).
    Tests whose inputs are missing are skipped (never counted as ok-by-fiat: the Bonferroni split still reserves
    their share of the budget)."""
    if "text" not in current.columns or len(current) == 0:
        raise ValueError("the current window needs a non-empty 'text' column.")
    disagreement, estimate = teacher_view(current, config, teacher, sample)
    tests = text_tests(ref, current, config) + embedding_tests(ref, current, config) + prediction_tests(ref, current, config)
    return tests + disagreement, estimate


def run_checks(ref: ReferenceProfile, current: pd.DataFrame, config: MonitorConfig,
               teacher: TeacherFn | None = None) -> list[TestResult]:
    """All declared tests on one window (``check_window`` without the estimate)."""
    return check_window(ref, current, config, teacher)[0]
