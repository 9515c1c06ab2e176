"""Scoring a model directory in the batches the service itself forms (as `crossrank eval` does):
int8 activations are quantised per batch, so only those batches give the scores the service
returns."""

from __future__ import annotations

import numpy as np
import pytest
from support import run_server

from crossrank.core.scheduling import BatchLimits
from crossrank.model.collate import PaddedBatch
from crossrank.model.model_dir import ModelDir
from crossrank_train.scoring import OnnxScorer, load_scorer, served_batches, served_limits

QUERY = "blue sky over water"
# Lengths from a few tokens to many, so that a small token budget cuts several batches.
PASSAGES = [" ".join(["water fire earth and the blue sky"] * n) for n in (1, 5, 2, 9, 3, 1, 6)]


def test_served_batches_cut_longest_first_by_the_token_and_pair_limits() -> None:
    limits = BatchLimits(max_batch_tokens=100, max_batch_pairs=3, max_wait_s=0.0, aging_s=1.0)
    lengths = [10, 50, 30, 20, 40, 120, 5, 5]

    # 120 is over the budget and runs alone; 50 + 40 fill 100; three pairs is the pair limit.
    assert list(served_batches(lengths, limits)) == [[5], [1, 4], [2, 3, 0], [6, 7]]


def test_as_served_scores_are_the_services_batches_and_scores(model_dir: ModelDir) -> None:
    budget = 160
    served: list[np.ndarray] = []

    def record(batch: PaddedBatch) -> bool:
        served.append(batch.input_ids.copy())
        return False  # the hook that could fail a batch only watches here

    with run_server(model_dir, gated=True, max_batch_tokens=budget, max_wait_ms=0) as srv:
        srv.wait_ready()
        assert srv.engine is not None
        srv.engine.fail_when = record
        with srv.client() as c:
            body = c.post(
                "/rerank", json={"query": QUERY, "passages": PASSAGES, "raw_scores": True}
            ).json()
    service_scores = {r["index"]: r["score"] for r in body["results"]}

    limits = BatchLimits(max_batch_tokens=budget, max_batch_pairs=128, max_wait_s=0, aging_s=1)
    scorer = OnnxScorer.from_model_dir(model_dir.path, "fp32", limits)
    ran: list[np.ndarray] = []
    run = scorer.engine.run

    def recording_run(batch: PaddedBatch) -> np.ndarray:
        ran.append(batch.input_ids.copy())
        return run(batch)

    scorer.engine.run = recording_run  # type: ignore[method-assign]
    scores = scorer.score(QUERY, PASSAGES)

    # The same pairs, in the same rows, in the same batches: what makes int8 scores equal too
    # (the tiny model is fp32, whose scores would agree under any batching).
    assert len(served) > 1
    assert [b.tolist() for b in ran] == [b.tolist() for b in served]
    assert scores.tolist() == pytest.approx([service_scores[i] for i in range(len(PASSAGES))])


def test_eval_scores_model_directories_in_the_cpu_services_batches(model_dir: ModelDir) -> None:
    scorer = load_scorer(model_dir.path)

    assert isinstance(scorer, OnnxScorer)
    assert scorer.limits == served_limits()
    assert (served_limits().max_batch_tokens, served_limits().max_batch_pairs) == (1024, 128)
