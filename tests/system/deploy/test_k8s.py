"""deploy/k8s: every overlay (and the fallback components on top of each) is built with kustomize,
its core objects are validated strictly against the Kubernetes OpenAPI schemas
(kubernetes-validate), and what no schema can say is checked against crossrank itself: the env
parses as crossrank's settings, the probes hit its routes, the grace period covers the drain,
the sizes cover the benchmark's measured RSS, and the autoscaler's metrics are what the shipped
prometheus-adapter rules expose from series the service really exports."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client.metrics_core import Metric
from pydantic import ValidationError
from support import missing_tool

from crossrank.http.routes import router
from crossrank.ops.metrics import Metrics
from crossrank.ops.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "k8s"
RESULTS = ROOT / "bench" / "results" / "results.md"

# The native preStop sleep action is beta, on by default, from 1.30: the oldest version we claim.
OLDEST_VERSION = "1.30"
VERSIONS = (OLDEST_VERSION, kubernetes_validate.utils.latest_version())
# CRDs: kubernetes-validate has no schema for them; their fields are checked one by one below.
CUSTOM_KINDS = {"ServiceMonitor"}
CORE_KINDS = {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
# After the preStop sleep and the longest deadline: answer the last request, close the batcher
# and exit.
DRAIN_MARGIN_S = 10
FALLBACK = "hpa-cpu-utilisation"
NO_SERVICEMONITOR = "no-servicemonitor"
OVERLAYS = ("cpu", "gpu")

Objects = dict[str, dict[str, Any]]


def kustomize_command() -> list[str]:
    if kubectl := shutil.which("kubectl"):
        return [kubectl, "kustomize"]
    if kustomize := shutil.which("kustomize"):
        return [kustomize, "build"]
    missing_tool("neither kubectl nor kustomize is installed: the manifests cannot be built")


def build(directory: Path) -> Objects:
    out = subprocess.run(
        [*kustomize_command(), str(directory)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    objects = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    by_kind = {obj["kind"]: obj for obj in objects}
    assert len(by_kind) == len(objects), "one object of each kind expected"
    return by_kind


def build_with(overlay: str, components: list[str], tmp_path: Path) -> Objects:
    """An overlay with components on top, as README.md tells users to write it (kustomize only
    takes paths relative to the kustomization)."""
    rel = Path(os.path.relpath(K8S, tmp_path))
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [str(rel / "overlays" / overlay)],
        "components": [str(rel / "components" / c) for c in components],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return build(tmp_path)


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, Objects]:
    return request.param, build(K8S / "overlays" / request.param)


def container(objects: Objects) -> dict[str, Any]:
    (only,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def env_of(objects: Objects) -> dict[str, str]:
    """The container's environment as the kubelet would set it (resourceFieldRef resolved)."""
    c = container(objects)
    env = {}
    for var in c["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"]["resourceFieldRef"]
        assert ref["resource"] == "limits.cpu" and str(ref["divisor"]) == "1"
        env[var["name"]] = str(math.ceil(float(c["resources"]["limits"]["cpu"])))
    return env


def settings_of(objects: Objects, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in [n for n in os.environ if n.startswith("CROSSRANK_")]:
        monkeypatch.delenv(name)
    for name, value in env_of(objects).items():
        monkeypatch.setenv(name, value)
    return Settings()  # type: ignore[call-arg]  # every field comes from the environment


def memory_mb(quantity: str) -> float:
    units = {"Mi": 2**20, "Gi": 2**30}
    return float(quantity[:-2]) * units[quantity[-2:]] / 1e6


def results_figure(pattern: str) -> float:
    """A figure from the benchmark's committed results (`python -m bench.run`)."""
    found = re.search(pattern, RESULTS.read_text())
    assert found, f"{pattern!r} not in {RESULTS}: re-derive the sizes in deploy/k8s"
    return float(found.group(1))


def exported_series() -> dict[str, str]:
    """Every series name crossrank's /metrics exposes, with its family's type."""
    metrics = Metrics()
    metrics.unattributed()
    metrics.for_model("a-model")
    families: list[Metric] = list(metrics.registry.collect())
    return {sample.name: family.type for family in families for sample in family.samples}


def adapter_rules() -> dict[str, dict[str, Any]]:
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    assert values["rules"]["default"] is False, "only the rules we ship"
    return {rule["name"]["as"]: rule for rule in values["rules"]["custom"]}


def test_core_objects_validate_strictly_and_crds_are_known_unvalidated(
    overlay: tuple[str, Objects],
) -> None:
    _, objects = overlay
    assert set(objects) == CORE_KINDS | CUSTOM_KINDS
    for kind in CORE_KINDS:
        for k8s_version in VERSIONS:
            kubernetes_validate.validate(objects[kind], k8s_version, strict=True)
    # kubernetes-validate's CLI only warns on a CRD and passes it: say so here, so that nobody
    # reads the pass above as covering the ServiceMonitor (its own test follows).
    for kind in CUSTOM_KINDS:
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(objects[kind], VERSIONS[-1], strict=True)


def test_strict_validation_refuses_a_misspelt_field(overlay: tuple[str, Objects]) -> None:
    deployment = copy.deepcopy(overlay[1]["Deployment"])
    probe = deployment["spec"]["template"]["spec"]["containers"][0].pop("readinessProbe")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = probe
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_prestop_sleep_action_needs_the_oldest_version_claimed(
    overlay: tuple[str, Objects],
) -> None:
    with pytest.raises(kubernetes_validate.ValidationError, match="sleep"):
        kubernetes_validate.validate(overlay[1]["Deployment"], "1.28", strict=True)


def test_env_is_crossranks_settings_and_service_links_are_off(
    overlay: tuple[str, Objects], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, objects = overlay
    env = env_of(objects)
    # Settings ignore unknown CROSSRANK_* names, so a misspelt one would be silently dropped.
    for var in env:
        assert var.startswith("CROSSRANK_")
        assert var.removeprefix("CROSSRANK_").lower() in Settings.model_fields, var
    settings = settings_of(objects, monkeypatch)
    assert settings.device == {"cpu": "cpu", "gpu": "cuda"}[name]
    assert [str(m) for m in settings.model] == ["/opt/crossrank/models/crossrank-minilm-l6"]
    assert settings.threads == math.ceil(float(container(objects)["resources"]["limits"]["cpu"]))

    # What a Service named crossrank would inject if service links were on.
    assert objects["Service"]["metadata"]["name"] == "crossrank"
    monkeypatch.setenv("CROSSRANK_PORT", "tcp://10.0.0.1:8080")
    with pytest.raises(ValidationError, match="port"):
        Settings()  # type: ignore[call-arg]
    assert objects["Deployment"]["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_probes_ports_and_service_meet(
    overlay: tuple[str, Objects], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, objects = overlay
    c = container(objects)
    routes = {route.path for route in router.routes}  # type: ignore[attr-defined]
    assert c["startupProbe"]["httpGet"]["path"] == "/ready"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] in routes
        assert c[probe]["httpGet"]["port"] == "http"
    (port,) = c["ports"]
    assert port["name"] == "http"
    assert port["containerPort"] == settings_of(objects, monkeypatch).port

    pod_labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert objects["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert objects["Service"]["spec"]["selector"].items() <= pod_labels.items()
    (service_port,) = objects["Service"]["spec"]["ports"]
    assert service_port["targetPort"] == "http"
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= (
        pod_labels.items()
    )


def test_startup_budget_outlasts_liveness_and_covers_minutes(
    overlay: tuple[str, Objects],
) -> None:
    c = container(overlay[1])
    startup = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
    assert startup >= 300
    assert startup > c["livenessProbe"]["periodSeconds"] * c["livenessProbe"]["failureThreshold"]


def test_grace_period_covers_prestop_the_drain_and_the_exit(
    overlay: tuple[str, Objects], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, objects = overlay
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    prestop_s = container(objects)["lifecycle"]["preStop"]["sleep"]["seconds"]
    settings = settings_of(objects, monkeypatch)
    # A request admitted just before SIGTERM may be answered as late as its deadline: the drain
    # must wait that long, and the pod's grace period must cover the preStop and the drain.
    assert settings.drain_grace_s >= settings.default_timeout_ms / 1000
    assert prestop_s >= 5, "endpoint removal needs time to reach the proxies"
    assert (
        pod["terminationGracePeriodSeconds"] >= prestop_s + settings.drain_grace_s + DRAIN_MARGIN_S
    )


def test_resources_cover_the_measured_rss_and_guarantee_qos(overlay: tuple[str, Objects]) -> None:
    name, objects = overlay
    resources = container(objects)["resources"]
    assert resources["requests"] == resources["limits"], "Guaranteed QoS"
    peak_mb = results_figure(r"Peak RSS of crossrank under the heaviest load run: (\d+) MB")
    assert memory_mb(resources["limits"]["memory"]) >= 2 * peak_mb
    if name == "gpu":
        assert resources["limits"]["nvidia.com/gpu"] == "1"
        tolerations = objects["Deployment"]["spec"]["template"]["spec"]["tolerations"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
            tolerations
        )
    else:
        assert "nvidia.com/gpu" not in resources["limits"]
        # The benchmark's RSS was measured with 2 onnxruntime threads: size the pod as measured.
        assert resources["limits"]["cpu"] == "2"


def test_images_carry_the_package_version(overlay: tuple[str, Objects]) -> None:
    name, objects = overlay
    suffix = {"cpu": "", "gpu": "-gpu"}[name]
    assert container(objects)["image"] == f"crossrank:{version('crossrank')}{suffix}"


def test_servicemonitor_scrapes_the_service_the_adapter_maps_to_pods(
    overlay: tuple[str, Objects],
) -> None:
    _, objects = overlay
    monitor = objects["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    labels = objects["Service"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) == {"port", "path", "interval"}
    assert endpoint["port"] in {p["name"] for p in objects["Service"]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics" and "/metrics" in {
        route.path  # type: ignore[attr-defined]
        for route in router.routes
    }
    assert re.fullmatch(r"\d+s", endpoint["interval"])


def test_autoscaler_metrics_are_the_adapter_rules_over_exported_series(
    overlay: tuple[str, Objects], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, objects = overlay
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    deployment = objects["Deployment"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    assert hpa["minReplicas"] > objects["PodDisruptionBudget"]["spec"]["maxUnavailable"]

    rules = adapter_rules()
    series = exported_series()
    targets = {}
    for metric in hpa["metrics"]:
        assert metric["type"] == "Pods"
        name = metric["pods"]["metric"]["name"]
        assert name in rules, f"no prometheus-adapter rule exposes {name}"
        rule = rules[name]
        found = re.fullmatch(r"(\w+)\{(.*)\}", rule["seriesQuery"])
        assert found, rule["seriesQuery"]
        source, matchers = found.groups()
        assert source in series, f"crossrank exports no series {source}"
        assert re.search(rule["name"]["matches"], source)
        # The adapter maps a series to a pod by these labels (the ServiceMonitor adds them).
        assert 'namespace!=""' in matchers and 'pod!=""' in matchers
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"},
            "pod": {"resource": "pod"},
        }
        query = rule["metricsQuery"]
        for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert placeholder in query
        # rate() only of what only grows (a histogram's _sum), never of a gauge.
        assert ("rate(" in query) == (series[source] in {"histogram", "counter"})
        targets[name] = metric["pods"]["target"]
    for target in targets.values():
        assert target["type"] == "AverageValue"

    # Busy ratio: seconds of inference per second, one batch at a time, so at most 1.
    busy = targets["crossrank_engine_busy_ratio"]["averageValue"]
    assert re.fullmatch(r"\d+m", busy) and 0 < int(busy[:-1]) < 1000
    # A backlog target, if any, scales out before admission starts refusing with queue_full.
    bound = settings_of(objects, monkeypatch).max_queued_pairs
    for name in set(targets) - {"crossrank_engine_busy_ratio"}:
        assert name in {"crossrank_queue_depth_pairs", "crossrank_reserved_pairs"}
        assert float(targets[name]["averageValue"]) < bound


def quantity(value: str) -> float:
    return int(value[:-1]) / 1000 if value.endswith("m") else float(value)


@pytest.mark.parametrize("name", OVERLAYS)
def test_autoscaler_targets_and_bounds_are_the_capacity_plans(name: str) -> None:
    """The overlay scales on what bench.capacity chose for its device (docs/capacity.md)."""
    plan = json.loads((ROOT / "bench" / "results" / "capacity.json").read_text())
    hpa = build(K8S / "overlays" / name)["HorizontalPodAutoscaler"]["spec"]
    targets = {
        m["pods"]["metric"]["name"]: quantity(m["pods"]["target"]["averageValue"])
        for m in hpa["metrics"]
    }
    signal = {"busy_ratio": "crossrank_engine_busy_ratio"}
    chosen = {signal.get(k, f"crossrank_{k}"): v for k, v in plan[name]["chosen"].items()}
    assert targets == pytest.approx(chosen)
    low, high = plan["args"]["replicas"][:2] if name == "cpu" else plan["args"]["replicas"][2:]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (low, high)


@pytest.mark.parametrize("name", OVERLAYS)
def test_cpu_utilisation_fallback(name: str, tmp_path: Path) -> None:
    objects = build_with(name, [FALLBACK], tmp_path)
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert hpa["metrics"] == [
        {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": 70},
            },
        }
    ]
    # Utilisation is measured against the request: there must be one.
    assert container(objects)["resources"]["requests"]["cpu"]
    for k8s_version in VERSIONS:
        kubernetes_validate.validate(objects["HorizontalPodAutoscaler"], k8s_version, strict=True)


def test_without_the_prometheus_operator(tmp_path: Path) -> None:
    objects = build_with("cpu", [FALLBACK, NO_SERVICEMONITOR], tmp_path)
    assert set(objects) == CORE_KINDS
