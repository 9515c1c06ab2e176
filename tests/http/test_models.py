"""Several models in one server: each scores as it does alone, names and aliases route, an
unknown name is a 404 listing the names, readiness waits for every model and a drain covers
them all; a bad catalog stops the server with the culprit named."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from support import RunningServer, build_model_dir, metric, run_server, wait_for

from crossrank.core.errors import ErrorType
from crossrank.core.service import ModelConfigError, catalog
from crossrank.model.model_dir import ModelDir
from crossrank.ops.settings import Settings

QUERY = "the capital of france"
PASSAGES = ["a cat on a mat", "paris is the capital of france", "blue sky", "the river"]


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> ModelDir:
    """A second tiny model: other weights, so its scores differ from the first's."""
    return build_model_dir(tmp_path_factory.mktemp("other-model"), seed=1, name="tiny-other")


def models_file(tmp_path: Path, models: list[dict]) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": models}))
    return path


@pytest.fixture(scope="module")
def two(model_dir: ModelDir, other_model: ModelDir, tmp_path_factory) -> Iterator[RunningServer]:
    listing = models_file(
        tmp_path_factory.mktemp("catalog"),
        [
            {"path": str(model_dir.path), "name": "alpha", "aliases": ["rerank-v3.5"]},
            # Its own admission bound, to see a per-model setting take effect.
            {
                "path": str(other_model.path),
                "name": "beta",
                "default": True,
                "max_queued_pairs": 3000,
            },
        ],
    )
    with run_server(model_dir, model=[], models_file=listing) as srv:
        srv.wait_ready()
        yield srv


def scores(srv: RunningServer, model: str | None = None, path: str = "/rerank") -> list[float]:
    body: dict = {"query": QUERY, "passages": PASSAGES}
    if path != "/rerank":
        body = {"query": QUERY, "documents": PASSAGES}
    if model is not None:
        body["model"] = model
    with srv.client() as c:
        r = c.post(path, json=body)
    assert r.status_code == 200, r.text
    results = sorted(r.json()["results"], key=lambda x: x["index"])
    return [x.get("score", x.get("relevance_score")) for x in results]


def alone(model: ModelDir) -> list[float]:
    with run_server(model) as srv:
        srv.wait_ready()
        return scores(srv)


def test_each_model_scores_as_it_does_alone(
    two: RunningServer, model_dir: ModelDir, other_model: ModelDir
) -> None:
    a, b = alone(model_dir), alone(other_model)
    assert a != pytest.approx(b)
    assert scores(two, "alpha") == pytest.approx(a, abs=1e-6)
    assert scores(two, "beta") == pytest.approx(b, abs=1e-6)
    # An alias, on the Cohere route; no name: the default.
    assert scores(two, "rerank-v3.5", "/v1/rerank") == pytest.approx(a, abs=1e-6)
    assert scores(two) == pytest.approx(b, abs=1e-6)
    with two.client() as c:
        answer = c.post("/rerank", json={"query": QUERY, "passages": PASSAGES, "model": "alpha"})
    assert answer.json()["model"] == "alpha"


def test_an_unknown_model_is_a_404_listing_the_names(two: RunningServer) -> None:
    with two.client() as c:
        for path, items in (("/rerank", "passages"), ("/v1/rerank", "documents")):
            r = c.post(path, json={"query": QUERY, items: PASSAGES, "model": "nope"})
            assert r.status_code == 404
            error = r.json()["error"]
            assert error["type"] == "model_not_found" and error["field"] == "model"
            for name in ("alpha", "beta", "rerank-v3.5"):
                assert name in error["message"]
        empty = c.post("/rerank", json={"query": QUERY, "passages": PASSAGES, "model": ""})
    assert empty.status_code == 422 and empty.json()["error"]["field"] == "model"


def test_models_are_listed_and_described(two: RunningServer) -> None:
    with two.client() as c:
        listing = c.get("/v1/models").json()
        info = c.get("/info").json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["alpha", "rerank-v3.5", "beta"]
    assert info["name"] == "beta"  # the default, at the top
    assert [(m["name"], m["model"], m["aliases"]) for m in info["models"]] == [
        ("alpha", "tiny-test-bert", ["rerank-v3.5"]),
        ("beta", "tiny-other", []),
    ]


def test_metrics_are_per_model(two: RunningServer) -> None:
    before = {m: metric(two, f'crossrank_pairs_total{{model="{m}"}}') for m in ("alpha", "beta")}
    scores(two, "alpha")
    assert metric(two, 'crossrank_pairs_total{model="alpha"}') == before["alpha"] + 4
    assert metric(two, 'crossrank_pairs_total{model="beta"}') == before["beta"]
    assert metric(two, 'crossrank_queue_capacity_pairs{model="alpha"}') == 4000  # the server's
    assert metric(two, 'crossrank_queue_capacity_pairs{model="beta"}') == 3000  # its own
    ok = 'crossrank_request_duration_seconds_count{endpoint="/rerank",status="200",model="alpha"}'
    assert metric(two, ok) >= 1


def test_readiness_waits_for_every_model_and_a_drain_answers_both(
    model_dir: ModelDir, other_model: ModelDir
) -> None:
    with run_server(
        model_dir,
        gated=True,
        hold_warm_up=True,
        model=[f"alpha={model_dir.path}", f"beta={other_model.path}"],
    ) as srv:
        first, second = srv.engines
        first.gate.set()
        with srv.client() as c:
            wait_for(lambda: "alpha" not in c.get("/ready").json().get("reason", "alpha"))
            waiting = c.get("/ready").json()
        assert waiting["status"] == "not ready" and waiting["reason"] == "beta: warming up"
        second.gate.set()
        srv.wait_ready()
        first.gate.clear()
        second.gate.clear()
        with ThreadPoolExecutor(2) as pool:
            admitted = [
                pool.submit(
                    lambda m=m: srv.client().post(
                        "/rerank", json={"query": QUERY, "passages": PASSAGES, "model": m}
                    )
                )
                for m in ("alpha", "beta")
            ]
            wait_for(lambda: metric(srv, "crossrank_inflight_requests") == 2)
            srv.server.handle_exit(15, None)  # what SIGTERM does
            service = srv.app.state.service
            assert service.readiness() == "shutting down"
            refused = service.admission_refusal()
            assert refused is not None and refused.type is ErrorType.SHUTTING_DOWN
            first.gate.set()
            second.gate.set()
            assert [f.result().status_code for f in admitted] == [200, 200]


def test_one_model_answers_to_any_name(model_dir: ModelDir) -> None:
    with run_server(model_dir) as srv:
        srv.wait_ready()
        assert scores(srv, "rerank-v3.5", "/v1/rerank") == pytest.approx(scores(srv), abs=1e-6)


@pytest.mark.parametrize(
    ("entries", "culprit"),
    [
        (lambda a, b: [f"x={a}", f"x={b}"], "'x' is given to two models"),
        (lambda a, b: [str(a), str(a)], "'tiny-test-bert' is given to two models"),
        (lambda a, b: [f"x={a}", "/nowhere/at/all"], "/nowhere/at/all"),
    ],
)
def test_a_bad_catalog_is_refused_naming_the_culprit(
    model_dir: ModelDir, other_model: ModelDir, entries, culprit: str
) -> None:
    settings = Settings(model=entries(model_dir.path, other_model.path))
    with pytest.raises(ModelConfigError, match=culprit):
        catalog(settings)


def test_models_come_from_crossrank_models_too(
    model_dir: ModelDir, other_model: ModelDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CROSSRANK_MODEL", raising=False)
    monkeypatch.setenv("CROSSRANK_MODELS", f"a={model_dir.path}, b={other_model.path}")
    assert [entry.name for entry in catalog(Settings())] == ["a", "b"]
    # Both set: one list would be dropped without a word, so the settings are refused.
    monkeypatch.setenv("CROSSRANK_MODEL", str(model_dir.path))
    with pytest.raises(ValidationError, match="CROSSRANK_MODEL and CROSSRANK_MODELS"):
        Settings()


def test_a_bad_models_file_is_refused_naming_the_culprit(
    model_dir: ModelDir, other_model: ModelDir, tmp_path: Path
) -> None:
    a, b = str(model_dir.path), str(other_model.path)
    cases = [
        ([{"path": a, "aliases": ["same"]}, {"path": b, "aliases": ["same"]}], "'same'"),
        ([{"path": a, "default": True}, {"path": b, "default": True}], "more than one default"),
        ([{"path": a, "colour": "blue"}], "colour"),
        ([{"path": a, "max_queued_pairs": 10}], "max_queued_pairs"),
    ]
    for models, culprit in cases:
        settings = Settings(models_file=models_file(tmp_path, models))
        with pytest.raises(ModelConfigError, match=culprit):
            catalog(settings)
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [path: : :")
    with pytest.raises(ModelConfigError, match=r"broken\.yaml"):
        catalog(Settings(models_file=broken))
