"""Run the benchmark and write ``results.md`` (+ a plot) under --out.

    python -m bench.run --model models/crossrank-minilm-l6 \\
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
from pathlib import Path

import httpx
import onnxruntime as ort

from bench.engine_bench import Shape, matmul_peak, pair_flops, run_engine
from bench.service_bench import Server, closed_loop
from bench.workload import Workload
from crossrank.model_dir import load_model_dir
from crossrank.tokenization import PairTokenizer


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


def latency(url: str, query: str, passages: list[str]) -> float:
    start = time.perf_counter()
    httpx.post(url + "/rerank", json={"query": query, "passages": passages}, timeout=600)
    return time.perf_counter() - start


def fairness(url: str, workload: Workload, repeats: int) -> tuple[float, float]:
    """Median latency of a 10-passage request idle, and while a 1,000-passage one runs."""
    small = workload.request(10)
    idle = statistics.median(latency(url, small.query, small.passages) for _ in range(repeats))
    loaded = []
    for _ in range(repeats):
        big = workload.request(1000)

        async def both(big=big) -> float:
            async with httpx.AsyncClient(base_url=url, timeout=600) as http:
                task = asyncio.ensure_future(
                    http.post("/rerank", json={"query": big.query, "passages": big.passages})
                )
                await asyncio.sleep(1.0)  # the big request is being scored
                start = time.perf_counter()
                await http.post("/rerank", json={"query": small.query, "passages": small.passages})
                elapsed = time.perf_counter() - start
                await task
                return elapsed

        loaded.append(asyncio.run(both()))
    return idle, statistics.median(loaded)


def sentence_transformers_predict(checkpoint: Path, query: str, passages: list[str]) -> float:
    """Pairs/s of what most users run: CrossEncoder.predict on the same pairs."""
    import torch
    from sentence_transformers import CrossEncoder

    import crossrank_train.gated_bert  # noqa: F401  (registers the gated architecture)

    torch.set_num_threads(os.cpu_count() or 1)
    model = CrossEncoder(str(checkpoint), device="cpu", local_files_only=True, max_length=512)
    # A crossrank checkpoint ships tokenizer.json alone, which names no padding token and no
    # model inputs; the gated model needs the segment ids.
    model.tokenizer.pad_token = model.tokenizer.pad_token or "[PAD]"
    model.tokenizer.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    pairs = [(query, p) for p in passages]
    model.predict(pairs[:32], batch_size=32)
    start = time.perf_counter()
    model.predict(pairs, batch_size=32)
    return len(pairs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--passages", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--pairs", type=int, default=1000, help="pairs of the engine runs")
    parser.add_argument("--requests", type=int, default=24, help="requests per load run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="the model's Hugging Face checkpoint: adds sentence-transformers CrossEncoder.predict",
    )
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=[384, 1536, 6],
        metavar=("HIDDEN", "INTERMEDIATE", "LAYERS"),
        help="the encoder's shape, for the FLOP count (default: MiniLM-L6)",
    )
    args = parser.parse_args()

    model = load_model_dir(args.model)
    meta = model.metadata
    workload = Workload(args.passages, args.queries, args.seed)
    tokenizer = PairTokenizer(model.tokenizer_path, meta.max_query_tokens, meta.max_length)
    request = workload.request(args.pairs)
    pairs = tokenizer.encode(request.query, request.passages).pairs
    shape = Shape(*args.shape)
    mean_length = sum(p.length for p in pairs) / len(pairs)
    lines = [
        f"# crossrank benchmark ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}; {args.threads} threads. Model: {meta.name}. Workload: "
        f"{args.pairs} pairs, mean {mean_length:.0f} tokens "
        f"({pair_flops(round(mean_length), shape) / 1e9:.2f} GFLOP per pair at the mean).",
        "",
    ]

    peak = matmul_peak(args.threads, shape)
    lines += [
        f"fp32 MatMul peak (onnxruntime, this run): **{peak:.0f} GFLOP/s**",
        "",
        "## Engine (bare onnxruntime session, max 4,096 padded tokens per batch)",
        "",
        "| variant | order | pairs/s | s per 1,000 pairs | padding eff. | GFLOP/s | % of peak |",
        "|---|---|---|---|---|---|---|",
    ]
    engine_best: dict[str, float] = {}
    for variant in sorted(meta.variants):
        if variant == "fp16":
            continue  # fp16 is the GPU variant: CPUs emulate it
        for sort in (False, True):
            r = run_engine(
                model,
                variant,
                pairs,
                threads=args.threads,
                batch_tokens=4096,
                sort=sort,
                shape=shape,
            )
            engine_best[variant] = max(engine_best.get(variant, 0.0), r.pairs_per_s)
            lines.append(
                f"| {variant} | {r.order} | {r.pairs_per_s:.1f} | {1000 / r.pairs_per_s:.1f} | "
                f"{r.real_tokens / r.padded_tokens:.2f} | {r.gflops:.0f} | "
                f"{100 * r.gflops / peak:.0f}% |"
            )
            print(lines[-1], flush=True)

    if args.checkpoint:
        st = sentence_transformers_predict(args.checkpoint, request.query, request.passages)
        engine_best["sentence-transformers"] = st
        lines.append(
            f"| sentence-transformers CrossEncoder.predict (torch fp32, batch 32) | as given | "
            f"{st:.1f} | {1000 / st:.1f} | | | |"
        )
        print(lines[-1], flush=True)

    lines += [
        "",
        "## Service (closed loop over loopback, default settings)",
        "",
        "| settings | clients | passages/request | pairs/s | p50 s | p95 s | p99 s | RSS MB "
        "| peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    configs = [("default", [])]
    configs += [
        ("no length sorting", ["--no-length-sorting"]),
        ("max_batch_tokens 2048", ["--max-batch-tokens", "2048"]),
        ("max_batch_tokens 8192", ["--max-batch-tokens", "8192"]),
    ]
    saturated = 0.0
    for label, flags in configs:
        server = Server(args.model, ["--threads", str(args.threads), *flags])
        try:
            levels = args.concurrency if label == "default" else [max(args.concurrency)]
            for clients in levels:
                reqs = [workload.request(100) for _ in range(args.requests)]
                r = asyncio.run(closed_loop(server.url, reqs, clients))
                rss, peak_rss = server.rss_mb()
                if label == "default":
                    saturated = max(saturated, r.pairs_per_s)
                lines.append(
                    f"| {label} | {clients} | 100 | {r.pairs_per_s:.1f} | {r.percentile(50):.2f} | "
                    f"{r.percentile(95):.2f} | {r.percentile(99):.2f} | {rss:.0f} | "
                    f"{peak_rss:.0f} |"
                )
                print(lines[-1], flush=True)
            if label == "default":
                idle, loaded = fairness(server.url, workload, repeats=3)
        finally:
            server.stop()
    served = "int8" if "int8" in engine_best else "fp32"  # what `variant=auto` serves on CPU
    ratio = saturated / engine_best[served]
    lines += [
        "",
        "## Targets",
        "",
        f"- Saturated service throughput / best raw engine ({served}): "
        f"{saturated:.1f} / {engine_best[served]:.1f} = **{ratio:.2f}** (target ≥ 0.95)",
        f"- Fairness: a 10-passage request takes {idle:.2f} s idle and {loaded:.2f} s while a "
        f"1,000-passage request runs: **{loaded / idle:.1f}x** (target ≤ 3x)",
    ]
    if "sentence-transformers" in engine_best:
        speedup = saturated / engine_best["sentence-transformers"]
        lines.append(
            f"- crossrank service (saturated) / sentence-transformers predict: **{speedup:.1f}x** "
            "(target >= 3x)"
        )
    if "int8" in engine_best and "fp32" in engine_best:
        lines.append(
            f"- int8 / fp32 engine pairs/s: **{engine_best['int8'] / engine_best['fp32']:.2f}x** "
            "(target ≥ 2.5x)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-4:]))


if __name__ == "__main__":
    main()
