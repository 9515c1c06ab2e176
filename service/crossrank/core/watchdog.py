"""When a batch that has not come back from the engine counts as hung: pure functions of the
batch's start, its size and the engine's recent speed (no clock reads, no I/O).

A hung engine (a deadlocked driver, a stuck GPU) never raises: without a bound, every queued
request would wait to its deadline and the pod would look alive. Two bounds, both from the
batch's start:

* **stalled** after ``multiple`` times the batch's expected time (never under ``floor_s``):
  ``/ready`` turns 503, the queued requests get 503 at once, new ones are refused;
* **stuck** after the ``watchdog_liveness_s`` setting: ``/health`` fails, so that Kubernetes
  restarts the pod (crossrank.core.service reads it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WatchdogLimits:
    multiple: float
    floor_s: float


def expected_seconds(seconds_per_token: float | None, padded_tokens: int) -> float:
    """A batch's expected engine time from the measured speed (0 before any measurement)."""
    return 0.0 if seconds_per_token is None else seconds_per_token * padded_tokens


def stall_deadline(started: float, expected_s: float, limits: WatchdogLimits) -> float:
    """The time at which a batch started at ``started`` counts as stalled."""
    return started + max(limits.floor_s, limits.multiple * expected_s)


def updated_speed(previous: float | None, seconds: float, padded_tokens: int) -> float:
    """Seconds per padded token, smoothed over recent batches (one slow batch moves it 20%)."""
    current = seconds / max(1, padded_tokens)
    return current if previous is None else 0.8 * previous + 0.2 * current
