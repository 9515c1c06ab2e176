"""Run the benchmark; write ``results.md`` and two PNG plots under --out.

    python -m bench.run --model runs/bench/default-full \\
        --checkpoint runs/default/train/final \\
        --peer-checkpoint runs/bench/minilm-l6-ce --peer-model runs/bench/minilm-l6-ce-onnx \\
        --infinity \\
        --passages ../shared/data/trec-dl-2021/passages.jsonl.gz \\
        --queries ../shared/data/trec-dl-2021/queries.tsv --out bench/results

See bench/README.md for what each section measures and how to read it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import onnxruntime as ort

from bench import plots, systems
from bench.engine_bench import Shape, matmul_peak, pair_flops, run_engine
from bench.queueing import fifo_p99
from bench.service_bench import LoadResult, Server, closed_loop, latency, open_loop
from bench.workload import Request, Workload
from crossrank.core.scheduling import AUTO_BATCH_TOKENS
from crossrank.model.model_dir import ModelDir, load_model_dir
from crossrank.model.tokenization import EncodedPair, PairTokenizer

SWEEP_BATCH_TOKENS = {
    "cpu": (512, 1024, 2048, 4096, 8192),
    "cuda": (4096, 8192, 16384, 32768, 65536),
}
# What a device serves by default (variant auto), and what else the engine section measures.
VARIANTS = {"cpu": ("fp32", "int8"), "cuda": ("fp32", "fp16")}


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    versions = f"onnxruntime {ort.__version__}, Python {platform.python_version()}"
    return f"{model}, {os.cpu_count()} cores, {versions}"


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)
        for line in lines:
            print(line, flush=True)

    def table(self, header: list[str]) -> None:
        self.add("", "| " + " | ".join(header) + " |", "|" + "---|" * len(header))

    def row(self, *cells: object) -> None:
        self.add("| " + " | ".join(str(c) for c in cells) + " |")


def load_row(report: Report, label: str, clients: int, result: LoadResult, server: Server) -> None:
    rss, peak = server.rss_mb()
    report.row(
        label,
        clients,
        f"{result.pairs_per_s:.1f}",
        f"{result.percentile(50):.2f}",
        f"{result.percentile(95):.2f}",
        f"{result.percentile(99):.2f}",
        f"{rss:.0f}",
        f"{peak:.0f}",
        result.refusals,
    )
    report.figures[f"peak_rss/{label}"] = max(report.figures.get(f"peak_rss/{label}", 0), peak)


LOAD_HEADER = [
    "system",
    "clients",
    "pairs/s",
    "p50 s",
    "p95 s",
    "p99 s",
    "RSS MB",
    "peak RSS MB",
    "503s retried",
]


def tokenize(model: ModelDir, request: Request) -> list[EncodedPair]:
    meta = model.metadata
    tokenizer = PairTokenizer(model.tokenizer_path, meta.max_query_tokens, meta.max_length)
    return tokenizer.encode(request.query, request.passages).pairs


def sentence_transformers_predict(
    checkpoint: Path, request: Request, threads: int, device: str
) -> float:
    """Pairs/s of what most users run: CrossEncoder.predict (torch fp32) on the same pairs."""
    import torch
    from sentence_transformers import CrossEncoder

    import crossrank_train.gated_bert  # noqa: F401  (registers the gated architecture)

    torch.set_num_threads(threads)
    model = CrossEncoder(str(checkpoint), device=device, local_files_only=True, max_length=256)
    # A crossrank training checkpoint ships tokenizer.json alone, which names no padding token
    # and no model inputs; the gated model needs the segment ids.
    model.tokenizer.pad_token = model.tokenizer.pad_token or "[PAD]"
    model.tokenizer.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    pairs = [(request.query, p) for p in request.passages]
    model.predict(pairs[:32], batch_size=32)
    start = time.perf_counter()
    model.predict(pairs, batch_size=32)
    return len(pairs) / (time.perf_counter() - start)


def engine_section(args: argparse.Namespace, report: Report, request: Request) -> None:
    shape = Shape(*args.shape)
    # A GPU's roofline is its datasheet rate (bench/README.md, "GPU"); a CPU's is measured.
    peak = args.gpu_peak_tflops * 1e3 if args.device == "cuda" else matmul_peak(args.threads, shape)
    report.figures["peak"] = peak
    report.add(f"fp32 MatMul peak (onnxruntime, this run): **{peak:.0f} GFLOP/s**", "")
    report.add(
        "## Engine: the bare onnxruntime session",
        "",
        f"{len(request.passages)} pairs, batches of at most {args.batch_tokens} padded tokens "
        f"(the {args.device} default), in arrival order and length-sorted; median of "
        f"{args.repeats} passes. GFLOP/s count real tokens only.",
    )
    report.table(
        ["model", "variant", "order", "pairs/s", "s per 1,000", "padding eff.", "GFLOP/s", "% peak"]
    )
    models = {"default": load_model_dir(args.model)}
    if args.peer_model:
        models["plain"] = load_model_dir(args.peer_model)
    for label, model in models.items():
        pairs = tokenize(model, request)
        for variant in VARIANTS[args.device]:
            if variant not in model.metadata.variants:
                continue
            for sort in (False, True):
                r = run_engine(
                    model,
                    variant,
                    pairs,
                    threads=args.threads,
                    batch_tokens=args.batch_tokens,
                    sort=sort,
                    shape=shape,
                    repeats=args.repeats,
                    device=args.device,
                )
                report.figures[f"engine/{label}/{variant}/{r.order}"] = r.pairs_per_s
                report.figures[f"gflops/{label}/{variant}/{r.order}"] = r.gflops
                report.row(
                    model.metadata.name,
                    variant,
                    r.order,
                    f"{r.pairs_per_s:.1f}",
                    f"{1000 / r.pairs_per_s:.1f}",
                    f"{r.real_tokens / r.padded_tokens:.2f}",
                    f"{r.gflops:.0f}",
                    f"{100 * r.gflops / peak:.0f}%",
                )
    mean = sum(p.length for p in tokenize(models["default"], request)) / len(request.passages)
    report.figures["mean_length"] = mean
    if args.checkpoint or args.peer_checkpoint:
        report.table(
            ["sentence-transformers CrossEncoder.predict (torch fp32, batch 32)", "pairs/s"]
        )
        for label, checkpoint in (("default", args.checkpoint), ("plain", args.peer_checkpoint)):
            if checkpoint:
                st = sentence_transformers_predict(checkpoint, request, args.threads, args.device)
                report.figures[f"st_predict/{label}"] = st
                report.row(f"{label} model ({checkpoint.name})", f"{st:.1f}")

    report.add(
        "",
        f"### Batch size sweep (length-sorted, {args.served})",
        "",
        f"Pairs/s by the padded-token budget per batch (median of {args.repeats} passes): where "
        "the CPU default comes from.",
    )
    report.table(["model", *(str(t) for t in SWEEP_BATCH_TOKENS[args.device])])
    for model in models.values():
        if args.served not in model.metadata.variants:
            continue
        pairs = tokenize(model, request)
        cells = []
        for tokens in SWEEP_BATCH_TOKENS[args.device]:
            r = run_engine(
                model,
                args.served,
                pairs,
                threads=args.threads,
                batch_tokens=tokens,
                sort=True,
                shape=shape,
                repeats=args.repeats,
                device=args.device,
            )
            cells.append(f"{r.pairs_per_s:.1f}")
        report.row(model.metadata.name, *cells)


def closed_loop_runs(
    report: Report,
    label: str,
    start: Callable[[], Server],
    workload: Workload,
    args: argparse.Namespace,
    levels: list[int],
) -> dict[int, float]:
    throughput = {}
    with start() as server:
        for clients in levels:
            count = max(args.requests, clients)
            reqs = workload.requests(count, 100, seed=args.seed + clients)
            r = asyncio.run(closed_loop(server.target, reqs, clients))
            throughput[clients] = r.pairs_per_s
            load_row(report, label, clients, r, server)
    return throughput


def systems_section(args: argparse.Namespace, report: Report, workload: Workload) -> None:
    report.add(
        "",
        "## Service: closed loop over loopback, 100-passage requests",
        "",
        "Every system gets the same requests at each concurrency. `plain` is the plain MiniLM-L6 "
        "cross-encoder (bench/peer_checkpoint.py) that all of them can load.",
    )
    report.table(LOAD_HEADER)
    series: dict[str, dict[int, float]] = {}
    t = args.threads
    ours = f"crossrank, default model ({args.served})"
    series[ours] = closed_loop_runs(
        report,
        ours,
        lambda: systems.crossrank(args.model, t, device=args.device),
        workload,
        args,
        args.concurrency,
    )
    # The raw engine on exactly the pairs of the saturated level, globally length-sorted: the
    # upper bound the service's batching is compared against.
    best = max(series[ours].items(), key=lambda kv: kv[1])[0]
    model = load_model_dir(args.model)
    pairs = [
        p
        for r in workload.requests(max(args.requests, best), 100, seed=args.seed + best)
        for p in tokenize(model, r)
    ]
    same = run_engine(
        model,
        args.served,
        pairs,
        threads=t,
        batch_tokens=args.batch_tokens,
        sort=True,
        shape=Shape(*args.shape),
        repeats=args.repeats,
        device=args.device,
    )
    report.figures["engine_same_pairs"] = same.pairs_per_s
    report.figures["saturated_clients"] = best
    peer_levels = [c for c in args.concurrency if c <= args.peer_max_clients]
    if args.peer_model:
        label = f"crossrank, plain ({args.served})"
        series[label] = closed_loop_runs(
            report,
            label,
            lambda: systems.crossrank(args.peer_model, t, device=args.device),
            workload,
            args,
            peer_levels,
        )
    if args.peer_checkpoint:
        label = "sentence-transformers + FastAPI, plain (fp32)"
        series[label] = closed_loop_runs(
            report,
            label,
            lambda: systems.st_api(args.peer_checkpoint, t, args.device),
            workload,
            args,
            peer_levels,
        )
        if args.infinity:
            label = f"Infinity, plain ({'fp16' if args.device == 'cuda' else 'fp32'})"
            series[label] = closed_loop_runs(
                report,
                label,
                lambda: systems.infinity(args.peer_checkpoint, t, args.device),
                workload,
                args,
                peer_levels,
            )
    for name, points in series.items():
        for clients, value in points.items():
            report.figures[f"closed/{name}/{clients}"] = value
    plots.throughput_vs_concurrency(series, args.out / "throughput.png")
    report.add("", "![throughput vs concurrency](throughput.png)")


def ablation_section(args: argparse.Namespace, report: Report, workload: Workload) -> None:
    clients = max(c for c in args.concurrency if c <= 16)
    report.add(
        "",
        f"## Batching ablations (default model, {clients} clients, 100-passage requests)",
    )
    report.table(LOAD_HEADER)
    configs = [
        ("defaults", []),
        ("no length sorting", ["--no-length-sorting"]),
        *((f"max_batch_tokens {n}", ["--max-batch-tokens", str(n)]) for n in (512, 2048, 4096)),
        *((f"max_wait_ms {n}", ["--max-wait-ms", str(n)]) for n in (0, 10)),
    ]
    for label, flags in configs:
        closed_loop_runs(
            report,
            label,
            lambda flags=flags: systems.crossrank(args.model, args.threads, flags, args.device),
            workload,
            args,
            [clients],
        )


# (passages per request, clients, requests): short and long requests next to the 100-passage runs.
SIZES = ((10, 1, 32), (10, 16, 64), (1000, 1, 2), (1000, 2, 2))


def sizes_section(args: argparse.Namespace, report: Report, workload: Workload) -> None:
    report.add("", f"## Request sizes (crossrank, default model, {args.served})")
    report.table(["passages/request", *LOAD_HEADER[1:]])
    with systems.crossrank(args.model, args.threads, device=args.device) as server:
        for size, clients, count in SIZES:
            reqs = workload.requests(count, size, seed=args.seed + size + clients)
            r = asyncio.run(closed_loop(server.target, reqs, clients))
            load_row(report, str(size), clients, r, server)


def fairness(server: Server, workload: Workload, repeats: int) -> tuple[float, float]:
    """Median latency of a 10-passage request idle, and issued while a 1,000-passage one runs."""
    target = server.target
    smalls = workload.requests(repeats, 10, seed=1)
    idle = statistics.median(latency(target, s) for s in smalls)
    loaded = []
    for big, small in zip(workload.requests(repeats, 1000, seed=2), smalls, strict=True):

        async def both(big: Request = big, small: Request = small) -> float:
            async with httpx.AsyncClient(base_url=target.url, timeout=900) as http:
                task = asyncio.ensure_future(http.post(target.path, json=target.body(big)))
                await asyncio.sleep(1.0)  # the big request is being scored
                start = time.perf_counter()
                (await http.post(target.path, json=target.body(small))).raise_for_status()
                elapsed = time.perf_counter() - start
                (await task).raise_for_status()
                return elapsed

        loaded.append(asyncio.run(both()))
    return idle, statistics.median(loaded)


def latency_section(args: argparse.Namespace, report: Report, workload: Workload) -> None:
    saturated = max(v for k, v in report.figures.items() if k.startswith("closed/crossrank, def"))
    with systems.crossrank(args.model, args.threads, device=args.device) as server:
        idle = statistics.median(
            latency(server.target, r) for r in workload.requests(args.idle_repeats, 100, seed=3)
        )
        report.figures["idle100"] = idle
        report.add(
            "",
            "## Latency vs offered load (open loop, default model, 100-passage requests)",
            "",
            f"Poisson arrivals at a fraction of the saturated rate ({saturated:.1f} pairs/s, the "
            f"best closed-loop figure above); idle latency of one request: {idle:.2f} s (median "
            f"of {args.idle_repeats}). FIFO p99: the same arrivals served one request at a time, "
            "each taking the idle latency (M/D/1, simulated by bench/queueing.py): what a server "
            "without interleaving would give.",
        )
        report.table(
            ["offered load", "requests/s", "requests", "p50 s", "p95 s", "p99 s", "FIFO p99 s"]
        )
        rows = []
        for load in args.loads:
            rate = load * saturated / 100
            reqs = workload.requests(args.open_requests, 100, seed=int(100 * load))
            r = asyncio.run(open_loop(server.target, reqs, rate, seed=int(100 * load)))
            p50, p95, p99 = (r.percentile(q) for q in (50, 95, 99))
            rows.append((load, p50, p95, p99))
            report.figures[f"open/{load}/p99"] = p99
            fifo = fifo_p99(load, idle)
            report.figures[f"open/{load}/fifo"] = fifo
            cells = [f"{v:.2f}" for v in (p50, p95, p99, fifo)]
            report.row(f"{load:.0%}", f"{rate:.2f}", len(reqs), *cells)
        plots.latency_vs_load(rows, idle, args.out / "latency.png")
        report.add("", "![latency vs offered load](latency.png)")

        idle10, loaded10 = fairness(server, workload, args.fairness_repeats)
        report.figures["fair_idle"], report.figures["fair_loaded"] = idle10, loaded10
        report.add(
            "",
            "## Fairness",
            "",
            f"A 10-passage request: {idle10:.3f} s idle, {loaded10:.3f} s issued 1 s after a "
            f"1,000-passage request (medians of {args.fairness_repeats}).",
        )


def memory_section(args: argparse.Namespace, report: Report, workload: Workload) -> None:
    report.add(
        "",
        f"## Memory over {args.memory_runs} repeated load runs (default model)",
        "",
        "Each run: 16 clients, requests of 10, 100 and 1,000 passages mixed (the shapes change "
        "all the time). RSS after each run, fresh server.",
    )
    report.table(["run", "RSS MB", "peak RSS MB"])
    rss_after = []
    with systems.crossrank(args.model, args.threads, device=args.device) as server:
        for run in range(args.memory_runs):
            reqs = [r for n in (10, 100, 1000) for r in workload.requests(3, n, seed=10 + run)]
            asyncio.run(closed_loop(server.target, reqs, 16))
            rss, peak = server.rss_mb()
            rss_after.append(rss)
            report.row(run + 1, f"{rss:.0f}", f"{peak:.0f}")
        report.figures["memory_peak"] = peak
    report.figures["memory_growth"] = max(rss_after[1:], default=rss_after[0]) - rss_after[0]


def targets_section(args: argparse.Namespace, report: Report) -> None:
    f = report.figures
    out = ["", "## Targets", ""]

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    saturated = max(v for k, v in f.items() if k.startswith("closed/crossrank, def"))
    ratio = saturated / f["engine_same_pairs"]
    out.append(
        f"- Saturated service / raw engine on the same pairs (default model, int8; the "
        f"{f['saturated_clients']:.0f}-client run's pairs, globally length-sorted): "
        f"{saturated:.1f} / {f['engine_same_pairs']:.1f} = {ratio:.2f} (target ≥ 0.95): "
        f"{verdict(ratio >= 0.95)}"
    )
    for label in ("plain", "default"):
        gflops = f.get(f"gflops/{label}/fp32/length-sorted")
        if gflops:
            share = gflops / f["peak"]
            out.append(
                f"- fp32 engine, {label} model, length-sorted: {gflops:.0f} GFLOP/s = {share:.0%} "
                f"of the {f['peak']:.0f} GFLOP/s roofline (target ≥ 85%): {verdict(share >= 0.85)}"
            )
        fp32 = f.get(f"engine/{label}/fp32/length-sorted")
        int8 = f.get(f"engine/{label}/int8/length-sorted")
        if fp32 and int8:
            out.append(
                f"- int8 / fp32 pairs/s, {label} model: {int8 / fp32:.2f}x (target ≥ 2.5x): "
                f"{verdict(int8 / fp32 >= 2.5)}"
            )
    training = load_model_dir(args.model).metadata.training
    agreement = training.get("export", {}).get("agreement", {}).get("int8")
    if agreement:
        # Measured by `crossrank export` on the eval set it was given (its ranking-agreement gate).
        out.append(
            f"- int8 vs fp32 ranking agreement, default model "
            f"({training.get('export_sample', '')}): "
            f"top-10 overlap {agreement['top10_overlap']:.3f}, Kendall τ "
            f"{agreement['kendall_tau']:.3f} (target overlap ≥ 0.9): "
            f"{verdict(agreement['top10_overlap'] >= 0.9)}"
        )
    peers = [k for k in f if k.startswith("closed/") and not k.startswith("closed/crossrank")]
    for key in peers:
        peer, clients = key.removeprefix("closed/").rsplit("/", 1)
        ours, theirs = f.get(f"closed/crossrank, plain ({args.served})/{clients}"), f[key]
        if ours:
            out.append(
                f"- crossrank / {peer} at {clients} clients (same plain model, default "
                f"{args.device} configuration): {ours:.1f} / {theirs:.1f} = {ours / theirs:.1f}x "
                f"(target ≥ 3x): {verdict(ours / theirs >= 3)}"
            )
    st = f.get("st_predict/plain")
    ours = f.get(f"engine/plain/{args.served}/length-sorted")
    if st and ours:
        out.append(
            f"- crossrank engine / CrossEncoder.predict, plain model: {ours:.1f} / {st:.1f} = "
            f"{ours / st:.1f}x (target ≥ 3x): {verdict(ours / st >= 3)}"
        )
    p99 = f.get("open/0.5/p99")
    if p99:
        ratio = p99 / f["idle100"]
        out.append(
            f"- p99 of a 100-passage request at 50% load / idle: {p99:.2f} / {f['idle100']:.2f} s "
            f"= {ratio:.1f}x (target ≤ 2x): {verdict(ratio <= 2)}; serving one request at a "
            f"time (FIFO) would give {f['open/0.5/fifo'] / f['idle100']:.1f}x"
        )
    if "fair_idle" in f:
        ratio = f["fair_loaded"] / f["fair_idle"]
        out.append(
            f"- Fairness, 10 passages behind 1,000: {ratio:.1f}x idle (target ≤ 3x): "
            f"{verdict(ratio <= 3)}"
        )
    peaks = {k.split("/", 1)[1]: v for k, v in f.items() if k.startswith("peak_rss/")}
    heaviest = max(
        v for k, v in peaks.items() if not k.startswith(("sentence-transformers", "Infinity"))
    )
    out.append(
        f"- Peak RSS of crossrank under the heaviest load run: {heaviest:.0f} MB (target ≤ 1,500 "
        f"MB): {verdict(heaviest <= 1500)}"
    )
    if "memory_growth" in f:
        growth = f["memory_growth"]
        out.append(
            f"- RSS growth over {args.memory_runs} repeated runs beyond the first: "
            f"{growth:+.0f} MB "
            f"(target: none; under 5% of the first run's RSS counted as none): "
            f"{verdict(growth <= 0.05 * f['memory_peak'])}"
        )
    report.add(*out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="crossrank model dir (default)")
    parser.add_argument("--checkpoint", type=Path, help="its HF checkpoint: adds ST predict")
    parser.add_argument("--peer-checkpoint", type=Path, help="plain HF cross-encoder for the peers")
    parser.add_argument("--peer-model", type=Path, help="its crossrank export (crossrank export)")
    parser.add_argument("--infinity", action="store_true", help="add Infinity (its own venv)")
    parser.add_argument("--passages", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where every system runs"
    )
    parser.add_argument(
        "--gpu-peak-tflops", type=float, default=800, help="the roofline on cuda (H100 fp16)"
    )
    parser.add_argument("--pairs", type=int, default=1000, help="pairs of the engine runs")
    parser.add_argument("--repeats", type=int, default=3, help="engine passes (median)")
    parser.add_argument("--requests", type=int, default=16, help="requests per load run (min)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--peer-max-clients", type=int, default=16, help="peers' top concurrency")
    parser.add_argument("--loads", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.9])
    parser.add_argument("--open-requests", type=int, default=30, help="per open-loop level")
    parser.add_argument("--idle-repeats", type=int, default=5)
    parser.add_argument("--fairness-repeats", type=int, default=3)
    parser.add_argument("--memory-runs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=[384, 1536, 6],
        metavar=("HIDDEN", "INTERMEDIATE", "LAYERS"),
        help="the encoder's shape, for the FLOP count (default: MiniLM-L6)",
    )
    args = parser.parse_args()
    args.batch_tokens = AUTO_BATCH_TOKENS[args.device]
    args.served = VARIANTS[args.device][-1]
    args.out.mkdir(parents=True, exist_ok=True)

    workload = Workload(args.passages, args.queries, args.seed)
    request = workload.requests(1, args.pairs, seed=args.seed)[0]
    report = Report()
    report.add(f"# crossrank benchmark ({time.strftime('%Y-%m-%d')})", "")
    engine_section(args, report, request)
    mean = report.figures["mean_length"]
    shape = Shape(*args.shape)
    report.lines.insert(
        2,
        f"Machine: {machine()}; {args.threads} threads. Workload: passages of {args.passages.name}"
        f", queries of {args.queries.name}, seed {args.seed}; engine pairs: mean {mean:.0f} tokens "
        f"({pair_flops(round(mean), shape) / 1e9:.2f} GFLOP per pair at the mean).\n",
    )
    systems_section(args, report, workload)
    sizes_section(args, report, workload)
    ablation_section(args, report, workload)
    latency_section(args, report, workload)
    memory_section(args, report, workload)
    targets_section(args, report)
    (args.out / "results.md").write_text("\n".join(report.lines) + "\n")
    print(f"wrote {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
