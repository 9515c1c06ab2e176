"""API keys: Bearer auth on every route but the probes, 401 in the one error shape, failures
counted by reason, and the keys never in a log or a metric."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import ValidationError
from support import metric, run_server

from crossrank.model.model_dir import ModelDir
from crossrank.ops.settings import Settings

BODY = {"query": "the capital of france", "passages": ["paris", "a cat"]}
KEYS = ("key-one-4f1c", "key-two-9a7e", "key-from-file-51b2")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_are_required_and_counted_but_never_shown(
    model_dir: ModelDir, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text(f"\n{KEYS[2]}\n\n")
    caplog.set_level(logging.DEBUG)
    with run_server(model_dir, api_keys=f"{KEYS[0]}, {KEYS[1]}", api_keys_file=key_file) as srv:
        srv.wait_ready()  # /ready needs no key
        with srv.client() as c:
            assert c.get("/health").status_code == 200
            for key in KEYS:
                assert c.post("/rerank", json=BODY, headers=bearer(key)).status_code == 200
            # The scheme is case-insensitive (RFC 7235), as some clients send "bearer".
            lower = {"Authorization": f"bearer {KEYS[0]}"}
            assert c.post("/v1/rerank", json={"query": "q", "documents": ["a"]}, headers=lower)
            refused = {
                "missing": c.post("/rerank", json=BODY),
                "malformed": c.post("/rerank", json=BODY, headers={"Authorization": KEYS[0]}),
                "wrong_key": c.post("/rerank", json=BODY, headers=bearer(KEYS[0] + "x")),
            }
            docs = c.get("/openapi.json")
            unknown = c.get("/nope")
            metrics_text = c.get("/metrics").text  # open unless metrics_require_key
        for reason, response in refused.items():
            assert response.status_code == 401, reason
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            error = response.json()["error"]
            assert error["type"] == "unauthorized"
            assert error["message"]
            # missing: also the two requests below, sent with no key.
            counted = 3 if reason == "missing" else 1
            assert metric(srv, f'crossrank_auth_failures_total{{reason="{reason}"}}') == counted
        # Everything but the probes and metrics needs a key, even what does not exist.
        assert docs.status_code == 401
        assert unknown.status_code == 401
        assert (
            metric(srv, 'crossrank_request_duration_seconds_count{endpoint="/rerank",status="401"}')
            == 3
        )
    logged = "\n".join(r.getMessage() + str(r.__dict__) for r in caplog.records)
    for key in KEYS:
        assert key not in metrics_text
        assert key not in logged
        assert key not in str(Settings(model=model_dir.path, api_keys=key))


def test_metrics_can_require_a_key(model_dir: ModelDir) -> None:
    with run_server(model_dir, api_keys=KEYS[0], metrics_require_key=True) as srv:
        srv.wait_ready()
        with srv.client() as c:
            assert c.get("/metrics").status_code == 401
            assert c.get("/metrics", headers=bearer(KEYS[0])).status_code == 200
            assert c.get("/health").status_code == 200


def test_without_keys_nothing_is_asked(model_dir: ModelDir) -> None:
    with run_server(model_dir) as srv:
        srv.wait_ready()
        with srv.client() as c:
            assert c.post("/rerank", json=BODY).status_code == 200


def test_a_missing_key_file_is_refused_at_start(model_dir: ModelDir, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="api_keys_file"):
        Settings(model=model_dir.path, api_keys_file=tmp_path / "absent")
    assert Settings(model=model_dir.path, api_keys=" a, ,b ").load_api_keys() == {"a", "b"}
