"""The commands end to end on generated BEIR/TREC files: mine, train, export, calibrate, eval."""

from __future__ import annotations

import json
import random
from pathlib import Path

from toy_data import FILLER, GRADED_LEVELS, MARKER

from crossrank.model.model_dir import load_model_dir
from crossrank_train.cli import main
from crossrank_train.groups import read_groups

QUERIES = 6
RELEVANT_FROM = GRADED_LEVELS - 3  # the three passages saying the marker most are relevant


def _write_collection(root: Path) -> dict[str, Path]:
    """Per query, passages saying the marker 0..14 times; a run that lists them worst first."""
    rng = random.Random(7)
    corpus, queries, qrels, run = [], [], ["query-id\tcorpus-id\tscore"], []
    for q in range(QUERIES):
        queries.append({"_id": f"q{q}", "text": " ".join(rng.sample(FILLER, 3))})
        for grade in range(GRADED_LEVELS):
            words = rng.sample(FILLER, 8) + [MARKER] * grade
            rng.shuffle(words)
            corpus.append({"_id": f"q{q}-d{grade}", "text": " ".join(words)})
            if grade >= RELEVANT_FROM:
                qrels.append(f"q{q}\tq{q}-d{grade}\t1")
            run.append(f"q{q} Q0 q{q}-d{grade} {grade + 1} {100 - grade} reversed")
    paths = {name: root / name for name in ("corpus.jsonl", "queries.jsonl", "qrels.tsv", "run")}
    paths["corpus.jsonl"].write_text("".join(json.dumps(r) + "\n" for r in corpus))
    paths["queries.jsonl"].write_text("".join(json.dumps(r) + "\n" for r in queries))
    paths["qrels.tsv"].write_text("\n".join(qrels) + "\n")
    paths["run"].write_text("\n".join(run) + "\n")
    return paths


def test_mine_train_export_eval(graded_checkpoint: Path, tmp_path: Path) -> None:
    files = _write_collection(tmp_path)
    data = ["--queries", str(files["queries.jsonl"]), "--qrels", str(files["qrels.tsv"])]
    data += ["--corpus", str(files["corpus.jsonl"])]
    groups = tmp_path / "groups.jsonl"
    out = tmp_path / "run-out"
    model_dir = tmp_path / "model-dir"
    results = tmp_path / "results.json"

    assert (
        main(
            [
                "mine",
                *data,
                "--out",
                str(groups),
                "--negatives",
                "3",
                "--window",
                "0",
                "20",
                "--teacher",
                str(graded_checkpoint),
            ]
        )
        == 0
    )
    assert len(read_groups(groups, negatives=3)) == QUERIES * 3

    # The dev set is the first two queries: their groups are left out of training.
    dev = [f"--dev-{flag[2:]}" if flag.startswith("--") else flag for flag in data]
    dev += ["--dev-max-queries", "2"]
    assert (
        main(
            [
                "train",
                "--model",
                str(graded_checkpoint),
                "--groups",
                str(groups),
                "--out",
                str(out),
                "--loss",
                "margin-mse",
                "--negatives",
                "3",
                "--steps",
                "4",
                "--lr",
                "1e-6",
                "--eval-every",
                "2",
                "--dev-run",
                str(files["run"]),
                *dev,
            ]
        )
        == 0
    )
    history = json.loads((out / "history.json").read_text())
    assert len(history["losses"]) == 4
    assert [step for step, _ in history["dev_ndcg@10"]] == [2, 4]
    assert (out / "report.png").stat().st_size > 0

    evals = [f"--eval-{flag[2:]}" if flag.startswith("--") else flag for flag in data]
    assert (
        main(
            [
                "export",
                "--model",
                str(out / "final"),
                "--out",
                str(model_dir),
                "--name",
                "toy",
                "--eval-run",
                str(files["run"]),
                *evals,
            ]
        )
        == 0
    )
    meta = load_model_dir(model_dir).metadata
    assert sorted(meta.variants) == ["fp16", "fp32", "int8"]
    assert set(meta.training["export"]["metrics"]) == {"fp32", "int8", "fp16"}
    assert meta.training["data"] == str(groups)
    assert meta.training["training_groups"] == (QUERIES - 2) * 3
    # The export fitted a calibration per variant on its judged sample, each on its own logits.
    assert sorted(meta.calibrations) == ["fp16", "fp32", "int8"] and meta.calibration is None
    assert {fit.variant for fit in meta.calibrations.values()} == {"fp16", "fp32", "int8"}
    assert meta.calibrations["int8"].pairs == QUERIES * GRADED_LEVELS
    assert meta.calibrations["int8"].slope != meta.calibrations["fp32"].slope

    onnx = {f.name: f.read_bytes() for f in model_dir.glob("*.onnx")}
    diagram = tmp_path / "reliability.png"
    heldout = [f"--heldout-{flag[2:]}" if flag.startswith("--") else flag for flag in data]
    calibrate = ["calibrate", str(model_dir), *evals, "--eval-run", str(files["run"])]
    assert main([*calibrate, *heldout, "--bins", "5", "--diagram", str(diagram)]) == 0
    refit = load_model_dir(model_dir).metadata.calibrations["int8"]
    assert refit.slope > 0
    # The data set's files under the folder they share, not this machine's paths.
    assert refit.fitted_on.startswith(f"{files['run'].parent.name}: queries.jsonl + ")
    assert "run top 100" in refit.fitted_on and str(tmp_path) not in refit.fitted_on
    assert 0 <= refit.report["heldout"]["ece_5_bins"] <= 1
    assert diagram.read_bytes()[:4] == b"\x89PNG"
    assert {f.name: f.read_bytes() for f in model_dir.glob("*.onnx")} == onnx

    assert (
        main(
            [
                "eval",
                *data,
                "--run",
                str(files["run"]),
                "--model",
                str(model_dir),
                "--model",
                str(out / "final"),
                "--bi-encoder",
                str(graded_checkpoint),
                "--out",
                str(results),
            ]
        )
        == 0
    )
    rows = json.loads(results.read_text())["rows"]
    names = ["run", f"bi-encoder {graded_checkpoint.name}", "toy (int8)", str(out / "final")]
    assert [r["name"] for r in rows] == names
    first_stage, _, int8, checkpoint = rows
    assert first_stage["nDCG@10"] < 0.5
    # The cross-encoder counts markers: the relevant passages go to the top.
    assert int8["nDCG@10"] > 0.95 and checkpoint["nDCG@10"] > 0.95

    # The same judgements as a query/positives/negatives file whose pids name corpus passages.
    pairs = tmp_path / "pairs.jsonl"
    qrels = [line.split("\t") for line in files["qrels.tsv"].read_text().splitlines()[1:]]
    queries = [json.loads(line) for line in files["queries.jsonl"].read_text().splitlines()]
    pairs.write_text(
        "".join(
            json.dumps(
                {
                    "id": q["_id"],
                    "query": q["text"],
                    "positive_pids": [pid for qid, pid, _ in qrels if qid == q["_id"]],
                }
            )
            + "\n"
            for q in queries
        )
    )
    from_pairs = tmp_path / "from-pairs.json"
    source = ["--pairs", str(pairs), "--corpus", str(files["corpus.jsonl"])]
    args = [*source, "--run", str(files["run"]), "--model", str(model_dir), "--out"]
    assert main(["eval", *args, str(from_pairs)]) == 0
    assert json.loads(from_pairs.read_text())["rows"] == rows[:1] + rows[2:3]
