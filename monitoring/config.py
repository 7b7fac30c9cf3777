"""Checks declared as data: what to test, on how much, at which false-alarm budget.

Like Evidently's split between a metric (the declaration) and its calculation, nothing here computes:
``monitoring.checks`` reads these dataclasses and ``monitoring.verdict`` turns results into a verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# Names of the statistical tests one window runs; the false-alarm budget is split across all of them.
DESCRIPTORS = ("text_length", "word_count", "non_letter_share", "oov_share")


@dataclass(frozen=True)
class TextDriftCheck:
    """Drift of the raw text: descriptor distributions (KS) and a domain classifier on TF-IDF."""

    descriptors: tuple[str, ...] = field(
        default=DESCRIPTORS, metadata={"help": f"Text descriptors whose distributions are compared; any of {DESCRIPTORS}."}
    )
    domain_classifier: bool = field(
        default=True, metadata={"help": "Also run a TF-IDF domain classifier (reference vs current) and test its held-out ROC-AUC."}
    )
    max_features: int = field(default=20_000, metadata={"help": "Vocabulary size of the domain classifier's TF-IDF."})

    def __post_init__(self) -> None:
        unknown = set(self.descriptors) - set(DESCRIPTORS)
        if unknown:
            raise ValueError(f"unknown descriptors {sorted(unknown)}; choose from {DESCRIPTORS}.")
        if self.max_features < 100:
            raise ValueError("max_features must be at least 100.")

    @property
    def n_tests(self) -> int:
        return len(self.descriptors) + int(self.domain_classifier)


@dataclass(frozen=True)
class EmbeddingDriftCheck:
    """Drift of the student's sentence embeddings: a classifier two-sample test on (PCA-reduced) vectors."""

    enabled: bool = field(default=True, metadata={"help": "Run the check when both sides carry embeddings."})
    pca_components: int = field(
        default=32, metadata={"help": "Reduce embeddings to this many principal components (fit on the reference) first."}
    )

    def __post_init__(self) -> None:
        if self.pca_components < 1:
            raise ValueError("pca_components must be >= 1.")

    @property
    def n_tests(self) -> int:
        return int(self.enabled)


@dataclass(frozen=True)
class PredictionDriftCheck:
    """Drift of what the student answers: predicted-label mix (chi-square) and confidence (KS)."""

    enabled: bool = field(default=True, metadata={"help": "Run the check when both sides carry probabilities."})

    @property
    def n_tests(self) -> int:
        return 2 * int(self.enabled)


@dataclass(frozen=True)
class DisagreementCheck:
    """Label-free quality estimate: the teacher re-labels a small sample of live traffic."""

    sample_share: float = field(default=0.05, metadata={"help": "Share of the window sent to the teacher (0..1]."})
    min_sample: int = field(default=50, metadata={"help": "Send at least this many texts (or the whole window)."})
    max_sample: int = field(default=500, metadata={"help": "Send at most this many texts: the teacher is expensive."})
    baseline_rate: float = field(
        default=0.10,
        metadata={"help": "Disagreement rate accepted as normal (measured on the distillation data at promotion)."},
    )
    tolerance: float = field(
        default=0.05, metadata={"help": "Extra disagreement tolerated above the baseline before the test may fire."}
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.sample_share <= 1.0:
            raise ValueError("sample_share must be in (0, 1].")
        if not 0 < self.min_sample <= self.max_sample:
            raise ValueError("need 0 < min_sample <= max_sample.")
        if not 0.0 <= self.baseline_rate < 1.0 or not 0.0 <= self.baseline_rate + self.tolerance < 1.0:
            raise ValueError("baseline_rate and baseline_rate + tolerance must be in [0, 1).")

    def sample_size(self, n: int) -> int:
        return min(n, max(self.min_sample, min(self.max_sample, round(self.sample_share * n))))


@dataclass(frozen=True)
class MonitorConfig:
    """One window's checks and the false-alarm budget they share."""

    window_size: int = field(default=500, metadata={"help": "Served requests per monitoring window."})
    max_reference: int = field(
        default=10_000, metadata={"help": "Reference rows kept (seeded subsample); caps the cost of every check."}
    )
    false_alarm_budget: float = field(
        default=0.01,
        metadata={"help": "Probability that a window with no drift raises any alarm; split evenly (Bonferroni)."},
    )
    text: TextDriftCheck = field(default_factory=TextDriftCheck, metadata={"help": "Raw-text drift check."})
    embedding: EmbeddingDriftCheck = field(default_factory=EmbeddingDriftCheck, metadata={"help": "Embedding drift."})
    prediction: PredictionDriftCheck = field(default_factory=PredictionDriftCheck, metadata={"help": "Prediction drift."})
    disagreement: DisagreementCheck = field(
        default_factory=DisagreementCheck, metadata={"help": "Teacher-student disagreement on sampled traffic."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for subsampling and the classifiers' train/test split."})

    def __post_init__(self) -> None:
        if self.window_size < 20:
            raise ValueError("window_size must be at least 20.")
        if self.max_reference < 40:
            raise ValueError("max_reference must be at least 40.")
        if not 0.0 < self.false_alarm_budget < 0.5:
            raise ValueError("false_alarm_budget must be in (0, 0.5).")

    @property
    def n_tests(self) -> int:
        # Counted whether or not a window has the inputs for every test: a fixed split keeps alpha comparable
        # across windows, and skipping a test only makes the family more conservative.
        return self.text.n_tests + self.embedding.n_tests + self.prediction.n_tests + 1

    @property
    def alpha(self) -> float:
        """Per-test significance level: Bonferroni keeps P(any false alarm | no drift) <= false_alarm_budget."""
        return self.false_alarm_budget / self.n_tests


@dataclass(frozen=True)
class TriggerConfig:
    """Hysteresis and cool-down between a window's verdict and an action (retrain / open a review)."""

    k: int = field(default=2, metadata={"help": "Act when at least k of the last n windows were not ok."})
    n: int = field(default=3, metadata={"help": "Length of the window history the k-of-n rule looks at."})
    cooldown: int = field(
        default=6, metadata={"help": "Windows after an action during which no new action starts (a retrain is running)."}
    )

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.n:
            raise ValueError("need 1 <= k <= n.")
        if self.cooldown < 0:
            raise ValueError("cooldown must be >= 0.")


def calibrated_config(baseline_rate: float | None, base: MonitorConfig | None = None) -> MonitorConfig:
    """The monitor config for one champion: its disagreement baseline is the champion's own disagreement with the
    teacher on its training texts (a fixed baseline would be wrong for most students), and the teacher re-labels
    the whole window, up to 5,000 texts (a 5 % sample, or 500 texts of a long window, cannot reach the split alpha
    for a shift of a few points). Without a baseline (a kind with no teacher labels to disagree with) the checks
    stay as they are."""
    base = base or MonitorConfig()
    if baseline_rate is None:
        return base
    check = DisagreementCheck(sample_share=1.0, max_sample=5000, baseline_rate=min(0.5, baseline_rate), tolerance=0.03)
    return replace(base, disagreement=check)
