"""The benchmark's two plots, written as PNG beside results.md."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display here or in CI
import matplotlib.pyplot as plt


def throughput_vs_concurrency(series: dict[str, dict[int, float]], out: Path) -> None:
    """``series``: system -> {clients: pairs/s}."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, points in series.items():
        clients = sorted(points)
        ax.plot(clients, [points[c] for c in clients], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients (closed loop, 100-passage requests)")
    ax.set_ylabel("pairs/s")
    _save(fig, ax, out)


def latency_vs_load(rows: list[tuple[float, float, float, float]], idle: float, out: Path) -> None:
    """``rows``: (offered load as a fraction of saturation, p50, p95, p99) in seconds."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    loads = [r[0] for r in rows]
    for column, label in ((1, "p50"), (2, "p95"), (3, "p99")):
        ax.plot(loads, [r[column] for r in rows], marker="o", label=label)
    ax.axhline(idle, color="grey", linestyle="--", label="idle")
    ax.axhline(2 * idle, color="grey", linestyle=":", label="2x idle")
    ax.set_xlabel("offered load (fraction of saturated throughput, Poisson arrivals)")
    ax.set_ylabel("latency of a 100-passage request (s)")
    _save(fig, ax, out)


def _save(fig: plt.Figure, ax: plt.Axes, out: Path) -> None:
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
