"""The shipped Prometheus config, alert rules and Grafana dashboard against a real Prometheus
scraping a real crossrank: every dashboard expression and every alert rule evaluates, and the
panels that should have data after some traffic (hostile traffic included) do."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from support import RunningServer, free_port, missing_tool, run_server

from crossrank.model.model_dir import ModelDir

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "crossrank.json"
MAX_QUEUED = 16
API_KEY = "observability-test-key"

# Grafana computes $__rate_interval from the scrape interval (5 s: at least 20 s); Prometheus's
# API has no such variable, so the test substitutes a window that spans the whole test, and so
# the scrape taken before the traffic. $job / $instance / $model become "all", as the dashboard's
# default.
SUBSTITUTIONS = {"$__rate_interval": "2m", "$job": ".*", "$instance": ".*", "$model": ".*"}

# Panels whose every query must return at least one finite value after the traffic below.
PANELS_WITH_DATA = {
    "Engine healthy",
    "Instances up",
    "Model",
    "Requests/s by status",
    "Latency p50 / p95 / p99 by endpoint",
    "Queue wait vs inference time",
    "Pairs/s and tokens/s",
    "Batch size (pairs)",
    "Padded tokens per batch",
    "Padding efficiency",
    "Queue depth vs its bound",
    "In-flight requests",
    "Rejected requests by reason",
    "Dropped pairs by reason",
    "Engine failures and stalls",
    "Authentication failures by reason",
    "Score cache hit ratio",
    "Score cache size vs its bound",
}


def grafana_to_promql(expr: str) -> str:
    for variable, value in SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: str) -> dict:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def scrape_count(self) -> int:
        """Scrapes of the crossrank target so far (one sample of `up` per scrape)."""
        result = self.query('count_over_time(up{job="crossrank"}[10m])')
        return int(float(result[0]["value"][1])) if result else 0

    def wait_scrapes(self, n: int, timeout: float = 60) -> None:
        start = self.scrape_count()
        deadline = time.monotonic() + timeout
        while self.scrape_count() < start + n:
            assert time.monotonic() < deadline, f"fewer than {n} scrapes in {timeout} s"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        missing_tool("prometheus is not installed (make deploy-tools installs Debian's)")
    return binary


def adapted_config(target: str, folder: Path) -> Path:
    """The shipped prometheus.yml with only its crossrank target changed, beside its rules."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "crossrank"]
    job.pop("dns_sd_configs")
    job["static_configs"] = [{"targets": [target]}]
    for rule_file in config["rule_files"]:
        shutil.copy(DEPLOY / "prometheus" / rule_file, folder / rule_file)
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_prometheus(binary: str, config: Path, folder: Path) -> Iterator[Prometheus]:
    port = free_port()
    log = (folder / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (folder / "prometheus.log").read_text()[-2000:]
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "Prometheus never became ready"
            time.sleep(0.2)
        yield Prometheus(url)
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def client(srv: RunningServer) -> httpx.Client:
    return httpx.Client(
        base_url=srv.url, timeout=30, headers={"Authorization": f"Bearer {API_KEY}"}
    )


def drive_traffic(srv: RunningServer) -> None:
    """Successes on both endpoints, and each kind of failure the dashboard shows: 401, 422 and
    413 rejections, 503 queue_full, 504 with its pairs dropped at their deadline."""
    assert srv.engine is not None
    body = {"query": "capital of france", "passages": ["paris is the capital", "a cat", "sky"]}
    with srv.client() as anonymous:
        assert anonymous.post("/rerank", json=body).status_code == 401
    with client(srv) as c:
        for _ in range(3):
            assert c.post("/rerank", json=body).status_code == 200
            cohere = {"query": body["query"], "documents": body["passages"]}
            assert c.post("/v1/rerank", json=cohere).status_code == 200
        assert c.post("/rerank", json={"query": " ", "passages": ["a"]}).status_code == 422
        too_large = {"query": "q", "passages": ["x" * 5000]}
        assert c.post("/rerank", json=too_large).status_code == 413

    # Hold the engine: one request in it, one queued with a short deadline, one refused.
    while srv.engine.entered.acquire(blocking=False):
        pass  # forget the warm-up's batches
    srv.engine.gate.clear()
    statuses: dict[str, int] = {}

    def post(name: str, payload: dict) -> None:
        with client(srv) as c:
            statuses[name] = c.post("/rerank", json=payload).status_code

    held = threading.Thread(target=post, args=("held", {"query": "q", "passages": ["p"] * 8}))
    held.start()
    assert srv.engine.entered.acquire(timeout=10), "the held request never reached the engine"
    late = {"query": "q", "passages": ["p"] * 4, "timeout_ms": 300}
    queued = threading.Thread(target=post, args=("late", late))
    queued.start()
    time.sleep(0.1)  # the late request reserves its room
    post("refused", {"query": "q", "passages": ["p"] * 8})  # 8 + 4 + 8 > MAX_QUEUED
    queued.join(10)
    srv.engine.gate.set()
    held.join(10)
    assert statuses == {"held": 200, "late": 504, "refused": 503}


@pytest.fixture(scope="module")
def scraped(
    model_dir: ModelDir, prometheus_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Prometheus, RunningServer]]:
    folder = tmp_path_factory.mktemp("prometheus")
    with run_server(
        model_dir,
        gated=True,
        max_queued_pairs=MAX_QUEUED,
        max_passages=8,
        max_body_bytes=4096,
        api_keys=API_KEY,  # /metrics stays open to Prometheus (metrics_require_key is off)
        score_cache_bytes=1 << 20,  # the traffic repeats requests: the cache panels have data
    ) as srv:
        srv.wait_ready()
        config = adapted_config(srv.url.removeprefix("http://"), folder)
        for prometheus in start_prometheus(prometheus_binary, config, folder):
            prometheus.wait_scrapes(1)  # a sample from before the traffic, so rates have a base
            drive_traffic(srv)
            prometheus.wait_scrapes(2)
            yield prometheus, srv


def panels() -> list[dict]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def finite_values(result: list[dict]) -> list[float]:
    values = [float(series["value"][1]) for series in result]
    return [v for v in values if math.isfinite(v)]


def test_every_dashboard_query_evaluates_and_live_panels_have_data(
    scraped: tuple[Prometheus, RunningServer],
) -> None:
    prometheus, _ = scraped
    titles = set()
    for panel in panels():
        titles.add(panel["title"])
        for target in panel["targets"]:
            result = prometheus.query(grafana_to_promql(target["expr"]))
            if panel["title"] in PANELS_WITH_DATA:
                assert finite_values(result), (panel["title"], target["expr"], result)
    assert titles >= PANELS_WITH_DATA


def test_dashboard_shows_the_traffic_that_happened(
    scraped: tuple[Prometheus, RunningServer],
) -> None:
    prometheus, srv = scraped
    by_title = {p["title"]: p for p in panels()}

    def series(title: str, label: str) -> dict[str, float]:
        (target,) = by_title[title]["targets"]
        result = prometheus.query(grafana_to_promql(target["expr"]))
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in result}

    rejected = series("Rejected requests by reason", "reason")
    assert rejected["queue_full"] > 0 and rejected["invalid"] > 0 and rejected["too_large"] > 0
    assert rejected["not_ready"] == 0
    assert series("Authentication failures by reason", "reason")["missing"] > 0
    assert 0 < series("Score cache hit ratio", "")[""] < 1
    assert series("Dropped pairs by reason", "reason")["deadline"] > 0
    statuses = series("Requests/s by status", "status")
    assert all(statuses[s] > 0 for s in ("200", "401", "413", "422", "503", "504"))
    (bound,) = prometheus.query("crossrank_queue_capacity_pairs")
    assert float(bound["value"][1]) == MAX_QUEUED
    (model,) = prometheus.query("crossrank_model_info")
    assert model["metric"]["name"] == "tiny-test-bert"
    assert model["metric"]["instance"] == srv.url.removeprefix("http://")


def test_dashboard_variables_find_the_target(scraped: tuple[Prometheus, RunningServer]) -> None:
    """The template variables' label_values() queries, as Prometheus series queries."""
    prometheus, srv = scraped
    dashboard = json.loads(DASHBOARD.read_text())
    found = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"])
        assert match, variable["definition"]
        metric, label = match.groups()
        result = prometheus.query(f"group by ({label}) ({grafana_to_promql(metric)})")
        found[label] = {s["metric"][label] for s in result}
    assert found == {
        "job": {"crossrank"},
        "instance": {srv.url.removeprefix("http://")},
        "model": {"tiny-test-bert"},
    }


def test_every_alert_rule_evaluates_and_is_healthy(
    scraped: tuple[Prometheus, RunningServer],
) -> None:
    prometheus, _ = scraped
    shipped = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    names = set()
    for group in shipped["groups"]:
        for rule in group["rules"]:
            names.add(rule["alert"])
            prometheus.query(rule["expr"])  # raises on an error
    # Prometheus itself loaded and evaluated each rule without error, and the rules that the
    # traffic's 503s, 504s and deadline drops cross are pending (their `for` has not run out).
    crossed = {"CrossrankRejecting", "CrossrankServerErrors", "CrossrankDroppingPairs"}
    deadline = time.monotonic() + 30
    while True:
        groups = prometheus.api("rules", type="alert")["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        pending = {name for name, r in loaded.items() if r["state"] == "pending"}
        if pending >= crossed:
            break
        assert time.monotonic() < deadline, f"pending: {pending}, expected {crossed}"
        time.sleep(0.5)
    assert set(loaded) == names
    for name, rule in loaded.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
    assert loaded["CrossrankTargetDown"]["state"] == "inactive"
    assert loaded["CrossrankEngineUnhealthy"]["state"] == "inactive"
