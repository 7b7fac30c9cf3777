"""The task kinds kdops distils, as a value light enough for the command line to import."""

from enum import Enum


class Kind(str, Enum):
    """The task kinds kdops distils. ``kdops.kinds`` maps each to its implementation."""

    CLASSIFIER = "classifier"
    CAUSAL_LM = "causal-lm"
