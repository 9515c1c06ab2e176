"""The capacity plan: an autoscaled fleet simulated over a day of large requests, from one
replica's measured service curve (bench.service_curve).

Each replica at a per-replica load rho (offered requests / its saturated rate) answers with the
latency distribution measured at rho (interpolated between the measured levels), refuses the
share measured there (beyond the last level, the fluid 1 - 1/rho), and shows the autoscaler the
busy ratio, queue depth and reserved pairs measured there. The load balancer spreads requests
evenly over ready replicas. The HorizontalPodAutoscaler is deploy/k8s/base's: it reads each
signal averaged over the adapter's one-minute window and a scrape later, every 15 s; desired =
ceil(ready x signal / target) per metric (the largest wins, within a 10% tolerance); scale-up
by Kubernetes' default policy (double or +4 pods per 15 s, whichever is more), scale-down after a
300 s stabilisation window, one pod per 60 s; a new pod serves after ``--startup-s`` (scheduling
and image pull) plus the measured start to ``/ready``.

A GPU replica is modelled from the same curve: its engine time per request from the roofline
(``--gpu-tflops``, the FLOPs of the measured tokens per pair), its host time (HTTP, JSON,
tokenisation: the idle request's latency minus its inference seconds) as measured here, its
rate 1 / max(engine, host), its latency the CPU curve's shape scaled to its idle latency, its
busy ratio the engine's share of that, and its reserved pairs those of the CPU at the same rho
(Little's law: rate and wait scale by inverse factors). Its queue depth is not modelled: bound by
the host, its backlog waits for tokenising, before the queue, where reserved pairs count it.

    .venv/bin/python -m bench.capacity --curve bench/results/service-curve.json \\
        --plot docs/capacity.png --plan bench/results/capacity.json
"""

from __future__ import annotations

import argparse
import json
import math
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bench.engine_bench import Shape, pair_flops

# fmt: off
HOURLY = [  # a business-hours day as a fraction of the peak rate, hour by hour (00:00 to 23:00)
    0.25, 0.18, 0.14, 0.12, 0.12, 0.15, 0.25, 0.45, 0.70, 0.88, 0.95, 1.00,
    0.92, 0.95, 1.00, 0.97, 0.90, 0.80, 0.70, 0.60, 0.52, 0.45, 0.38, 0.30,
]
# fmt: on
PERCENTILES = np.arange(1, 101)
STEP_S = 5.0
SYNC_S = 15.0  # the HPA's sync period
SIGNAL_WINDOW_S = 60.0  # rate(...[1m]) / avg_over_time(...[1m]) in the adapter's rules
SIGNAL_LAG_S = 30.0  # a scrape interval and the adapter's cache


@dataclass(frozen=True)
class Replica:
    """One replica as a function of its load rho, from the measured levels (rho = 0 is idle)."""

    capacity_rps: float
    loads: np.ndarray  # ascending, from 0
    quantiles: np.ndarray  # [level, percentile 1..100] of answered requests' latency, seconds
    refused: np.ndarray  # share of requests refused at each level
    signals: dict[str, np.ndarray]  # busy_ratio, queue_depth_pairs, reserved_pairs per level
    ready_s: float

    def latencies(self, rho: np.ndarray) -> np.ndarray:
        """[step, percentile]: the latency distribution at each load, linear between levels
        (percentile by percentile); past the last level, the last level's."""
        r = np.clip(rho, 0.0, self.loads[-1])
        low = np.clip(np.searchsorted(self.loads, r, side="right") - 1, 0, len(self.loads) - 2)
        span = np.maximum(self.loads[low + 1] - self.loads[low], 1e-9)  # two levels may meet
        w = ((r - self.loads[low]) / span)[:, None]
        return self.quantiles[low] * (1 - w) + self.quantiles[low + 1] * w

    def refusal(self, rho: float) -> float:
        measured = float(np.interp(rho, self.loads, self.refused))
        return max(measured, 1 - 1 / rho) if rho > self.loads[-1] else measured

    def signal(self, name: str, rho: np.ndarray) -> np.ndarray:
        return np.interp(rho, self.loads, self.signals[name])


def cpu_replica(curve: dict) -> Replica:
    levels = curve["levels"]
    idle = curve["idle"]["latency_s"]
    # Each level at the load that arrived, in order of it.
    levels = sorted(levels, key=lambda lv: lv["arrived_rps"])
    loads = np.array([0.0] + [lv["arrived_rps"] / curve["saturated_rps"] for lv in levels])
    quantiles = np.array(
        [np.full(100, idle)] + [np.percentile(lv["latencies_s"], PERCENTILES) for lv in levels]
    )
    refused = np.array(
        [0.0] + [lv["refused"] / (lv["refused"] + len(lv["latencies_s"])) for lv in levels]
    )
    signals = {
        name: np.array([0.0] + [lv[name] for lv in levels])
        for name in ("busy_ratio", "queue_depth_pairs", "reserved_pairs")
    }
    return Replica(curve["saturated_rps"], loads, quantiles, refused, signals, curve["ready_s"])


def gpu_replica(cpu: Replica, curve: dict, tflops: float) -> tuple[Replica, dict[str, float]]:
    idle = curve["idle"]
    pairs = curve["passages_per_request"]
    flops = pairs * pair_flops(round(idle["tokens_per_pair"]), Shape())
    engine_s = flops / (tflops * 1e12)
    host_s = idle["latency_s"] - idle["engine_s"]
    scale = (host_s + engine_s) / idle["latency_s"]
    busy = cpu.loads * engine_s / max(engine_s, host_s)
    gpu = replace(
        cpu,
        capacity_rps=1 / max(engine_s, host_s),
        quantiles=cpu.quantiles * scale,
        signals={"busy_ratio": busy, "reserved_pairs": cpu.signals["reserved_pairs"]},
    )
    return gpu, {"engine_s": engine_s, "host_s": host_s, "idle_s": host_s + engine_s}


def day(
    peak_rps: float, hourly: list[float], burst: float, burst_at_h: float, burst_min: float
) -> np.ndarray:
    """Offered requests per second at each step of a day: ``hourly`` (24 fractions of the
    peak), linear between hour marks, with a flash crowd of ``burst`` x the peak for
    ``burst_min`` minutes."""
    t = np.arange(0, 86400, STEP_S)
    shape = np.interp(t / 3600, np.arange(25), [*hourly, hourly[0]])
    rate = peak_rps * shape
    start = burst_at_h * 3600
    rate[(t >= start) & (t < start + burst_min * 60)] = peak_rps * burst
    return rate


@dataclass(frozen=True)
class Autoscaler:
    """deploy/k8s/base's HorizontalPodAutoscaler: per-pod targets by signal, replica bounds."""

    targets: dict[str, float]
    min_replicas: int
    max_replicas: int
    startup_s: float
    tolerance: float = 0.1
    down_window_s: float = 300.0
    down_every_s: float = 60.0


@dataclass
class Day:
    """What the fleet did, step by step."""

    offered: np.ndarray  # requests/s
    replicas: np.ndarray  # pods running (serving or starting)
    ready: np.ndarray
    refused: np.ndarray  # requests refused in the step
    rho: np.ndarray  # offered load per ready pod, as a share of its saturated rate
    answered: np.ndarray  # requests answered in the step
    latency: np.ndarray | None = None  # [step, percentile] of the step's answered requests
    starts: int = 0  # pods started over the day: many more than the peak's means flapping


def desired(hpa: Autoscaler, replica: Replica, ready: int, window: deque) -> int:
    """The HPA's recommendation from the signals' one-minute averages seen a lag ago."""
    wanted = 0
    for name, target in hpa.targets.items():
        seen = float(replica.signal(name, np.array(window)).mean())
        ratio = seen / target
        wanted = max(wanted, ready if abs(ratio - 1) <= hpa.tolerance else math.ceil(ready * ratio))
    return wanted


def simulate(offered: np.ndarray, replica: Replica, hpa: Autoscaler) -> Day:
    steps = len(offered)
    starting: deque[float] = deque()  # when each starting pod becomes ready
    ready, last_down, recommendations = hpa.min_replicas, -math.inf, deque()
    lag = round(SIGNAL_LAG_S / STEP_S)
    history: deque[float] = deque(maxlen=round((SIGNAL_WINDOW_S + SIGNAL_LAG_S) / STEP_S))
    day = Day(*(np.zeros(steps) for _ in range(6)))
    for i, rate in enumerate(offered):
        now = i * STEP_S
        while starting and starting[0] <= now:
            starting.popleft()
            ready += 1
        rho = rate / (ready * replica.capacity_rps)
        history.append(rho)
        share = replica.refusal(rho) if rho > 0 else 0.0
        day.offered[i], day.ready[i], day.replicas[i] = rate, ready, ready + len(starting)
        day.refused[i] = rate * STEP_S * share
        day.answered[i] = rate * STEP_S - day.refused[i]
        day.rho[i] = rho
        if i % round(SYNC_S / STEP_S) or len(history) <= lag:
            continue
        want = desired(hpa, replica, ready, list(history)[: len(history) - lag])
        want = min(max(want, hpa.min_replicas), hpa.max_replicas)
        total = ready + len(starting)
        recommendations.append((now, want))
        while recommendations[0][0] < now - hpa.down_window_s:
            recommendations.popleft()
        if want > total:
            add = min(want, max(2 * total, total + 4)) - total
            starting.extend([now + hpa.startup_s + replica.ready_s] * add)
            day.starts += add
        elif now - last_down >= hpa.down_every_s and max(w for _, w in recommendations) < total:
            # A pod still starting is cancelled first, else a ready one drains.
            if starting:
                starting.pop()
            else:
                ready -= 1
            last_down = now
    day.latency = replica.latencies(day.rho)
    return day


def weighted_percentile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, q / 100 * cumulative[-1])])


def summary(day: Day, replica: Replica) -> dict[str, float]:
    """The day's figures: latency percentiles over every answered request (each step's measured
    distribution weighted by its requests), refusals, replica-hours."""
    weights = np.repeat(day.answered / 100, 100)
    values = day.latency.ravel()
    requests = day.answered.sum() + day.refused.sum()
    return {
        "requests": float(requests),
        "p50_s": weighted_percentile(values, weights, 50),
        "p99_s": weighted_percentile(values, weights, 99),
        "refused_share": float(day.refused.sum() / requests),
        "replica_hours": float(day.replicas.sum() * STEP_S / 3600),
        "peak_replicas": int(day.replicas.max()),
        "pod_starts": day.starts,
        "idle_s": float(replica.quantiles[0, 0]),
    }


def choose(
    offered: np.ndarray, replica: Replica, grid: list[dict[str, float]], base: Autoscaler, slo: dict
) -> tuple[list[dict], dict[str, float], Day]:
    """Every target set in ``grid`` over the day; the chosen one has the fewest replica-hours
    within the SLO (p99 at most ``p99_x`` x a lone request's latency, refusals at most
    ``refused``), else the lowest p99."""
    rows, days = [], []
    for targets in grid:
        day = simulate(offered, replica, replace(base, targets=targets))
        rows.append({"targets": targets, **summary(day, replica)})
        days.append(day)
    within = [
        i
        for i, r in enumerate(rows)
        if r["p99_s"] <= slo["p99_x"] * r["idle_s"] and r["refused_share"] <= slo["refused"]
    ]
    best = (
        min(within, key=lambda i: rows[i]["replica_hours"])
        if within
        else min(range(len(rows)), key=lambda i: rows[i]["p99_s"])
    )
    return rows, rows[best]["targets"], days[best]


def windowed(values: np.ndarray, minutes: int, how=np.sum) -> np.ndarray:
    per = round(minutes * 60 / STEP_S)
    return how(values[: len(values) // per * per].reshape(-1, per), axis=1)


def plot(days: dict[str, Day], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display here or in CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(days), figsize=(6 * len(days), 8), sharex=True, squeeze=False)
    for column, (name, day) in enumerate(days.items()):
        hours = np.arange(len(day.offered)) * STEP_S / 3600
        top, middle, bottom = axes[:, column]
        top.plot(hours, day.offered, color="tab:gray", label="offered requests/s")
        top.set_title(name)
        top.set_ylabel("requests/s")
        pods = top.twinx()
        pods.step(hours, day.ready, where="post", color="tab:green", label="ready pods")
        pods.step(
            hours, day.replicas, where="post", color="tab:blue", lw=0.8, ls="--", label="pods"
        )
        pods.set_ylabel("pods")
        pods.legend(loc="upper left", fontsize="small")
        ten = np.arange(len(windowed(day.answered, 10))) / 6 + 1 / 12
        p99 = [
            weighted_percentile(lat.ravel(), np.repeat(n / 100, 100), 99) if n.sum() else np.nan
            for lat, n in zip(
                np.array_split(day.latency, len(ten)),
                np.array_split(day.answered, len(ten)),
                strict=True,
            )
        ]
        middle.plot(ten, p99, color="tab:red")
        middle.set_ylabel("p99 s (10 min)")
        bottom.bar(ten, windowed(day.refused, 10), width=1 / 6, color="tab:orange")
        bottom.set_ylabel("refused (10 min)")
        bottom.set_xlabel("hour of the day")
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def grids(device: str) -> list[dict[str, float]]:
    """Target sets tried: the busy ratio alone and with the backlog signal the overlay uses."""
    if device == "cpu":
        busy = [{"busy_ratio": b} for b in (0.5, 0.6, 0.7, 0.8, 0.9)]
        return busy + [{"busy_ratio": 0.7, "queue_depth_pairs": q} for q in (320, 1000, 2000)]
    # A GPU replica is host-bound, its busy ratio far below any target: it scales on the
    # pairs holding admission room, which count the backlog wherever it waits.
    return [{"busy_ratio": 0.7, "reserved_pairs": r} for r in (500, 750, 1000, 1500, 2000)]


def report(name: str, rows: list[dict], chosen: dict, fixed: dict) -> None:
    print(f"\n### {name}\n")
    print(
        "| targets (per pod) | replica-hours | peak pods | pods started | p50 s | p99 s | refused |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in [*rows, fixed]:
        targets = r.get("label") or ", ".join(f"{k} {v:g}" for k, v in r["targets"].items())
        mark = " (chosen)" if r["targets"] == chosen else ""
        print(
            f"| {targets}{mark} | {r['replica_hours']:.1f} | {r['peak_replicas']} | "
            f"{r['pod_starts']} | "
            f"{r['p50_s']:.2f} | {r['p99_s']:.2f} | {100 * r['refused_share']:.3f}% |"
        )


def plan_device(
    name: str, offered, replica: Replica, base: Autoscaler, grid, slo
) -> tuple[Day, dict]:
    """The grid over the day, reported; the chosen day and what the plan file keeps."""
    rows, chosen, day = choose(offered, replica, grid, base, slo)
    peak = int(day.replicas.max())
    fixed_day = simulate(offered, replica, replace(base, min_replicas=peak, max_replicas=peak))
    fixed = {
        "targets": {},
        "label": f"no autoscaling: {peak} pods all day",
        **summary(fixed_day, replica),
    }
    report(name, rows, chosen, fixed)
    kept = {"capacity_rps": replica.capacity_rps, "chosen": chosen, "rows": rows, "fixed": fixed}
    return day, kept


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--curve", type=Path, required=True, help="bench.service_curve's JSON")
    parser.add_argument("--plot", type=Path, required=True, help="the plot (PNG)")
    parser.add_argument("--plan", type=Path, required=True, help="the chosen targets (JSON)")
    parser.add_argument(
        "--peak-rps", type=float, default=0.5, help="the day's peak, requests/s, for both"
    )
    parser.add_argument(
        "--gpu-peak-rps",
        type=float,
        default=10.0,
        help="a busier day for GPU replicas alone, where the GPU plan's targets are chosen",
    )
    parser.add_argument("--hourly", type=float, nargs=24, default=HOURLY, help="the day's shape")
    parser.add_argument("--burst", type=float, default=1.5, help="flash crowd, x the peak")
    parser.add_argument("--burst-at-h", type=float, default=14.0)
    parser.add_argument("--burst-min", type=float, default=10.0)
    parser.add_argument(
        "--startup-s",
        type=float,
        nargs=2,
        default=[30.0, 90.0],
        metavar=("CPU", "GPU"),
        help="scheduling and image pull before start",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        nargs=4,
        default=[2, 10, 2, 4],
        metavar=("CPU_MIN", "CPU_MAX", "GPU_MIN", "GPU_MAX"),
    )
    parser.add_argument("--gpu-tflops", type=float, default=800.0, help="the roofline's peak")
    parser.add_argument("--slo-p99-x", type=float, default=3.0, help="x a lone request")
    parser.add_argument("--slo-refused", type=float, default=0.001)
    args = parser.parse_args()

    curve = json.loads(args.curve.read_text())
    cpu = cpu_replica(curve)
    gpu, gpu_times = gpu_replica(cpu, curve, args.gpu_tflops)
    slo = {"p99_x": args.slo_p99_x, "refused": args.slo_refused}
    print(
        f"CPU replica: {cpu.capacity_rps:.3f} requests/s, idle {cpu.quantiles[0, 0]:.2f} s, "
        f"ready in {cpu.ready_s:.1f} s"
    )
    print(
        f"GPU replica: {gpu.capacity_rps:.2f} requests/s, engine {gpu_times['engine_s'] * 1000:.1f}"
        f" ms + host {gpu_times['host_s'] * 1000:.0f} ms a request"
    )
    days, plan = {}, {"curve": str(args.curve), "slo": slo, "args": vars(args)}
    # The plan's keys: "cpu" and "gpu" are the days whose choices the overlays take.
    for key, peak, replica, (low, high), startup in (
        ("cpu", args.peak_rps, cpu, args.replicas[:2], args.startup_s[0]),
        ("gpu_same_day", args.peak_rps, gpu, args.replicas[2:], args.startup_s[1]),
        ("gpu", args.gpu_peak_rps, gpu, args.replicas[2:], args.startup_s[1]),
    ):
        device = key[:3]
        offered = day(peak, args.hourly, args.burst, args.burst_at_h, args.burst_min)
        base = Autoscaler({}, low, high, startup)
        name = f"{device.upper()} replicas, peak {peak:g} requests/s"
        days[name], plan[key] = plan_device(name, offered, replica, base, grids(device), slo)
    plot(days, args.plot)
    args.plan.write_text(json.dumps(plan, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
