"""The long-document eval scores as the service does: chunk first = truncate, and a passage that
fits one window scores the same whichever way."""

from __future__ import annotations

import numpy as np
import pytest

from crossrank.features.chunking import Aggregation
from crossrank.model.engine import CPU, OnnxEngine, plan_session
from crossrank.model.model_dir import ModelDir
from crossrank.model.tokenization import PairTokenizer
from crossrank_train.long_eval import WindowScorer

QUERY = "capital of france"
SHORT = "paris is the capital of france"
LONG = " ".join(["the blue sky over the river and the city"] * 30) + " paris is the capital"


def test_window_scorers_agree_where_they_must(model_dir: ModelDir) -> None:
    engine = OnnxEngine(model_dir.variant_path("fp32"), plan_session("cpu", [CPU]))
    tokenizer = PairTokenizer(model_dir.tokenizer_path, 16, 64)
    chunking = (tokenizer.windows(8), 20)
    truncate = WindowScorer(engine, tokenizer, "truncate", None, None).score(QUERY, [SHORT, LONG])
    scored = {
        how: WindowScorer(engine, tokenizer, how.value, chunking, how).score(QUERY, [SHORT, LONG])
        for how in Aggregation
    }
    for how in Aggregation:
        assert scored[how][0] == pytest.approx(truncate[0], abs=1e-5)
    assert scored[Aggregation.FIRST][1] == pytest.approx(truncate[1], abs=1e-5)
    assert scored[Aggregation.MAX][1] >= scored[Aggregation.MEAN][1] - 1e-6
    windows = chunking[0].encode(QUERY, [LONG], chunking[1]).pairs
    assert len(windows) > 3
    assert not np.isclose(scored[Aggregation.MAX][1], scored[Aggregation.FIRST][1])
