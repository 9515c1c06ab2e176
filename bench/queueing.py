"""A reference for the open-loop latencies: one server taking requests first-come-first-served,
each for the same time (M/D/1), simulated. Its p99 bounds what serving requests one after the other
gives at a load; a batcher that interleaves requests' batches can do better."""

from __future__ import annotations

import random


def fifo_p99(load: float, service_s: float, requests: int = 200_000, seed: int = 0) -> float:
    """p99 of the time from arrival to completion, Poisson arrivals at ``load`` x capacity."""
    rng = random.Random(seed)
    arrival, free, sojourn = 0.0, 0.0, []
    for _ in range(requests):
        arrival += rng.expovariate(load / service_s)
        free = max(arrival, free) + service_s
        sojourn.append(free - arrival)
    sojourn.sort()
    return sojourn[int(0.99 * len(sojourn))]
