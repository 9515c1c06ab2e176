"""Calibration: Platt scaling recovers a known map, keeps the order, and ECE measures its error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from crossrank_train.calibration import (
    CalibrationError,
    LabelledLogits,
    expected_calibration_error,
    fit_platt,
    reliability_diagram,
)


def _drawn(slope: float, intercept: float, n: int = 20_000) -> LabelledLogits:
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, n)
    truth = 1.0 / (1.0 + np.exp(-(slope * logits + intercept)))
    return LabelledLogits(logits, (rng.random(n) < truth).astype(np.int64))


def test_platt_recovers_the_map_the_labels_were_drawn_from() -> None:
    data = _drawn(0.8, -2.0)
    calibration = fit_platt(data, "synthetic", "fp32")
    assert calibration.slope == pytest.approx(0.8, abs=0.05)
    assert calibration.intercept == pytest.approx(-2.0, abs=0.1)
    assert (calibration.pairs, calibration.positives) == (20_000, data.positives)
    calibrated = expected_calibration_error(calibration.probability(data.logits), data.labels)
    # The plain sigmoid of the logit is the uncalibrated map: far from the drawn one.
    plain = expected_calibration_error(1.0 / (1.0 + np.exp(-data.logits)), data.labels)
    assert calibrated < 0.01 < 0.1 < plain


def test_calibrated_probabilities_keep_the_logits_order() -> None:
    calibration = fit_platt(_drawn(1.5, 0.5), "synthetic", "fp32")
    logits = np.array([-40.0, -3.0, -0.001, 0.0, 0.001, 2.0, 60.0, 1e4], dtype=np.float32)
    probabilities = calibration.probability(logits)
    assert np.all(np.diff(probabilities) >= 0)
    assert np.all((probabilities >= 0) & (probabilities <= 1))
    # Distinct logits in the sigmoid's working range stay distinct.
    assert len(set(probabilities[1:6].tolist())) == 5


def test_a_separable_set_gives_a_finite_slope() -> None:
    logits = np.arange(20, dtype=np.float64)
    calibration = fit_platt(LabelledLogits(logits, (logits > 15).astype(np.int64)), "s", "fp32")
    assert 0 < calibration.slope < 5


def test_no_calibration_from_one_class_or_a_falling_logit() -> None:
    logits = np.linspace(-5, 5, 200)
    with pytest.raises(CalibrationError, match="both"):
        fit_platt(LabelledLogits(logits, np.zeros(200, dtype=np.int64)), "s", "fp32")
    falling = LabelledLogits(logits, (logits < 0).astype(np.int64))
    with pytest.raises(CalibrationError, match="does not rise"):
        fit_platt(falling, "s", "fp32")


def test_ece_by_hand() -> None:
    # Bin [0.1, 0.2): predicted 0.15 twice, one relevant (gap 0.35); bin [0.9, 1]: predicted 1.0,
    # relevant (gap 0). Weighted by pairs: (2 * 0.35 + 1 * 0) / 3.
    probabilities = np.array([0.15, 0.15, 1.0])
    labels = np.array([1, 0, 1])
    assert expected_calibration_error(probabilities, labels, bins=10) == pytest.approx(0.7 / 3)


def test_reliability_diagram_is_a_png(tmp_path: Path) -> None:
    data = _drawn(1.0, 0.0, 2_000)
    out = reliability_diagram(
        1.0 / (1.0 + np.exp(-data.logits)), data.labels, tmp_path / "d.png", "t", 10
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
