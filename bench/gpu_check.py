"""The GPU check kit: does crossrank on a GPU rank as its CPU service does, and how fast is it?

    deploy/gpu-check.sh --wheels DIR --passages FILE --queries FILE --out DIR   # the one command

runs, after installing the `gpu` extra into its own venv:

    python -m bench.gpu_check --device cuda --model models/crossrank-minilm-l6 \\
        --passages ../shared/data/trec-dl-2021/passages.jsonl.gz \\
        --queries ../shared/data/trec-dl-2021/queries.tsv --out OUT

0. preflight: the engine on --device scores one pair in this process (a missing CUDA library
   shows here, in seconds, with onnxruntime's own message);
1. reference: the CPU service (`crossrank serve --device cpu`) scores a fixed request set, drawn
   with a fixed seed from --passages / --queries, once with the variant it serves (int8 for the
   bundled model) and once with the variant the GPU serves (fp16), which separates what the GPU
   changes from what quantisation changes;
2. server: the service on --device (variant auto: fp16 on CUDA) starts; which variant and
   provider it runs are read off its /metrics;
3. agreement: it scores the same requests; top-10 overlap, Kendall tau and max |score
   difference| on the raw logits against each reference, with a verdict by the export's gates;
4. service: closed loop at 1, 4 and 16 clients, 100-passage requests;
5. latency_1000: 1,000-passage requests one at a time;
6. engine: the bare engine (OnnxEngine, the service's session plan for --device) over one
   request's pairs, length-sorted, for each `max_batch_tokens` of the sweep.

Each section is written to OUT/gpu-check.md (tables, then every figure as one JSON block) as soon
as it ends, and a section that fails or starts past --budget-s is recorded as such, so a run cut
short keeps what it measured. The raw scores go to OUT/gpu-check-scores.json and the servers'
output to OUT/server-*.log. Exit status: 0 when every section ran and every comparison met its
gate, 3 when a comparison missed, 4 when a section failed or was skipped (1 and 2 stay Python's
and argparse's own).

`--device cpu` runs the same code on CPU (tests/test_gpu_check.py does, on a tiny model).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
from prometheus_client.parser import text_string_to_metric_families

from bench import systems
from bench.engine_bench import Shape, run_engine
from bench.ranking_agreement import ranking_agreement, thresholds_for
from bench.service_bench import Server, closed_loop, latency
from bench.workload import Request, Workload
from crossrank.model.collate import pad_pairs
from crossrank.model.engine import OnnxEngine, plan_session
from crossrank.model.model_dir import ModelDir, load_model_dir
from crossrank.model.tokenization import EncodedPair, load_pair_encoder

RESULTS = "gpu-check.md"
SCORES = "gpu-check-scores.json"
SECTIONS = ("preflight", "reference", "server", "agreement", "service", "latency_1000", "engine")
MISSED, INCOMPLETE = 3, 4  # exit statuses
# Seeds of the request sets: the same requests for every server, in every run of the kit.
AGREEMENT_SEED, SERVICE_SEED, LONG_SEED, ENGINE_SEED = 15, 1500, 15000, 150000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("models/crossrank-minilm-l6"))
    parser.add_argument("--passages", type=Path, required=True, help="as bench.run's")
    parser.add_argument("--queries", type=Path, required=True, help="as bench.run's")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads")
    parser.add_argument("--agree-requests", type=int, default=20)
    parser.add_argument("--agree-passages", type=int, default=100, help="per agreement request")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--requests", type=int, default=32, help="per closed-loop level (at least 4 a client)"
    )
    parser.add_argument("--passages-per-request", type=int, default=100, help="closed loop")
    parser.add_argument("--long-passages", type=int, default=1000)
    parser.add_argument("--long-requests", type=int, default=5, help="timed, after one warm-up")
    parser.add_argument("--engine-pairs", type=int, default=1000)
    parser.add_argument("--sweep", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--repeats", type=int, default=3, help="engine passes (median)")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=[384, 1536, 6],
        metavar=("HIDDEN", "INTERMEDIATE", "LAYERS"),
        help="the encoder's shape, for the FLOP count (default: MiniLM-L6, the bundled model)",
    )
    parser.add_argument(
        "--budget-s", type=float, default=420, help="no section starts after this many seconds"
    )
    parser.add_argument("--start-timeout-s", type=float, default=240, help="per server start")
    parser.add_argument("--install-s", type=float, help="the wrapper's install time, recorded")
    return parser.parse_args(argv)


def _command(*args: str) -> str | None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def environment(args: argparse.Namespace) -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    gpu = None
    if shutil.which("nvidia-smi"):
        gpu = _command(
            "nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"
        )
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.executable).name, "-m", "bench.gpu_check", *sys.argv[1:]]),
        "git_commit": _command("git", "rev-parse", "HEAD"),
        "device": args.device,
        "gpu": gpu,
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnxruntime_file": ort.__file__,
        "providers": ort.get_available_providers(),
        "model": str(args.model),
        "workload": {
            "passages": str(args.passages),
            "queries": str(args.queries),
            "seeds": [AGREEMENT_SEED, SERVICE_SEED, LONG_SEED, ENGINE_SEED],
        },
        "install_s": args.install_s,
    }


def served(server: Server) -> dict[str, str]:
    """The model, variant and execution provider the server reports on /metrics."""
    text = httpx.get(server.target.url + "/metrics").text
    for family in text_string_to_metric_families(text):
        # An Info metric is a gauge named *_info in the text format.
        if family.name in ("crossrank_model", "crossrank_model_info"):
            return dict(family.samples[0].labels)
    raise RuntimeError("the server's /metrics has no crossrank_model_info")


def scores(server: Server, requests: list[Request]) -> list[np.ndarray]:
    """Raw logits of each request's passages, in the order sent."""
    out = []
    with httpx.Client(base_url=server.target.url, timeout=600) as http:
        for request in requests:
            body = {"query": request.query, "passages": request.passages, "raw_scores": True}
            response = http.post("/rerank", json=body)
            response.raise_for_status()
            logits = np.full(len(request.passages), np.nan)
            for result in response.json()["results"]:
                logits[result["index"]] = result["score"]
            if np.isnan(logits).any():
                raise RuntimeError(f"{server.target.url} left passages of a request unscored")
            out.append(logits)
    return out


def tokenize(model: ModelDir, request: Request) -> list[EncodedPair]:
    """The pairs as the service encodes them."""
    return load_pair_encoder(model).encode(request.query, request.passages).pairs


class Kit:
    """Runs the sections in order and writes the results after each."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.model = load_model_dir(args.model)
        self.workload = Workload(args.passages, args.queries)
        self.record: dict[str, Any] = {"environment": environment(args), "timings_s": {}}
        self.raw_scores: dict[str, list[list[float]]] = {}
        self.references: dict[str, list[np.ndarray]] = {}
        self.variant = self.model.choose_variant("auto", args.device)
        args.out.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def section(self, name: str, run: Callable[[], dict[str, Any]]) -> bool:
        """Run one section; record its figures, or why it has none. True when it ran."""
        if self.elapsed() > self.args.budget_s:
            self.record[name] = {"skipped": f"started past the {self.args.budget_s:.0f} s budget"}
        else:
            print(f"[{self.elapsed():5.0f} s] {name}", flush=True)
            start = time.monotonic()
            try:
                self.record[name] = run()
            except Exception as exc:
                traceback.print_exc()
                self.record[name] = {"error": f"{type(exc).__name__}: {exc}"}
            self.record["timings_s"][name] = round(time.monotonic() - start, 2)
        self.save()
        return "skipped" not in self.record[name] and "error" not in self.record[name]

    def skip(self, name: str, why: str) -> None:
        self.record[name] = {"skipped": why}
        self.save()

    def server(self, device: str, variant: str | None, label: str) -> Server:
        flags = ["--variant", variant] if variant else []
        return systems.crossrank(
            self.args.model,
            self.args.threads,
            flags,
            device,
            log=self.args.out / f"server-{label}.log",
            start_timeout_s=self.args.start_timeout_s,
        )

    def agreement_requests(self) -> list[Request]:
        return self.workload.requests(
            self.args.agree_requests, self.args.agree_passages, seed=AGREEMENT_SEED
        )

    def preflight(self) -> dict[str, Any]:
        plan = plan_session(self.args.device, ort.get_available_providers())
        engine = OnnxEngine(self.model.variant_path(self.variant), plan)
        pairs = tokenize(self.model, Request("does the engine run", ["it answers this pair"]))
        logits = engine.run(pad_pairs(pairs))
        if not np.isfinite(logits).all():
            raise RuntimeError(f"the engine's logit is not finite: {logits}")
        return {"variant": self.variant, "provider": engine.provider}

    def reference(self) -> dict[str, Any]:
        """The CPU service's scores: the variant it serves, and the one the device serves."""
        variants = dict.fromkeys([self.model.choose_variant("auto", "cpu"), self.variant])
        record = {}
        for variant in variants:
            start = time.monotonic()
            with self.server("cpu", variant, f"cpu-{variant}") as server:
                info = served(server)
                self.references[variant] = scores(server, self.agreement_requests())
            self.raw_scores[f"cpu/{variant}"] = [s.tolist() for s in self.references[variant]]
            record[f"cpu/{variant}"] = {**info, "seconds": round(time.monotonic() - start, 2)}
        return record

    def agreement(self, server: Server) -> dict[str, Any]:
        candidate = scores(server, self.agreement_requests())
        label = f"{self.args.device}/{self.variant}"
        self.raw_scores[label] = [s.tolist() for s in candidate]
        served_on_cpu = self.model.choose_variant("auto", "cpu")
        comparisons = []
        for variant, reference in self.references.items():
            kinds = []
            if variant == self.variant:
                kinds.append("same variant")
            if variant == served_on_cpu:
                kinds.append("as served")
            gate = thresholds_for(self.variant, variant)
            found = ranking_agreement(reference, candidate)
            comparisons.append(
                {
                    "candidate": label,
                    "reference": f"cpu/{variant}",
                    "kind": ", ".join(kinds),
                    **found.as_record(),
                    "gate": {
                        "min_top10_overlap": gate.min_top10_overlap,
                        "min_kendall_tau": gate.min_kendall_tau,
                    },
                    "met": found.meets(gate),
                }
            )
        return {
            "requests": self.args.agree_requests,
            "passages": self.args.agree_passages,
            "comparisons": comparisons,
        }

    def service(self, server: Server) -> dict[str, Any]:
        levels = []
        for clients in self.args.clients:
            count = max(self.args.requests, 4 * clients)
            requests = self.workload.requests(
                count, self.args.passages_per_request, seed=SERVICE_SEED + clients
            )
            result = asyncio.run(closed_loop(server.target, requests, clients))
            levels.append(
                {
                    "clients": clients,
                    "requests": count,
                    "pairs_per_s": result.pairs_per_s,
                    "p50_s": result.percentile(50),
                    "p95_s": result.percentile(95),
                    "p99_s": result.percentile(99),
                    "refusals": result.refusals,
                }
            )
            print(f"  {clients} clients: {result.pairs_per_s:.0f} pairs/s", flush=True)
        return {"passages_per_request": self.args.passages_per_request, "levels": levels}

    def latency_1000(self, server: Server) -> dict[str, Any]:
        warm, *timed = self.workload.requests(
            self.args.long_requests + 1, self.args.long_passages, seed=LONG_SEED
        )
        latency(server.target, warm)
        seconds = [latency(server.target, request) for request in timed]
        median = float(np.median(seconds))
        return {
            "passages": self.args.long_passages,
            "requests": len(seconds),
            "seconds": seconds,
            "median_s": median,
            "min_s": min(seconds),
            "max_s": max(seconds),
            "pairs_per_s_at_median": self.args.long_passages / median,
        }

    def engine(self) -> dict[str, Any]:
        request = self.workload.requests(1, self.args.engine_pairs, seed=ENGINE_SEED)[0]
        pairs = tokenize(self.model, request)
        points = []
        for tokens in self.args.sweep:
            found = run_engine(
                self.model,
                self.variant,
                pairs,
                threads=self.args.threads,
                batch_tokens=tokens,
                sort=True,
                shape=Shape(*self.args.shape),
                repeats=self.args.repeats,
                device=self.args.device,
            )
            points.append(
                {
                    "max_batch_tokens": tokens,
                    "pairs_per_s": found.pairs_per_s,
                    "padding_efficiency": found.real_tokens / found.padded_tokens,
                    "tflops": found.gflops / 1000,
                }
            )
            print(f"  {tokens} tokens: {found.pairs_per_s:.0f} pairs/s", flush=True)
        return {
            "variant": self.variant,
            "pairs": len(pairs),
            "mean_tokens": sum(p.length for p in pairs) / len(pairs),
            "repeats": self.args.repeats,
            "points": points,
        }

    def run(self) -> int:
        if not self.section("preflight", self.preflight):
            for name in SECTIONS[1:]:
                self.skip(name, "the engine does not run: see the preflight section")
            return INCOMPLETE
        if self.section("reference", self.reference):
            self.run_on_device()
        else:
            for name in ("server", "agreement", "service", "latency_1000"):
                self.skip(name, "no CPU reference: see the reference section")
        self.section("engine", self.engine)
        self.record["total_s"] = round(self.elapsed(), 2)
        self.save()
        if any("skipped" in self.record[n] or "error" in self.record[n] for n in SECTIONS):
            return INCOMPLETE
        return 0 if all(c["met"] for c in self.record["agreement"]["comparisons"]) else MISSED

    def run_on_device(self) -> None:
        with contextlib.ExitStack() as stack:
            started: list[Server] = []

            def start() -> dict[str, Any]:
                started.append(
                    stack.enter_context(self.server(self.args.device, None, self.args.device))
                )
                return served(started[0])

            if not self.section("server", start):
                for name in ("agreement", "service", "latency_1000"):
                    self.skip(name, "the server did not start: see the server section")
                return
            server = started[0]
            self.section("agreement", lambda: self.agreement(server))
            self.section("service", lambda: self.service(server))
            self.section("latency_1000", lambda: self.latency_1000(server))

    def save(self) -> None:
        out = self.args.out
        (out / RESULTS).write_text(render(self.record))
        (out / SCORES).write_text(json.dumps(self.raw_scores) + "\n")


def _state(section: dict[str, Any]) -> str | None:
    if "error" in section:
        return f"**failed**: {section['error']}"
    if "skipped" in section:
        return f"**skipped**: {section['skipped']}"
    return None


def render(record: dict[str, Any]) -> str:
    """The results as markdown: tables for a reader, then every figure as JSON."""
    env = record["environment"]
    lines = [
        f"# crossrank GPU check ({env['date']})",
        "",
        f"- Command: `{env['command']}` at commit {env['git_commit'] or 'unknown'}",
        f"- GPU: {env['gpu'] or 'none seen by nvidia-smi'}; CPU: {env['cpu']}",
        f"- onnxruntime {env['onnxruntime']} ({', '.join(env['providers'])}), "
        f"Python {env['python']}; model {env['model']}",
        f"- Workload: passages of {env['workload']['passages']}, queries of "
        f"{env['workload']['queries']}, seeds {env['workload']['seeds']}",
    ]
    if env["install_s"] is not None:
        lines.append(f"- Install (the wrapper's pip step): {env['install_s']:.0f} s")

    def heading(title: str, name: str) -> dict[str, Any] | None:
        lines.extend(["", f"## {title}", ""])
        section = record.get(name)
        if section is None:
            lines.append("not reached")
            return None
        state = _state(section)
        if state:
            lines.append(state)
            return None
        return section

    preflight = heading("Preflight: one pair through the engine, in the kit's process", "preflight")
    if preflight is not None:
        lines.append(f"{preflight['variant']} on {preflight['provider']}")
    reference, server = heading("Servers", "reference"), record.get("server", {})
    if reference is not None:
        lines += ["| server | variant | provider | |", "|---|---|---|---|"]
        for label, info in reference.items():
            lines.append(f"| {label} | {info['variant']} | {info['provider']} | reference |")
        state = _state(server) if server else "not reached"
        if state:
            lines.append(f"| {env['device']} | | | {state} |")
        else:
            lines.append(
                f"| {env['device']} | {server['variant']} | {server['provider']} | candidate |"
            )
    agreement = heading("Ranking agreement (raw logits)", "agreement")
    if agreement is not None:
        lines += [
            f"{agreement['requests']} requests of {agreement['passages']} passages; each "
            "figure a mean over requests (worst request after the slash). Gates: the export's.",
            "",
            "| candidate | reference | kind | top-10 overlap | Kendall τ | max abs Δ | "
            "mean abs Δ | gate (overlap, τ) | |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in agreement["comparisons"]:
            lines.append(
                f"| {c['candidate']} | {c['reference']} | {c['kind']} | "
                f"{c['top10_overlap']:.3f} / {c['worst_top10_overlap']:.3f} | "
                f"{c['kendall_tau']:.4f} / {c['worst_kendall_tau']:.4f} | "
                f"{c['max_abs_diff']:.2e} | {c['mean_abs_diff']:.2e} | "
                f"≥ {c['gate']['min_top10_overlap']}, ≥ {c['gate']['min_kendall_tau']} | "
                f"{'**met**' if c['met'] else '**missed**'} |"
            )
    service = heading("Service: closed loop over loopback", "service")
    if service is not None:
        lines += [
            f"{service['passages_per_request']}-passage requests.",
            "",
            "| clients | requests | pairs/s | p50 s | p95 s | p99 s | 503s retried |",
            "|---|---|---|---|---|---|---|",
        ]
        for v in service["levels"]:
            lines.append(
                f"| {v['clients']} | {v['requests']} | {v['pairs_per_s']:.0f} | "
                f"{v['p50_s']:.3f} | {v['p95_s']:.3f} | {v['p99_s']:.3f} | {v['refusals']} |"
            )
    long = heading("Long requests, one at a time", "latency_1000")
    if long is not None:
        lines += [
            "| passages | requests | median s | min s | max s | pairs/s at the median |",
            "|---|---|---|---|---|---|",
            f"| {long['passages']} | {long['requests']} | {long['median_s']:.3f} | "
            f"{long['min_s']:.3f} | {long['max_s']:.3f} | {long['pairs_per_s_at_median']:.0f} |",
        ]
    engine = heading("Engine: max_batch_tokens sweep", "engine")
    if engine is not None:
        lines += [
            f"The bare engine, {engine['variant']}, {engine['pairs']} pairs of one request "
            f"(mean {engine['mean_tokens']:.0f} tokens), length-sorted; median of "
            f"{engine['repeats']} passes. TFLOP/s count real tokens only.",
            "",
            "| max_batch_tokens | pairs/s | ms per 1,000 pairs | padding eff. | TFLOP/s |",
            "|---|---|---|---|---|",
        ]
        for p in engine["points"]:
            lines.append(
                f"| {p['max_batch_tokens']} | {p['pairs_per_s']:.0f} | "
                f"{1e6 / p['pairs_per_s']:.1f} | {p['padding_efficiency']:.3f} | "
                f"{p['tflops']:.2f} |"
            )
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in record["timings_s"].items())
    total = record.get("total_s")
    lines += ["", "## Timings", "", f"{timings}; total {total:.0f} s" if total else timings]
    lines += ["", "## Every figure", "", "```json", json.dumps(record, indent=1), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The wrapper's time limit sends SIGTERM: unwind, so the servers are stopped and the
    # results of the finished sections stay written.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    code = Kit(args).run()
    print(f"wrote {args.out / RESULTS} (exit status {code})", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
