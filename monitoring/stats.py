"""Two-sample tests that return honest p-values: the computations behind the declared checks.

Why not Evidently's own thresholds for the classifier tests: its ``perc_text_content_drift`` and the
embedding ``model`` method compare the held-out ROC-AUC with a percentile of 100-1,000 simulated random
classifiers. That cannot resolve the p ~ 1e-3 a Bonferroni split of a 1 % budget needs, and the simulation
costs seconds at 10k rows. Held-out ROC-AUC *is* the Mann-Whitney U statistic of the scores, so we test it
exactly with ``scipy.stats.mannwhitneyu`` (the C2ST of Lopez-Paz & Oquab, ICLR 2017).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class TestResult:
    """One statistical test on one window."""

    __test__ = False  # not a pytest test class, despite the name

    name: str = field(metadata={"help": "Test id, e.g. 'text.domain_classifier'."})
    statistic: float = field(metadata={"help": "Effect size: ROC-AUC, KS D, total-variation distance, rate."})
    p_value: float = field(metadata={"help": "P-value under 'no drift'; nan when the test could not run."})
    alpha: float = field(metadata={"help": "Significance level the test was judged at (after Bonferroni)."})
    group: str = field(metadata={"help": "text | embedding | prediction | disagreement."})
    n_reference: int = field(default=0, metadata={"help": "Reference rows used."})
    n_current: int = field(default=0, metadata={"help": "Current rows used."})

    @property
    def fired(self) -> bool:
        return bool(np.isfinite(self.p_value) and self.p_value < self.alpha)

    def as_dict(self) -> dict:
        return {"name": self.name, "statistic": float(self.statistic), "p_value": float(self.p_value),
                "alpha": self.alpha, "group": self.group, "fired": self.fired,
                "n_reference": self.n_reference, "n_current": self.n_current}


def ks(name: str, ref: np.ndarray, cur: np.ndarray, alpha: float, group: str) -> TestResult:
    """Two-sided Kolmogorov-Smirnov. Ties (integer lengths) make it conservative, never anti-conservative."""
    ref, cur = np.asarray(ref, float), np.asarray(cur, float)
    r = stats.ks_2samp(ref, cur, method="asymp")
    return TestResult(name, float(r.statistic), float(r.pvalue), alpha, group, len(ref), len(cur))


def label_mix(name: str, ref_labels: np.ndarray, cur_labels: np.ndarray, n_classes: int, alpha: float,
              group: str) -> TestResult:
    """Chi-square test of homogeneity on predicted-label counts; statistic = total-variation distance."""
    a = np.bincount(ref_labels, minlength=n_classes).astype(float)
    b = np.bincount(cur_labels, minlength=n_classes).astype(float)
    keep = (a + b) > 0
    tvd = 0.5 * float(np.abs(a / a.sum() - b / b.sum()).sum())
    if keep.sum() < 2:
        return TestResult(name, tvd, 1.0, alpha, group, int(a.sum()), int(b.sum()))
    p = stats.chi2_contingency(np.stack([a[keep], b[keep]]), correction=False).pvalue
    return TestResult(name, tvd, float(p), alpha, group, int(a.sum()), int(b.sum()))


def classifier_two_sample(name: str, x_ref, x_cur, alpha: float, group: str, seed: int = 0) -> TestResult:
    """C2ST: train a logistic regression to tell reference from current on half, score the other half.

    ``x_ref``/``x_cur``: (n, d) dense arrays or scipy sparse matrices. Statistic: held-out ROC-AUC
    (0.5 = indistinguishable). p-value: one-sided Mann-Whitney U of current vs reference held-out scores,
    valid because the classifier never saw the rows it scores.
    """
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression

    n_ref, n_cur = x_ref.shape[0], x_cur.shape[0]
    X = sparse.vstack([x_ref, x_cur]).tocsr() if sparse.issparse(x_ref) else np.vstack([x_ref, x_cur])
    y = np.r_[np.zeros(n_ref, int), np.ones(n_cur, int)]
    rng = np.random.default_rng(seed)
    # Stratified half split: each side contributes half its rows to training.
    train = np.zeros(len(y), bool)
    for cls in (0, 1):
        idx = np.flatnonzero(y == cls)
        train[rng.choice(idx, len(idx) // 2, replace=False)] = True
    # class_weight='balanced': a 10:1 reference/current ratio must not teach "always say reference".
    clf = LogisticRegression(C=1.0, max_iter=200, class_weight="balanced", solver="liblinear")
    clf.fit(X[train], y[train])
    s = clf.decision_function(X[~train])
    yt = y[~train]
    u = stats.mannwhitneyu(s[yt == 1], s[yt == 0], alternative="greater", method="asymptotic")
    auc = float(u.statistic) / ((yt == 1).sum() * (yt == 0).sum())
    return TestResult(name, auc, float(u.pvalue), alpha, group, n_ref, n_cur)


def disagreement(name: str, disagree: np.ndarray, baseline: float, tolerance: float, alpha: float) -> TestResult:
    """One-sided exact binomial test of 'disagreement rate > baseline + tolerance'; statistic = observed rate."""
    d = np.asarray(disagree, bool)
    if len(d) == 0:
        return TestResult(name, float("nan"), float("nan"), alpha, "disagreement")
    p = stats.binomtest(int(d.sum()), len(d), baseline + tolerance, alternative="greater").pvalue
    return TestResult(name, float(d.mean()), float(p), alpha, "disagreement", 0, len(d))
