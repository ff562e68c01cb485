"""compose.yaml, the Kubernetes manifests and the Dockerfile, checked against their schemas and
against what the gateway really serves: its routes, port and settings."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import AliasChoices

from gateway.app import create_app
from gateway.config.backends import parse_backends
from gateway.config.settings import Settings

ROOT = Path(__file__).parents[1]
KUSTOMIZATIONS = [
    ROOT / "deploy/kubernetes/base",
    ROOT / "deploy/kubernetes/overlays/vllm-gpu",
    ROOT / "deploy/kubernetes/overlays/fleet",
    ROOT / "deploy/kubernetes/overlays/vllm-gpu-tracing",
]
KUBERNETES_VERSION = "1.33.0"
# What each runtime listens on inside its container, and the adapter that knows it.
RUNTIME_PORTS = {"vllm": 8000, "sglang": 30000, "tgi": 80, "ollama": 11434, "llamacpp": 8080,
                 "llamacpp-cuda": 8080}  # fmt: skip
RUNTIME_ADAPTERS = {"llamacpp-cuda": "llamacpp"}


def environment_names() -> set[str]:
    """Every environment variable the settings read."""
    names = set()
    for name, field in Settings.model_fields.items():
        names.add(f"GATEWAY_{name.upper()}")
        if isinstance(field.validation_alias, AliasChoices):
            names.update(str(choice).upper() for choice in field.validation_alias.choices)
    return names


def gateway_paths() -> set[str]:
    app = create_app(Settings(backend_url="http://backend:8000"))
    return {getattr(route, "path", "") for route in app.routes}


# compose.yaml


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def test_compose_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema_text = (
        resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    ).read_text()
    jsonschema.validate(compose, json.loads(schema_text))


def test_each_profile_runs_a_runtime_and_a_gateway_in_front_of_it(compose: dict[str, Any]) -> None:
    services = compose["services"]
    settings_env = environment_names()
    for runtime, port in RUNTIME_PORTS.items():
        backend = services[runtime]
        gateway = services[f"gateway-{runtime}"]
        assert backend["profiles"] == gateway["profiles"] == [runtime]
        assert "ports" not in backend, "only the gateway is published"
        assert "healthcheck" in backend
        env = gateway["environment"]
        assert env["BACKEND"] == RUNTIME_ADAPTERS.get(runtime, runtime)
        assert env["BACKEND_URL"] == f"http://{runtime}:{port}"
        assert gateway["depends_on"][runtime]["condition"] == "service_healthy"
        assert set(env) <= settings_env, set(env) - settings_env
    assert services["redis"]["profiles"] == ["redis"]


def test_gpu_runtimes_reserve_gpus_and_cpu_ones_do_not(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("vllm", "sglang", "tgi", "llamacpp-cuda"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    for name in ("ollama", "llamacpp"):
        assert "deploy" not in services[name]
    assert services["llamacpp"]["image"].endswith(":server")


def test_compose_gateway_matches_the_app(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway-vllm"]
    assert gateway["ports"] == ["8000:8000"]
    assert gateway["environment"]["GATEWAY_PORT"] == "8000"
    assert "http://127.0.0.1:8000/health" in " ".join(gateway["healthcheck"]["test"])
    assert "/health" in gateway_paths()
    assert gateway["env_file"] == [{"path": ".env", "required": False}]
    assert gateway["read_only"] is True
    assert not (ROOT / ".env").exists() or ".env" in (ROOT / ".gitignore").read_text()
    example = (ROOT / ".env.example").read_text()
    names = {line.split("=", 1)[0].lstrip("# ") for line in example.splitlines() if "=" in line}
    names = {name for name in names if not name.startswith("OTEL_")}  # OpenTelemetry's own
    assert names - {"MODEL", "OLLAMA_MODEL", "GGUF_FILE", "HF_TOKEN"} <= environment_names()


def test_the_tracing_profile_adds_a_collector_the_gateway_and_vllm_can_export_to(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    collector = services["otel-collector"]
    assert collector["profiles"] == services["jaeger"]["profiles"] == ["tracing"]
    mounted = collector["volumes"][0].split(":")[0]
    config = yaml.safe_load((ROOT / mounted).read_text())
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    assert config["service"]["pipelines"]["traces"]["receivers"] == ["otlp"]
    text = (ROOT / "compose.yaml").read_text()
    assert '"--otlp-traces-endpoint", "http://otel-collector:4317"' in text
    assert "OTEL_EXPORTER_OTLP_ENDPOINT=http://otel-collector:4318" in (ROOT / ".env.example").read_text()


# Kubernetes


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (which carries kustomize) is needed to build the manifests"
    output = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_manifests_validate_against_the_kubernetes_schemas(directory: Path) -> None:
    documents = kustomize(directory)
    kinds = {doc["kind"] for doc in documents}
    assert {"Deployment", "Service", "Ingress", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Secret",
            "ConfigMap", "NetworkPolicy", "ServiceMonitor"} <= kinds  # fmt: skip
    for doc in documents:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a custom resource: checked on its own below
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def by_kind(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name)


def test_gateway_deployment_matches_the_app() -> None:
    documents = kustomize(KUSTOMIZATIONS[0])
    deployment = by_kind(documents, "Deployment", "gateway")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    config = by_kind(documents, "ConfigMap", "gateway-config")["data"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert ports["http"] == int(env["GATEWAY_PORT"])
    # The object secret comes from the keys' Secret, so every replica seals IDs alike.
    secret = next(item for item in container["env"] if item["name"] == "GATEWAY_OBJECT_SECRET")
    reference = secret["valueFrom"]["secretKeyRef"]
    keys_secret = by_kind(documents, "Secret", reference["name"])
    assert reference["key"] in keys_secret["stringData"]
    assert ports["metrics"] == int(config["GATEWAY_METRICS_PORT"])
    paths = gateway_paths()
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        assert container[probe]["httpGet"]["path"] == path
        assert container[probe]["httpGet"]["port"] == "http"
        assert path in paths
    # Every variable handed to the gateway is one it reads, and is valid together.
    assert set(config) | set(env) <= environment_names()
    keys_mount = next(m for m in container["volumeMounts"] if m["name"] == "keys")
    assert config["GATEWAY_KEYS_FILE"].startswith(keys_mount["mountPath"] + "/")
    # Draining fits in the grace period.
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > float(config["GATEWAY_SHUTDOWN_DELAY"]) + float(config["GATEWAY_DRAIN_TIMEOUT"])
    # Locked down.
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])
    assert container["resources"]["limits"]["memory"]


def test_settings_in_the_manifests_are_accepted() -> None:
    documents = kustomize(KUSTOMIZATIONS[1])
    config = dict(by_kind(documents, "ConfigMap", "gateway-config")["data"])
    assert config["BACKEND"] == "vllm"
    fields = {}
    for name, value in config.items():
        if not name.startswith("OTEL_"):  # OpenTelemetry's own, read by its SDK
            fields[name.removeprefix("GATEWAY_").lower()] = value
    fields.pop("keys_file")  # a path inside the pod
    settings = Settings(**fields, host="0.0.0.0", api_keys=["x"])
    assert settings.backend_url == "http://vllm:8000"
    assert settings.backend == "vllm"


def test_the_tracing_overlay_points_the_gateway_and_vllm_at_one_collector() -> None:
    documents = kustomize(KUSTOMIZATIONS[3])
    config = by_kind(documents, "ConfigMap", "gateway-config")["data"]
    service = by_kind(documents, "Service", "otel-collector")
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert config["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://otel-collector:{ports['otlp-http']}"
    args = by_kind(documents, "Deployment", "vllm")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--otlp-traces-endpoint") + 1] == f"http://otel-collector:{ports['otlp-grpc']}"
    labels = by_kind(documents, "Deployment", "otel-collector")["spec"]["template"]["metadata"]["labels"]
    policy = by_kind(documents, "NetworkPolicy", "gateway-tracing")["spec"]["egress"][0]
    assert policy["to"][0]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["ports"] == [{"port": ports["otlp-http"]}]
    # The gateway with these variables traces, with OpenTelemetry's own settings.
    from gateway.observability.tracing import enabled

    assert enabled(Settings(), {name: value for name, value in config.items() if name.startswith("OTEL_")})


def test_services_ingress_and_monitoring_point_at_real_ports() -> None:
    documents = kustomize(KUSTOMIZATIONS[1])
    service = by_kind(documents, "Service", "gateway")
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {
        "http": "http",
        "metrics": "metrics",
    }
    ingress = by_kind(documents, "Ingress", "gateway")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert annotations["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600
    body_size = annotations["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert int(body_size.removesuffix("m")) * 1024 * 1024 >= Settings().max_body_bytes
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "gateway", "port": {"name": "http"}}
    monitor = by_kind(documents, "ServiceMonitor", "gateway")
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    # It scrapes with the token the gateway requires (/metrics names the tenants).
    credentials = endpoint["authorization"]["credentials"]
    (container,) = by_kind(documents, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"]
    token = next(item for item in container["env"] if item["name"] == "GATEWAY_METRICS_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == credentials
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    vllm = by_kind(documents, "Deployment", "vllm")["spec"]["template"]
    assert vllm["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # The gateway may reach its backend: the policy's egress selector matches the vLLM pods.
    policy = by_kind(documents, "NetworkPolicy", "gateway")
    selectors = [
        rule["to"][0].get("podSelector", {}).get("matchLabels", {}) for rule in policy["spec"]["egress"]
    ]
    assert any(sel.items() <= vllm["metadata"]["labels"].items() for sel in selectors if sel)


# Dockerfile


def test_dockerfile_runs_the_gateway_unprivileged_under_tini() -> None:
    text = (ROOT / "deploy/Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]
    names = [stage.split()[2] if " AS " in stage.split("\n")[0] else "" for stage in stages]
    runtime = stages[names.index("runtime")]
    assert "USER 10001" in runtime
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "gateway", "serve"]' in runtime
    assert "EXPOSE 8000" in runtime
    # No compilers in the images people run (the default, last, stage and the embedded one).
    for name in ("runtime", "embedded", "default"):
        assert "build-essential" not in stages[names.index(name)]
        assert "cmake" not in stages[names.index(name)]
    assert names[-1] == "default"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".env"} <= set(ignored)


def test_the_fleet_profile_puts_several_backends_behind_one_gateway(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gateway = services["gateway-fleet"]
    assert gateway["profiles"] == ["fleet"]
    mount = gateway["volumes"][0]
    source, target, _ = mount.split(":")
    assert target == gateway["environment"]["GATEWAY_BACKENDS"]
    settings = Settings(backends=str(ROOT / source))
    assert settings.backends is not None
    for backend in settings.backends:
        host = urlsplit(backend.url or "").hostname
        assert services[host]["profiles"] == ["fleet"]
        assert gateway["depends_on"][host]["condition"] == "service_healthy"
        assert "ports" not in services[host]
    dns = next(b for b in settings.backends if b.discovery == "dns")
    assert services[urlsplit(dns.url or "").hostname or ""]["deploy"]["replicas"] == 2


def test_the_fleet_overlay_finds_replicas_through_a_headless_service() -> None:
    documents = kustomize(KUSTOMIZATIONS[2])
    config = by_kind(documents, "ConfigMap", "gateway-config")["data"]
    assert "BACKEND_URL" not in config
    generated = next(d for d in documents if d["metadata"]["name"].startswith("gateway-backends-"))
    deployment = by_kind(documents, "Deployment", "gateway")
    pod = deployment["spec"]["template"]["spec"]
    volume = next(
        v for v in pod["volumes"] if v.get("configMap", {}).get("name") == generated["metadata"]["name"]
    )
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    path = Path(config["GATEWAY_BACKENDS"])
    assert str(path.parent) == mount["mountPath"]
    backends = parse_backends(yaml.safe_load(generated["data"][path.name])["backends"], path.name)
    for backend in backends:
        parts = urlsplit(backend.url or "")
        service = by_kind(documents, "Service", parts.hostname or "")
        assert parts.port in {port["port"] for port in service["spec"]["ports"]}
        if backend.discovery == "dns":
            assert service["spec"]["clusterIP"] == "None"  # DNS answers each pod
            assert by_kind(documents, "Deployment", parts.hostname or "")["spec"]["replicas"] == 2
        # The gateway may reach it.
        labels = by_kind(documents, "Deployment", parts.hostname or "")["spec"]["template"]["metadata"][
            "labels"
        ]
        assert labels["app.kubernetes.io/component"] == "inference-backend"
    fields = {name.removeprefix("GATEWAY_").lower(): value for name, value in config.items()}
    fields.pop("keys_file")
    fields["backends"] = None  # a path inside the pod, checked above
    Settings(**fields, host="0.0.0.0", api_keys=["x"])
