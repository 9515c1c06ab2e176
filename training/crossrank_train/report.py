"""The training report: loss and dev nDCG@10 curves as a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from crossrank_train.checkpoints import TrainState


def _moving_average(values: list[float], window: int) -> np.ndarray:
    return np.convolve(values, np.ones(window) / window, mode="valid")


def write_report(path: Path, state: TrainState, title: str) -> Path:
    # The object API, not pyplot: no GUI backend and no global figure state in a training run.
    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_axes, dev_axes = figure.subplots(1, 2)
    steps = np.arange(1, len(state.losses) + 1)
    loss_axes.plot(steps, state.losses, alpha=0.35, label="per step")
    window = len(state.losses) // 20
    if window > 1:
        smooth = _moving_average(state.losses, window)
        loss_axes.plot(steps[len(steps) - len(smooth) :], smooth, label=f"mean of {window}")
    loss_axes.set(title="training loss", xlabel="step", ylabel="loss")
    loss_axes.legend()
    if state.dev:
        dev_steps, dev_scores = zip(*state.dev, strict=True)
        dev_axes.plot(dev_steps, dev_scores, marker="o")
    else:
        dev_axes.text(0.5, 0.5, "no dev set given", ha="center", va="center")
    dev_axes.set(title="dev nDCG@10", xlabel="step")
    figure.suptitle(title)
    figure.savefig(path, dpi=100)
    return path
