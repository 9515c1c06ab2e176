"""Work yields the CPU: the threads that tokenise and score run at a lower scheduling priority.

On a CPU saturated by inference and tokenisation, the event loop (admission, refusals, probes,
/metrics) would otherwise wait for a timeslice among onnxruntime's threads and the tokeniser's
Rust pool, so a refusal that costs a millisecond of work would come back after many. Linux keeps
a nice value per thread (a thread inherits its creator's), so raising it for those threads alone
leaves the event loop as it was; idle cores still go to the work, so throughput is unchanged
when nothing else is runnable. Other systems have no per-thread niceness: there this does
nothing.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

MAX_NICE = 19


def supported() -> bool:
    return sys.platform == "linux"


def lower_current_thread(nice: int) -> None:
    """Set the calling thread's niceness to the process's plus ``nice`` (at most 19).

    Idempotent, and it only ever lowers priority, which needs no privilege."""
    if nice <= 0 or not supported():
        return
    target = min(MAX_NICE, os.getpriority(os.PRIO_PROCESS, os.getpid()) + nice)
    thread = threading.get_native_id()
    if os.getpriority(os.PRIO_PROCESS, thread) < target:
        os.setpriority(os.PRIO_PROCESS, thread, target)


def build_on_lowered_thread(nice: int, build: Callable[[], T]) -> T:
    """``build()`` on a short-lived thread that lowered itself first, so that every thread it
    creates (onnxruntime's intra-op pool, made with the session) inherits the lower priority."""
    if nice <= 0 or not supported():
        return build()

    def lowered() -> T:
        lower_current_thread(nice)
        return build()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="crossrank-engine-build") as pool:
        return pool.submit(lowered).result()
