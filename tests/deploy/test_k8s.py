"""Kubernetes manifests: valid YAML, consistent with each other and with the server.

No cluster is available, so these are static checks of what usually goes wrong: probes that
do not speak gRPC, a Service or HPA that points at nothing, a grace period shorter than the
server's drain, a config the server would refuse.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

GRPC_PORT = 50051


@pytest.fixture(scope="module")
def manifests(repo_root: Path) -> dict[str, dict[str, Any]]:
    """Every object in deploy/k8s, by kind (one object per kind)."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted((repo_root / "deploy" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            for key in ("apiVersion", "kind", "metadata"):
                assert key in doc, f"{path.name}: object without {key}"
            assert doc["metadata"].get("name"), f"{path.name}: object without a name"
            assert doc["kind"] not in objects, f"two {doc['kind']} objects"
            objects[doc["kind"]] = doc
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"} <= set(objects)
    return objects


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _config(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return tomllib.loads(manifests["ConfigMap"]["data"]["camserve.toml"])


def _pre_stop_s(container: dict[str, Any]) -> float:
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    return float(command[1]) if command and command[0] == "sleep" else 0.0


def test_probes_use_the_native_grpc_health_check(manifests: dict[str, dict[str, Any]]) -> None:
    """Readiness, liveness and startup probes are `grpc:` probes on the server's port, so a pod
    receives traffic only once its models are warm (SERVING) and leaves during the drain."""
    container = _container(manifests["Deployment"])
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert set(container[probe]) & {"httpGet", "tcpSocket", "exec"} == set(), probe
        assert container[probe]["grpc"]["port"] == GRPC_PORT, probe
    assert container["readinessProbe"]["grpc"]["service"] == "camserve.v1.ExplainService"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": 9090}
    assert _config(manifests)["server"]["port"] == GRPC_PORT


def test_pod_gets_a_gpu_and_bounded_memory(manifests: dict[str, dict[str, Any]]) -> None:
    resources = _container(manifests["Deployment"])["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    assert resources["requests"]["cpu"]
    assert resources["requests"]["memory"]
    assert resources["limits"]["memory"]


def _quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("1Gi", "512Mi", "500m", "5") as a plain number."""
    text = str(value).strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|m|k|M|G|T)?", text)
    assert match, f"not a quantity: {value!r}"
    scales = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3}
    scales |= {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    return float(match.group(1)) * scales.get(match.group(2) or "", 1)


def test_pod_runs_frontends_with_a_memory_backed_dev_shm(
    manifests: dict[str, dict[str, Any]],
) -> None:
    """One pod per GPU runs CAMSERVE_FRONTENDS frontends and an engine: the count is set (auto
    would count the node's cores), the CPU request covers every process, and /dev/shm is a
    memory-backed emptyDir large enough for each frontend's two rings (the runtime's default
    /dev/shm is 64 MiB)."""
    deployment = manifests["Deployment"]
    container = _container(deployment)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "CAMSERVE_FRONTENDS" in env, "the frontend count is not set"
    frontends = int(env["CAMSERVE_FRONTENDS"])
    assert frontends >= 1, f"CAMSERVE_FRONTENDS={frontends}, not the multi-process layout"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _quantity(container["resources"]["requests"]["cpu"]) >= frontends + 1

    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "/dev/shm" in mounts, "/dev/shm is the runtime's 64 MiB default"
    assert not mounts["/dev/shm"].get("readOnly", False)
    shm = volumes[mounts["/dev/shm"]["name"]]
    assert shm["emptyDir"]["medium"] == "Memory"
    size_mib = _quantity(shm["emptyDir"]["sizeLimit"]) / 2**20
    ring_mb = _config(manifests)["server"].get("shm_ring_mb", 64)
    assert size_mib >= 256
    assert size_mib >= 2 * ring_mb * frontends * 1.25, (
        f"sizeLimit {shm['emptyDir']['sizeLimit']} does not hold 2 x {ring_mb} MiB x "
        f"{frontends} frontends plus headroom"
    )
    # tmpfs pages count against the container's memory limit.
    assert _quantity(container["resources"]["limits"]["memory"]) > _quantity(
        shm["emptyDir"]["sizeLimit"]
    )


def test_termination_grace_outlasts_the_drain(manifests: dict[str, dict[str, Any]]) -> None:
    """The kubelet sends SIGKILL after terminationGracePeriodSeconds, counted from the start of
    preStop: it must cover preStop plus the server's own grace period."""
    spec = manifests["Deployment"]["spec"]["template"]["spec"]
    grace = _config(manifests)["server"]["grace_period_s"]
    pre_stop = _pre_stop_s(_container(manifests["Deployment"]))
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + grace + 1


def test_config_and_weights_come_from_volumes(manifests: dict[str, dict[str, Any]]) -> None:
    deployment, config_map = manifests["Deployment"], manifests["ConfigMap"]
    container = _container(deployment)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    config_volume = volumes[mounts["/etc/camserve"]["name"]]
    assert config_volume["configMap"]["name"] == config_map["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CAMSERVE_CONFIG"] == "/etc/camserve/camserve.toml"
    assert env["CAMSERVE_HOST"] == "0.0.0.0"
    models = mounts["/models"]
    assert models["readOnly"] is True
    assert "persistentVolumeClaim" in volumes[models["name"]]
    weights = [m["weights"] for m in _config(manifests)["models"] if m.get("weights")]
    assert weights
    assert all(w.startswith("/models/") for w in weights)


def test_pod_is_hardened(manifests: dict[str, dict[str, Any]]) -> None:
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = _container(manifests["Deployment"])
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    image = container["image"]
    assert ":" in image.rsplit("/", 1)[-1], f"untagged image {image}"
    assert not image.endswith(":latest"), image


def test_service_selects_the_deployment_pods(manifests: dict[str, dict[str, Any]]) -> None:
    """The Service is headless (gRPC clients balance per call over every pod's address; a
    ClusterIP would pin each client connection to one pod) and selects the pods' labels."""
    deployment, service = manifests["Deployment"], manifests["Service"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["clusterIP"] == "None"
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["port"] == GRPC_PORT
    assert grpc_port["targetPort"] == "grpc"
    if "PodDisruptionBudget" in manifests:
        pdb = manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
        assert pdb.items() <= pod_labels.items()


def test_autoscaler_targets_the_deployment(manifests: dict[str, dict[str, Any]]) -> None:
    hpa = manifests["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert target == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": manifests["Deployment"]["metadata"]["name"],
    }
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["metrics"]


@pytest.mark.parametrize("where", ["configmap", "compose-example"])
def test_shipped_configs_are_accepted_by_the_server(
    manifests: dict[str, dict[str, Any]], repo_root: Path, tmp_path: Path, where: str
) -> None:
    """The ConfigMap's camserve.toml and deploy/camserve.toml pass the server's own settings
    loader, which refuses unknown keys: a typo fails here, not in a crash-looping pod."""
    settings = pytest.importorskip("camserve.server.settings")
    if where == "configmap":
        path = tmp_path / "camserve.toml"
        path.write_text(manifests["ConfigMap"]["data"]["camserve.toml"])
    else:
        path = repo_root / "deploy" / "camserve.toml"
    loaded = settings.load_settings(["--config", str(path)], {})
    assert loaded.host == "0.0.0.0"
    assert loaded.port == GRPC_PORT
    assert loaded.metrics_port == 9090
    assert loaded.grace_period_s == 20
    assert loaded.models
