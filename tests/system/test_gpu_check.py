"""The GPU check kit (bench/gpu_check.py, deploy/gpu-check.sh) run for real on CPU with the tiny
model, so that the code a GPU session will run first cannot rot: its wrapper (minus the wheel
install), every section, the results file, and the agreement metrics on a perfect and on a
perturbed comparison."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import kendalltau
from support import WORDS

from bench import gpu_check
from bench.gpu_requirements import kit_requirements
from bench.ranking_agreement import (
    THRESHOLDS,
    kendall_tau_b,
    ranking_agreement,
    thresholds_for,
)
from crossrank.model.model_dir import ModelDir
from crossrank_train.agreement import THRESHOLDS as EXPORT_GATES

ROOT = Path(__file__).resolve().parents[2]
WRAPPER = ROOT / "deploy" / "gpu-check.sh"
SIZES = [
    "--agree-requests", "3", "--agree-passages", "30",
    "--clients", "1", "2", "--requests", "4", "--passages-per-request", "20",
    "--long-passages", "100", "--long-requests", "2",
    "--engine-pairs", "60", "--sweep", "256", "1024", "--repeats", "1",
    "--threads", "2", "--shape", "32", "64", "2",
]  # fmt: skip


def write_workload(folder: Path) -> tuple[Path, Path]:
    rng = random.Random(0)
    passages, queries = folder / "passages.txt", folder / "queries.tsv"
    passages.write_text(
        "".join(" ".join(rng.choices(WORDS, k=rng.randint(3, 40))) + "\n" for _ in range(300))
    )
    queries.write_text(
        "".join(f"q{i}\t{' '.join(rng.choices(WORDS, k=rng.randint(2, 5)))}\n" for i in range(20))
    )
    return passages, queries


def options(**given: object) -> list[str]:
    """``name=value`` as the wrapper's ``--name value``."""
    return [a for k, v in given.items() for a in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def kit_run(model_dir: ModelDir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole kit through its wrapper, --device cpu, with the test venv as the kit's venv."""
    folder = tmp_path_factory.mktemp("gpu-check")
    passages, queries = write_workload(folder)
    out = folder / "out"
    given = options(
        device="cpu", venv=sys.prefix, model=model_dir.path, passages=passages, queries=queries
    )
    done = subprocess.run(
        ["bash", str(WRAPPER), *given, "--out", str(out), "--", *SIZES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every section ran and every comparison met its gate" in done.stdout
    return out


def figures(out: Path) -> dict:
    text = (out / gpu_check.RESULTS).read_text()
    block = re.search(r"```json\n(.*)\n```", text, re.DOTALL)
    assert block, text
    return json.loads(block.group(1))


def test_every_section_has_sane_figures(kit_run: Path) -> None:
    record = figures(kit_run)
    for name in gpu_check.SECTIONS:
        assert "error" not in record[name] and "skipped" not in record[name], record[name]
    assert record["reference"]["cpu/fp32"]["provider"] == "CPUExecutionProvider"
    assert record["server"]["variant"] == "fp32"
    assert record["environment"]["device"] == "cpu"
    levels = record["service"]["levels"]
    assert [v["clients"] for v in levels] == [1, 2]
    for level in levels:
        assert level["pairs_per_s"] > 0
        assert 0 < level["p50_s"] <= level["p95_s"] <= level["p99_s"]
    long = record["latency_1000"]
    assert long["requests"] == 2 and 0 < long["min_s"] <= long["median_s"] <= long["max_s"]
    points = record["engine"]["points"]
    assert [p["max_batch_tokens"] for p in points] == [256, 1024]
    for p in points:
        assert p["pairs_per_s"] > 0 and p["tflops"] > 0 and 0 < p["padding_efficiency"] <= 1
    assert record["total_s"] > 0
    text = (kit_run / gpu_check.RESULTS).read_text()
    for title in (
        "Preflight",
        "Servers",
        "Ranking agreement",
        "Service",
        "Long requests",
        "Engine",
    ):
        assert f"## {title}" in text


def test_a_model_agrees_perfectly_with_itself(kit_run: Path) -> None:
    (comparison,) = figures(kit_run)["agreement"]["comparisons"]
    assert comparison["reference"] == "cpu/fp32" and comparison["candidate"] == "cpu/fp32"
    assert comparison["kind"] == "same variant, as served"
    assert comparison["queries"] == 3
    assert comparison["top10_overlap"] == comparison["worst_top10_overlap"] == 1.0
    assert comparison["kendall_tau"] == pytest.approx(1.0)
    assert comparison["max_abs_diff"] < 1e-4
    assert comparison["met"]


def test_raw_scores_reproduce_the_figures_and_a_perturbation_is_caught(kit_run: Path) -> None:
    raw = json.loads((kit_run / gpu_check.SCORES).read_text())
    reference = [np.array(s) for s in raw["cpu/fp32"]]
    assert [len(s) for s in reference] == [30, 30, 30]
    assert all(np.isfinite(s).all() and np.ptp(s) > 0 for s in reference)
    again = ranking_agreement(reference, [np.array(s) for s in raw["cpu/fp32"]])
    reported = figures(kit_run)["agreement"]["comparisons"][0]
    assert again.top10_overlap == reported["top10_overlap"]
    # Swap each list's best passage with its 15th: the top 10 loses one, tau drops, and the
    # largest difference is the gap between those two scores.
    perturbed = []
    for scores in reference:
        order = np.argsort(-scores)
        swapped = scores.copy()
        swapped[order[0]], swapped[order[14]] = scores[order[14]], scores[order[0]]
        perturbed.append(swapped)
    found = ranking_agreement(reference, perturbed)
    assert found.top10_overlap == found.worst_top10_overlap == pytest.approx(0.9)
    # The 13 passages between the two each swap order with both, and the two with each other:
    # 27 of the 435 pairs discordant.
    assert found.kendall_tau == pytest.approx(1 - 2 * 27 / 435)
    gaps = [s[np.argsort(-s)[0]] - s[np.argsort(-s)[14]] for s in reference]
    assert found.max_abs_diff == pytest.approx(max(gaps))
    assert not found.meets(THRESHOLDS["fp16"])
    reversed_order = ranking_agreement(reference, [-s for s in reference])
    assert reversed_order.kendall_tau == pytest.approx(-1.0)
    assert reversed_order.top10_overlap == 0.0
    assert not reversed_order.meets(THRESHOLDS["int8"])


def run_kit(model_dir: ModelDir, folder: Path, *args: str) -> subprocess.CompletedProcess:
    passages, queries = write_workload(folder)
    given = options(model=model_dir.path, passages=passages, queries=queries, out=folder / "out")
    return subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", *given, *SIZES, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_without_cuda_the_preflight_says_so_and_nothing_else_runs(
    model_dir: ModelDir, tmp_path: Path
) -> None:
    done = run_kit(model_dir, tmp_path, "--device", "cuda")
    assert done.returncode == gpu_check.INCOMPLETE, done.stderr
    record = figures(tmp_path / "out")
    assert "no CUDAExecutionProvider" in record["preflight"]["error"]
    for name in gpu_check.SECTIONS[1:]:
        assert "preflight" in record[name]["skipped"]
    assert "**failed**: EngineConfigError" in (tmp_path / "out" / gpu_check.RESULTS).read_text()


def test_no_section_starts_past_the_budget(model_dir: ModelDir, tmp_path: Path) -> None:
    done = run_kit(model_dir, tmp_path, "--device", "cpu", "--budget-s", "0")
    assert done.returncode == gpu_check.INCOMPLETE, done.stderr
    record = figures(tmp_path / "out")
    assert "budget" in record["preflight"]["skipped"]
    assert not list((tmp_path / "out").glob("server-*.log"))


def test_numpy_tau_b_equals_scipy_with_and_without_ties() -> None:
    rng = np.random.default_rng(0)
    for n in (2, 7, 100, 400):
        x = rng.normal(size=n)
        y = x + rng.normal(scale=0.5, size=n)
        assert kendall_tau_b(x, y) == pytest.approx(kendalltau(x, y).statistic, abs=1e-12)
    for n in (7, 100, 400):
        x = rng.normal(size=n)
        tied_x, tied_y = np.round(x), np.round((x + rng.normal(scale=0.5, size=n)) * 2) / 2
        assert kendall_tau_b(tied_x, tied_y) == pytest.approx(
            kendalltau(tied_x, tied_y).statistic, abs=1e-12
        )
    assert np.isnan(kendall_tau_b(np.ones(5), np.arange(5.0)))


def test_gates_are_the_exports() -> None:
    for variant, gate in EXPORT_GATES.items():
        assert THRESHOLDS[variant].min_top10_overlap == gate.min_top10_overlap
        assert THRESHOLDS[variant].min_kendall_tau == gate.min_kendall_tau
    assert thresholds_for("fp16", "int8") == THRESHOLDS["int8"]
    assert thresholds_for("fp16", "fp16") == THRESHOLDS["fp16"]


def test_the_kit_installs_onnxruntime_gpu_never_the_cpu_wheel() -> None:
    requirements = kit_requirements()
    names = [re.split(r"[\[<>=]", r)[0] for r in requirements]
    assert "onnxruntime" not in names
    assert {"onnxruntime-gpu", "fastapi", "uvicorn", "tokenizers", "httpx"} <= set(names)
    printed = subprocess.run(
        [sys.executable, "-m", "bench.gpu_requirements"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert printed == requirements


def test_the_wrapper_says_what_is_missing(tmp_path: Path) -> None:
    passages, queries = write_workload(tmp_path)
    files = options(passages=passages, queries=queries)
    cases = [
        (["--device", "cpu"], "--passages and --queries are required"),
        (["--bogus"], "unknown option --bogus"),
        (["--wheels"], "--wheels needs a value"),
        ([*files, "--device", "tpu"], "--device is cuda or cpu"),
        ([*files, "--wheels", str(tmp_path / "nowhere")], "is not a directory"),
        (options(passages=tmp_path / "none", queries=queries), "no such file"),
        ([*files, "--device", "cpu", "--venv", str(tmp_path / "none")], "no venv at"),
    ]
    for args, message in cases:
        done = subprocess.run(
            ["bash", str(WRAPPER), *args], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr, (args, done.stderr)
    usage = subprocess.run(["bash", str(WRAPPER), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "--wheels DIR" in usage.stdout
    assert "set -euo" not in usage.stdout


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_the_wrapper_is_shellcheck_clean() -> None:
    subprocess.run(["shellcheck", str(WRAPPER)], check=True)
