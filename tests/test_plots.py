"""kdops.plots: each figure builds, saves a real PNG, and the calibration numbers are right."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdops import plots

PNG = b"\x89PNG\r\n\x1a\n"


def test_learning_curves_split_losses_from_metrics(tmp_path):
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_accuracy": 0.5 + e / 10} for e in (1, 2, 3)]
    fig = plots.learning_curves(history, path=tmp_path / "curves.png")
    assert len(fig.axes) == 2
    assert [line.get_label() for line in fig.axes[0].lines] == ["train_loss", "val_loss"]
    assert list(fig.axes[1].lines[0].get_xdata()) == [1, 2, 3]
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG
    assert len(plots.learning_curves([{"loss": 1.0}, {"loss": 0.5}]).axes) == 1
    with pytest.raises(ValueError):
        plots.learning_curves([])


def test_domain_accuracy_bars_skip_missing_models_and_domains(tmp_path):
    student = {"overall": {"accuracy": 0.8}, "per_domain": {"movie": {"accuracy": 0.85}, "tweets": {"accuracy": 0.6}}}
    teacher = {"overall": {"accuracy": 0.9}, "per_domain": {"movie": {"accuracy": 0.92}}}
    fig = plots.domain_accuracy({"student": student, "teacher": teacher, "champion": None}, path=tmp_path / "d.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["movie", "tweets", "overall"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["student", "teacher"]
    heights = [p.get_height() for p in ax.patches]
    assert heights[:3] == pytest.approx([0.85, 0.6, 0.8]) and math.isnan(heights[4])  # teacher has no tweets
    assert (tmp_path / "d.png").read_bytes()[:8] == PNG


def test_calibration_bins_and_reliability_diagram(tmp_path):
    # Perfectly calibrated by construction: in the 0.9 bin 9 of 10 are right, in the 0.6 bin 6 of 10.
    probs = np.array([[0.1, 0.9]] * 10 + [[0.6, 0.4]] * 10)
    labels = np.array([1] * 9 + [0] + [0] * 6 + [1] * 4)
    b = plots.calibration_bins(probs, labels, n_bins=10)
    assert b["ece"] == pytest.approx(0.0, abs=1e-9) and b["count"].sum() == 20
    overconfident = plots.calibration_bins(np.full(10, 0.95), np.array([1] * 5 + [0] * 5))
    assert overconfident["ece"] == pytest.approx(0.45)  # binary (N,) input: confidence 0.95, accuracy 0.5
    fig = plots.reliability_diagram(probs, labels, path=tmp_path / "rel.png")
    assert "ECE 0.000" in fig.axes[0].get_title()
    assert (tmp_path / "rel.png").read_bytes()[:8] == PNG
    with pytest.raises(ValueError):
        plots.calibration_bins(probs, labels[:3])


def test_no_pyplot_state_is_touched():
    import sys

    plots.learning_curves([{"loss": 1.0}])
    assert "matplotlib.pyplot" not in sys.modules or not sys.modules["matplotlib.pyplot"].get_fignums()
