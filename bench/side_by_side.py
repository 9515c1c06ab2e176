"""crossrank against its peers at their best, in one run: every system serves the same plain
MiniLM-L6 cross-encoder with the same threads and gets the same requests at each concurrency;
crossrank's pairs/s are divided by the best peer's at each level.

    python -m bench.side_by_side --peer-checkpoint runs/bench/minilm-l6-ce \\
        --peer-model runs/bench/minilm-l6-ce-onnx --st-exports runs/bench/minilm-l6-ce-st \\
        --infinity --passages ../shared/data/trec-dl-2021/passages.jsonl.gz \\
        --queries ../shared/data/trec-dl-2021/queries.tsv --out bench/results/side-by-side.md

Every server is started first and stays up; then, level by level, the systems take turns (the
order rotating from level to level and round to round), so that a change in the shared machine's
load falls on all of them alike. bench/README.md ("Peers at their best") says how each peer is
configured and how to build its venv and exports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench import systems
from bench.run import machine
from bench.service_bench import Server, closed_loop
from bench.workload import Workload
from crossrank.model.variant_choice import INT8_FLAGS, read_cpu_flags

PEERS_VENV = Path(__file__).parent / ".venv-st-peers"


@dataclass(frozen=True)
class System:
    name: str
    start: Callable[[], Server]
    ours: bool = False


def served_variant(server: Server) -> str:
    """The variant a crossrank server chose (its crossrank_model_info)."""
    text = httpx.get(server.target.url + "/metrics").text
    found = re.search(r'crossrank_model_info\{[^}]*variant="([^"]+)"', text)
    return found.group(1) if found else "?"


def st_exports(folder: Path) -> dict[str, tuple[str, str | None]]:
    """sentence-transformers' exports present in ``folder``: label -> (backend, file name)."""
    found: dict[str, tuple[str, str | None]] = {}
    if (folder / "onnx" / "model.onnx").is_file():
        found["onnx"] = ("onnx", None)
    for file in sorted((folder / "onnx").glob("model_O*.onnx")):
        found[f"onnx {file.stem.removeprefix('model_')}"] = ("onnx", f"onnx/{file.name}")
    for file in sorted((folder / "onnx").glob("model_*int8_*.onnx")):
        found[f"onnx {file.stem.removeprefix('model_')}"] = ("onnx", f"onnx/{file.name}")
    if (folder / "openvino" / "openvino_model.xml").is_file():
        found["openvino"] = ("openvino", None)
    for file in sorted((folder / "openvino").glob("openvino_model_*.xml")):
        label = f"openvino {file.stem.removeprefix('openvino_model_')}"
        found[label] = ("openvino", f"openvino/{file.name}")
    return found


def build_systems(args: argparse.Namespace) -> list[System]:
    t = args.threads
    out = [System("crossrank (auto)", lambda: systems.crossrank(args.peer_model, t), ours=True)]
    for variant in args.crossrank_variants:
        out.append(
            System(
                f"crossrank ({variant})",
                lambda v=variant: systems.crossrank(args.peer_model, t, ["--variant", v]),
                ours=True,
            )
        )
    ckpt = args.peer_checkpoint
    out.append(System("sentence-transformers torch", lambda: systems.st_api(ckpt, t)))
    if args.st_exports:
        for label, (backend, file_name) in st_exports(args.st_exports).items():
            out.append(
                System(
                    f"sentence-transformers {label}",
                    lambda b=backend, f=file_name: systems.st_api(
                        args.st_exports, t, "cpu", b, f, PEERS_VENV / "bin" / "python"
                    ),
                )
            )
    if args.infinity:
        for engine in ("torch", "optimum"):
            source = ckpt if engine == "torch" else args.infinity_onnx or ckpt
            out.append(
                System(
                    f"Infinity {engine}",
                    lambda e=engine, s=source: systems.infinity(s, t, "cpu", e),
                )
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--peer-checkpoint", type=Path, required=True)
    parser.add_argument("--peer-model", type=Path, required=True, help="its crossrank export")
    parser.add_argument(
        "--crossrank-variants", nargs="*", default=["int8"], help="rows beside auto's"
    )
    parser.add_argument("--st-exports", type=Path, help="checkpoint copy with ST's exports")
    parser.add_argument("--infinity", action="store_true", help="Infinity torch and optimum")
    parser.add_argument("--infinity-onnx", type=Path, help="checkpoint copy with onnx/model.onnx")
    parser.add_argument("--only", nargs="*", help="run only the systems whose names contain these")
    parser.add_argument("--passages", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("bench/results/side-by-side.md"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=8, help="per level and round (min)")
    parser.add_argument("--passages-per-request", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    chosen = build_systems(args)
    if args.only:
        chosen = [s for s in chosen if any(word in s.name for word in args.only)]
    workload = Workload(args.passages, args.queries, args.seed)
    pairs: dict[tuple[str, int], int] = {}
    seconds: dict[tuple[str, int], float] = {}
    latencies: dict[tuple[str, int], list[float]] = {}
    names: dict[str, str] = {}
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        servers = {}
        for system in chosen:
            print(f"starting {system.name}", flush=True)
            servers[system.name] = stack.enter_context(system.start())
            names[system.name] = system.name
            if system.name == "crossrank (auto)":
                names[system.name] = f"crossrank (auto: {served_variant(servers[system.name])})"
        turn = 0
        for round_ in range(args.rounds):
            for clients in args.concurrency:
                count = max(args.requests, clients)
                seed = args.seed + 1000 * round_ + clients
                requests = workload.requests(count, args.passages_per_request, seed=seed)
                order = chosen[turn % len(chosen) :] + chosen[: turn % len(chosen)]
                turn += 1
                for system in order:
                    result = asyncio.run(
                        closed_loop(servers[system.name].target, requests, clients)
                    )
                    key = (system.name, clients)
                    pairs[key] = pairs.get(key, 0) + result.pairs
                    seconds[key] = seconds.get(key, 0.0) + result.seconds
                    latencies.setdefault(key, []).extend(result.latencies)
                    print(
                        f"{system.name} @ {clients}: {result.pairs_per_s:.1f} pairs/s", flush=True
                    )
    load_after = os.getloadavg()

    rate = {key: pairs[key] / seconds[key] for key in pairs}
    flags = ", ".join(sorted(INT8_FLAGS & read_cpu_flags())) or "none"
    lines = [
        f"# crossrank and its peers at their best ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Machine: {machine()}; int8 instructions: {flags}; {args.threads} threads each. "
        f"Load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after. "
        f"{args.passages_per_request}-passage requests from {args.passages.name} / "
        f"{args.queries.name}, seed {args.seed}, at least {args.requests} per level and round, "
        f"{args.rounds} round(s); the systems took turns at each level.",
        "",
        f"Command: `python -m bench.side_by_side {shlex.join(sys.argv[1:])}`",
        "",
        "| system | clients | pairs/s | p50 s | p99 s |",
        "|---|---|---|---|---|",
    ]
    for system in chosen:
        for clients in args.concurrency:
            key = (system.name, clients)
            ordered = sorted(latencies[key])
            p50 = ordered[len(ordered) // 2]
            p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
            lines.append(
                f"| {names[system.name]} | {clients} | {rate[key]:.1f} | {p50:.2f} | {p99:.2f} |"
            )
    peers = [s for s in chosen if not s.ours]
    ours = [s for s in chosen if s.ours]
    if peers and ours:
        lines += [
            "",
            "| clients | best peer | its pairs/s | "
            + " | ".join(f"{names[s.name]} / best peer" for s in ours)
            + " |",
            "|---|---|---|" + "---|" * len(ours),
        ]
        for clients in args.concurrency:
            best = max(peers, key=lambda s: rate[(s.name, clients)])
            top = rate[(best.name, clients)]
            cells = [f"{rate[(s.name, clients)] / top:.2f}x" for s in ours]
            lines.append(f"| {clients} | {best.name} | {top:.1f} | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
