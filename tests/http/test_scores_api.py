"""Scores a client can threshold: a calibrated model's probabilities over HTTP (rank unchanged,
raw_scores the logit), GET /info saying what scores mean, min_score on both APIs, and the
Cohere route's instruction extension."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from support import RunningServer, run_server

from crossrank.model.model_dir import (
    METADATA_FILE,
    Calibration,
    ModelDir,
    ModelDirError,
    load_model_dir,
    write_calibration,
)

QUERY = "what is the capital of france"
PASSAGES = [
    "paris is the capital of france",
    "the cat sat on the mat",
    "the river runs to the sea",
    "france is a country and paris a city",
    "blue sky red fire green water",
    "a query and a passage",
]
CALIBRATION = Calibration(
    slope=4.0, intercept=-0.5, fitted_on="a test's own numbers", variant="fp32", pairs=10,
    positives=3,
)  # fmt: skip


@pytest.fixture(scope="module")
def calibrated(model_dir: ModelDir, tmp_path_factory: pytest.TempPathFactory) -> ModelDir:
    copy = tmp_path_factory.mktemp("calibrated") / "model"
    shutil.copytree(model_dir.path, copy)
    return write_calibration(copy, CALIBRATION)


@pytest.fixture(scope="module")
def calibrated_server(calibrated: ModelDir) -> Iterator[RunningServer]:
    with run_server(calibrated, max_wait_ms=5) as running:
        running.wait_ready()
        yield running


def test_write_calibration_changes_only_its_key(model_dir: ModelDir, calibrated: ModelDir) -> None:
    before = model_dir.metadata.model_dump()
    after = load_model_dir(calibrated.path).metadata.model_dump()
    assert after.pop("calibrations") == {"fp32": CALIBRATION.model_dump()}
    assert before.pop("calibrations") == {}
    assert after == before
    for onnx in model_dir.path.glob("*.onnx"):
        assert (calibrated.path / onnx.name).read_bytes() == onnx.read_bytes()


def test_calibrated_scores_are_probabilities_in_the_logits_order(
    calibrated_server: RunningServer,
) -> None:
    with calibrated_server.client() as c:
        scored = c.post("/rerank", json={"query": QUERY, "passages": PASSAGES}).json()
        raw = c.post("/rerank", json={"query": QUERY, "passages": PASSAGES, "raw_scores": True})
        cohere = c.post("/v1/rerank", json={"query": QUERY, "documents": PASSAGES}).json()
    raw = raw.json()
    assert [r["index"] for r in scored["results"]] == [r["index"] for r in raw["results"]]
    assert [r["index"] for r in cohere["results"]] == [r["index"] for r in raw["results"]]
    logits = np.array([r["score"] for r in raw["results"]], dtype=np.float32)
    want = CALIBRATION.probability(logits)
    assert [r["score"] for r in scored["results"]] == pytest.approx(want.tolist(), abs=1e-6)
    assert [r["relevance_score"] for r in cohere["results"]] == pytest.approx(want.tolist())
    assert all(0.0 <= r["score"] <= 1.0 for r in scored["results"])
    # The calibration, not the model's plain sigmoid, made them.
    assert not np.allclose(want, 1.0 / (1.0 + np.exp(-logits.astype(np.float64))), atol=1e-3)


def test_info_says_whether_scores_are_calibrated(
    server: RunningServer, calibrated_server: RunningServer
) -> None:
    with calibrated_server.client() as c:
        calibrated = c.get("/info").json()
        assert "/info" in c.get("/openapi.json").json()["paths"]
    with server.client() as c:
        plain = c.get("/info").json()
    assert calibrated["calibrated"] is True
    assert calibrated["calibration"]["fitted_on"] == CALIBRATION.fitted_on
    assert "calibrated probability" in calibrated["score"]
    assert plain["calibrated"] is False and plain["calibration"] is None
    assert "not calibrated" in plain["score"]
    assert plain["model"] == "tiny-test-bert" and plain["max_length"] == 128


def test_uncalibrated_model_keeps_the_sigmoid(server: RunningServer) -> None:
    with server.client() as c:
        scored = c.post("/rerank", json={"query": QUERY, "passages": PASSAGES}).json()
        raw = c.post("/rerank", json={"query": QUERY, "passages": PASSAGES, "raw_scores": True})
    logits = np.array([r["score"] for r in raw.json()["results"]])
    sigmoid = 1.0 / (1.0 + np.exp(-logits))
    assert [r["score"] for r in scored["results"]] == pytest.approx(sigmoid.tolist(), abs=1e-6)


@pytest.mark.parametrize("raw_scores", [False, True])
def test_min_score_drops_results_below_it(
    calibrated_server: RunningServer, raw_scores: bool
) -> None:
    body = {"query": QUERY, "passages": PASSAGES, "raw_scores": raw_scores}
    with calibrated_server.client() as c:
        full = c.post("/rerank", json=body).json()["results"]
        scores = [r["score"] for r in full]
        # A threshold between the 2nd and 3rd best: exactly the top two pass.
        threshold = (scores[1] + scores[2]) / 2
        kept = c.post("/rerank", json=body | {"min_score": threshold}).json()
        at = c.post("/rerank", json=body | {"min_score": scores[2]}).json()["results"]
        capped = c.post("/rerank", json=body | {"min_score": threshold, "top_k": 1}).json()
        none = c.post("/rerank", json=body | {"min_score": scores[0] + 1}).json()
        cohere = c.post(
            "/v1/rerank",
            json={"query": QUERY, "documents": PASSAGES, "min_score": threshold},
        ).json()
    assert kept["results"] == full[:2]
    assert at == full[:3]  # at least min_score passes
    assert capped["results"] == full[:1]
    assert none["results"] == [] and none["usage"]["pairs"] == len(PASSAGES)
    if not raw_scores:
        assert [r["index"] for r in cohere["results"]] == [r["index"] for r in full[:2]]


@pytest.mark.parametrize("value", ["0.5", None, True, "nan"])
def test_min_score_must_be_a_finite_number(server: RunningServer, value: object) -> None:
    with server.client() as c:
        if value == "nan":
            r = c.post(
                "/rerank",
                content=b'{"query": "q", "passages": ["p"], "min_score": NaN}',
                headers={"content-type": "application/json"},
            )
        else:
            r = c.post("/rerank", json={"query": "q", "passages": ["p"], "min_score": value})
    if value is None:
        assert r.status_code == 200
        return
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] in ("min_score", "body")


def test_cohere_route_takes_an_instruction(server: RunningServer) -> None:
    with server.client() as c:
        r = c.post(
            "/v1/rerank", json={"query": QUERY, "documents": PASSAGES, "instruction": "judge"}
        )
    # The tiny BERT's pairs have no place for one: the same 422 as on /rerank, naming it.
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "instruction"


def test_calibrated_model_dir_round_trips(calibrated: ModelDir, tmp_path: Path) -> None:
    assert load_model_dir(calibrated.path).metadata.calibration_for("fp32") == CALIBRATION


def test_a_fit_per_variant_and_the_single_fit_of_older_directories(
    model_dir: ModelDir, tmp_path: Path
) -> None:
    copy = tmp_path / "model"
    shutil.copytree(model_dir.path, copy)
    meta_file = copy / METADATA_FILE
    raw = json.loads(meta_file.read_text())
    older = CALIBRATION.model_copy(update={"variant": "int8"})
    raw["calibration"] = older.model_dump(mode="json")
    meta_file.write_text(json.dumps(raw))
    # An older directory's one fit serves whatever variant runs (its variant says which).
    assert load_model_dir(copy).metadata.calibration_for("fp32") == older
    meta = write_calibration(copy, CALIBRATION).metadata
    assert meta.calibration is None
    assert meta.calibrations == {"int8": older, "fp32": CALIBRATION}
    assert meta.calibration_for("fp32") == CALIBRATION
    assert meta.calibration_for("int8") == older
    raw = json.loads(meta_file.read_text())
    raw["calibrations"]["fp16"] = raw["calibrations"]["fp32"]
    meta_file.write_text(json.dumps(raw))
    with pytest.raises(ModelDirError, match="fitted on 'fp32'"):
        load_model_dir(copy)


def test_info_says_when_the_fit_is_another_variants(model_dir: ModelDir, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(model_dir.path, copy)
    write_calibration(copy, CALIBRATION.model_copy(update={"variant": "int8"}))
    with run_server(load_model_dir(copy)) as srv:
        srv.wait_ready()
        with srv.client() as c:
            info = c.get("/info").json()
    assert info["variant"] == "fp32" and info["calibration"]["variant"] == "int8"
    assert "not on the fp32 served" in info["score"]
