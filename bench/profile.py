"""Where the service's time goes under load: py-spy samples `crossrank serve` (all threads; idle
ones left out) while closed-loop clients keep it saturated; prints the functions with the most
samples, by own time and by time including callees.

    python -m bench.profile --model models/crossrank-minilm-l6 \\
        --passages ../shared/data/trec-dl-2021/passages.jsonl.gz \\
        --queries ../shared/data/trec-dl-2021/queries.tsv --clients 16 --out bench/results/profile

Needs py-spy (`pip install py-spy`) and the right to ptrace the server (root, or
kernel.yama.ptrace_scope = 0).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

from bench import systems
from bench.service_bench import closed_loop
from bench.workload import Workload


def summarize(folded: Path, top: int) -> list[str]:
    """Top functions by own samples and by inclusive samples, from py-spy's raw (folded) output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        frames = stack.split(";")[1:]  # the first frame names the thread
        total += samples
        if frames:
            own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    lines = [f"{total} samples of busy threads", "", "own time:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["", "including callees:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--passages", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--flags", nargs="*", default=[], help="extra `crossrank serve` flags")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("bench/results/profile"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    folded = args.out / "service.folded"
    workload = Workload(args.passages, args.queries)
    requests = workload.requests(args.requests, 100, seed=0)
    with systems.crossrank(args.model, args.threads, args.flags) as server:
        command = ["py-spy", "record", "--pid", str(server.process.pid), "--format", "raw"]
        command += ["--threads", "--rate", "100", "--output", str(folded)]
        spy = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
        )
        result = asyncio.run(closed_loop(server.target, requests, args.clients))
        spy.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
        spy.wait(60)
    lines = [f"{result.pairs_per_s:.1f} pairs/s at {args.clients} clients while sampled", ""]
    lines += summarize(folded, args.top)
    (args.out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
