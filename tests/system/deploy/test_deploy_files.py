"""The deployment files under their own tools (hadolint, docker-compose, promtool) and against the
service they deploy: settings that exist, ports, grace periods, pinned versions, the dashboard's
conventions."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest
import yaml
from support import missing_tool

from crossrank.ops.metrics import Metrics
from crossrank.ops.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "Dockerfile.gpu"]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "crossrank.json"
LOCK = ROOT / "deploy" / "requirements-serve.txt"


def tool(name: str) -> str:
    """A tool from the venv (the dev extra's) or PATH, or skip saying which is missing."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        missing_tool(f"{name} is not installed (make test installs it: dev extra / deploy-tools)")
    return found


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def dockerfile_env(path: Path) -> dict[str, str]:
    """The ENV of a Dockerfile's last stage, continuation lines joined."""
    text = path.read_text().replace("\\\n", " ")
    last_stage = text.rsplit("\nFROM ", 1)[1]
    env: dict[str, str] = {}
    for line in last_stage.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def duration_s(text: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", text)
    assert match, text
    return int(match[1]) * (60 if match[2] == "m" else 1)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean_and_every_ignore_says_why(dockerfile: Path) -> None:
    result = run(tool("hadolint"), dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = dockerfile.read_text().splitlines()
    for number, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            reason = lines[number - 1]
            assert reason.startswith("#") and "hadolint" not in reason, (dockerfile, number + 1)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_the_service_as_configured(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert re.search(r"^USER 10001:10001$", text, re.M), "not a non-root user"
    assert 'CMD ["python", "-m", "crossrank.ops.probe", "/ready"]' in text
    assert 'ENTRYPOINT ["crossrank", "serve"]' in text
    assert "STOPSIGNAL SIGTERM" in text
    env = dockerfile_env(dockerfile)
    settings = {f"CROSSRANK_{name.upper()}" for name in Settings.model_fields}
    unknown = {k for k in env if k.startswith("CROSSRANK_")} - settings
    assert not unknown, f"{dockerfile.name} sets variables no setting reads: {unknown}"
    assert env["CROSSRANK_PORT"] == re.search(r"^EXPOSE (\d+)$", text, re.M)[1]
    model = env["CROSSRANK_MODEL"]
    assert f"COPY models/crossrank-minilm-l6 {model}" in text
    assert (ROOT / "models" / "crossrank-minilm-l6" / "crossrank.json").is_file()
    device = "cuda" if dockerfile.name.endswith(".gpu") else "cpu"
    assert env["CROSSRANK_DEVICE"] == device


def test_dockerignore_admits_exactly_what_the_images_copy() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] != "#"]
    assert lines[0] == "*", "an allow-list: everything is ignored unless named"
    allowed = [line[1:].rstrip("/") for line in lines if line.startswith("!")]
    copied = set()
    for dockerfile in DOCKERFILES:
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY ") and "--from=" not in line:
                copied.update(line.split()[1:-1])
    assert copied == set(allowed), (copied, allowed)


def test_gpu_image_pins_the_locked_onnxruntime_release() -> None:
    lock = dict(line.split("==") for line in LOCK.read_text().splitlines() if "==" in line)
    gpu_arg = re.search(r"^ARG ORT_VERSION=(\S+)$", (ROOT / "Dockerfile.gpu").read_text(), re.M)
    make_var = re.search(r"^ORT_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert lock["onnxruntime"] == gpu_arg[1] == make_var[1]
    assert "torch" not in lock, "the serving images must not carry torch"
    assert {"fastapi", "uvicorn", "tokenizers", "prometheus_client"} <= set(lock)


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_lock_holds_every_serving_dependency() -> None:
    """The images install the lock, then crossrank with --no-deps: a dependency that pyproject
    gains and the lock lacks would be missing from the image (`make lock` rewrites it)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # The otel extra too: an image exports traces once otlp_endpoint is set.
    project = pyproject["project"]
    wanted = {
        normalised(re.match(r"[A-Za-z0-9_.-]+", dep)[0])
        for dep in project["dependencies"] + project["optional-dependencies"]["otel"]
    }
    locked = {
        normalised(line.split("==")[0]) for line in LOCK.read_text().splitlines() if "==" in line
    }
    assert wanted <= locked, f"not in {LOCK.name}: {wanted - locked} (run make lock)"
    # uvicorn[standard]'s extras are what make it fast (uvloop, httptools).
    assert {"uvloop", "httptools"} <= locked


def compose_config(*files: Path) -> dict:
    args = [a for f in files for a in ("-f", f)]
    result = run(tool("docker-compose"), *args, "config")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_is_valid_and_wires_the_stack() -> None:
    config = compose_config(COMPOSE)
    services = config["services"]
    assert set(services) == {"crossrank", "prometheus", "grafana", "balancer", "crossrank-models"}
    # The balancer only with the fleet profile, the second models' server only with the models
    # one (docker-compose 1.x lists them either way).
    assert services["balancer"]["profiles"] == ["fleet"]
    assert services["crossrank-models"]["profiles"] == ["models"]
    crossrank = services["crossrank"]
    # The grace period covers the drain (the service's own bound on it, which covers the longest
    # default deadline) plus a margin to exit.
    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    assert defaults["drain_grace_s"] >= defaults["default_timeout_ms"] / 1000
    assert duration_s(crossrank["stop_grace_period"]) >= defaults["drain_grace_s"] + 10
    assert {p["target"] for p in crossrank["ports"]} == {8080}
    scrape = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    # Every replica by DNS, each its own instance (one, or N with --scale).
    assert job["dns_sd_configs"] == [
        {
            "names": ["crossrank", "crossrank-models"],
            "type": "A",
            "port": 8080,
            "refresh_interval": "10s",
        }
    ]
    # docker-compose 1.x prints volumes as "source:target:mode".
    volumes = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
    assert Path(volumes["/var/lib/grafana/dashboards"]) == DASHBOARD.parent
    grafana_env = services["grafana"]["environment"]
    assert grafana_env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana_env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = grafana_env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"/var/lib/grafana/dashboards/{DASHBOARD.name}"


def test_compose_fleet_profile_puts_the_fleet_balancer_before_scalable_replicas() -> None:
    args = ["-f", COMPOSE, "--profile", "fleet"]
    result = run(tool("docker-compose"), *args, "config")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    # No single host port on the replicas: --scale gives each one of the range.
    (port,) = services["crossrank"]["ports"]
    assert port["target"] == 8080 and port["published"] == "8080-8089"
    balancer = services["balancer"]
    volumes = {v.split(":")[1]: v.split(":")[0] for v in balancer["volumes"]}
    assert Path(volumes["/etc/fleet"]) == ROOT / "deploy" / "fleet"
    # The config it assembles is HAProxy-valid: run.sh's, with the servers compose's DNS knows.
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        missing_tool("haproxy is not installed (make deploy-tools installs Debian's)")
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "haproxy.cfg"
        fleet = ROOT / "deploy" / "fleet"
        config.write_text(
            (fleet / "haproxy.cfg").read_text() + (fleet / "compose-servers.cfg").read_text()
        )
        env = {**os.environ, **balancer["environment"]}
        check = subprocess.run(
            [haproxy, "-c", "-f", str(config)], env=env, capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr


def test_compose_gpu_override_reserves_a_gpu_for_the_gpu_image() -> None:
    crossrank = compose_config(COMPOSE, COMPOSE_GPU)["services"]["crossrank"]
    assert crossrank["build"]["dockerfile"] == "Dockerfile.gpu"
    assert crossrank["environment"]["CROSSRANK_DEVICE"] == "cuda"
    (device,) = crossrank["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_compose_models_profile_serves_two_models_under_their_names() -> None:
    result = run(tool("docker-compose"), "-f", COMPOSE, "--profile", "models", "config")
    assert result.returncode == 0, result.stderr
    crossrank = yaml.safe_load(result.stdout)["services"]["crossrank-models"]
    # docker-compose 1.x prints volumes as "source:target:mode".
    mounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in crossrank["volumes"]}
    assert mounts["/models/second"] == ROOT / "models" / "crossrank-minilm-l6"
    settings = Settings(model=crossrank["environment"]["CROSSRANK_MODEL"])
    specs = [(s.name, s.path) for s in settings.model_specs()]
    assert specs == [
        ("default", Path("/opt/crossrank/models/crossrank-minilm-l6")),
        ("second", Path("/models/second")),
    ]


def test_promtool_checks_the_config_and_rules_and_their_unit_tests_pass() -> None:
    promtool = tool("promtool")
    for args in (
        ("check", "config", PROMETHEUS / "prometheus.yml"),
        ("check", "rules", PROMETHEUS / "alerts.yml"),
        ("test", "rules", PROMETHEUS / "alerts_test.yml"),
    ):
        result = run(promtool, *args)
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    alerts = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    names = {rule["alert"] for group in alerts["groups"] for rule in group["rules"]}
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert fired == names


def test_dashboard_follows_grafana_conventions() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert grid["x"] + grid["w"] <= 24 and not area & cells, panel["title"]
        cells |= area
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel.get("description"), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            expr = target["expr"]
            windows = re.findall(r"\[([^\]]+)\]", expr)
            assert all(w == "$__rate_interval" for w in windows), (panel["title"], expr)
            assert 'instance=~"$instance"' in expr, (panel["title"], expr)
            # Every crossrank series is about one model: the model variable filters it.
            for selector in re.findall(r"crossrank_\w+\{[^}]*\}", expr):
                assert 'model=~"$model"' in selector, (panel["title"], selector)


@pytest.mark.parametrize("script", sorted((ROOT / "deploy").rglob("*.sh")), ids=lambda p: p.name)
def test_deploy_scripts_are_shellcheck_clean(script: Path) -> None:
    result = run(tool("shellcheck"), script)
    assert result.returncode == 0, result.stdout + result.stderr


def exported_metrics() -> set[str]:
    """Every metric family the service exports, as Prometheus names its series' base."""
    names = set()
    for family in Metrics().registry.collect():
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        names.add(family.name + suffix)
    return names


def test_every_metric_is_documented_and_on_the_dashboard() -> None:
    metrics_section = (ROOT / "README.md").read_text().split("## Metrics", 1)[1].split("\n## ")[0]
    dashboard = DASHBOARD.read_text()
    for name in exported_metrics():
        assert f"`{name.removeprefix('crossrank_')}" in metrics_section, f"README: {name}"
        assert name in dashboard, f"no dashboard panel shows {name}"
