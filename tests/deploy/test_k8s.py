"""The Kubernetes manifests in scripts/k8s: loaded with pyyaml, checked against each other.

No cluster here; these checks catch what breaks a deployment silently: a
probe on the wrong port, a Service aimed at no container port, the shared
folder mounted somewhere FL_ROOT_PATH does not point, a secret key that does
not exist, a setting the coordinator would refuse at start-up.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from helpers import REPO

from fl_coordinator.config import KEYS, load_settings

K8S = REPO / "scripts" / "k8s"

Manifest = dict[str, Any]


@pytest.fixture(scope="module")
def manifests() -> dict[str, Manifest]:
    """Every document of every YAML file, by kind (one of each kind expected)."""
    by_kind: dict[str, Manifest] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert document["kind"] not in by_kind, f"second {document['kind']} in {path}"
            by_kind[document["kind"]] = document
    return by_kind


def container(manifests: dict[str, Manifest]) -> Manifest:
    (only,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def container_ports(manifests: dict[str, Manifest]) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container(manifests)["ports"]}


def config(manifests: dict[str, Manifest]) -> dict[str, str]:
    return manifests["ConfigMap"]["data"]


def test_every_kind_is_there(manifests: dict[str, Manifest]) -> None:
    assert {"Deployment", "Service", "PersistentVolumeClaim", "Secret", "ConfigMap"} <= set(
        manifests
    )
    listed = set(manifests["Kustomization"]["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_config_is_settings_the_coordinator_accepts(manifests: dict[str, Manifest]) -> None:
    data = config(manifests)
    assert set(data) <= {key.name for key in KEYS}
    assert all(isinstance(value, str) for value in data.values())  # env values are strings
    settings, _ = load_settings({}, data)
    ports = container_ports(manifests)
    assert (settings.port, settings.status_port, settings.metrics_port) == (
        ports["grpc"],
        ports["status"],
        ports["metrics"],
    )
    assert settings.host == "0.0.0.0"  # reachable from outside the pod
    envs_from = container(manifests)["envFrom"]
    assert envs_from == [{"configMapRef": {"name": manifests["ConfigMap"]["metadata"]["name"]}}]


def test_probes_ask_the_grpc_port(manifests: dict[str, Manifest]) -> None:
    spec = container(manifests)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert spec[probe]["grpc"] == {"port": container_ports(manifests)["grpc"]}, probe


def test_service_targets_the_container_ports(manifests: dict[str, Manifest]) -> None:
    service = manifests["Service"]["spec"]
    ports = container_ports(manifests)
    for port in service["ports"]:
        target = port["targetPort"]
        assert target in (ports if isinstance(target, str) else ports.values())
        assert port["port"] == ports[port["name"]]
    assert {p["name"] for p in service["ports"]} == set(ports)
    labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    assert manifests["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_shared_folder_is_mounted_at_fl_root_path(manifests: dict[str, Manifest]) -> None:
    claim = manifests["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # selectors write there too
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in container(manifests)["volumeMounts"]}
    assert mounts[volume["name"]] == config(manifests)["FL_ROOT_PATH"]


def test_tokens_come_from_keys_of_the_secret(manifests: dict[str, Manifest]) -> None:
    secret = manifests["Secret"]
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    refs = {
        env["name"]: env["valueFrom"]["secretKeyRef"]
        for env in container(manifests)["env"]
        if "secretKeyRef" in env.get("valueFrom", {})
    }
    assert set(refs) == {"AUTH_TOKEN", "STATUS_TOKEN"}
    for ref in refs.values():
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in keys
    assert not {"AUTH_TOKEN", "STATUS_TOKEN"} & set(config(manifests))  # not in the ConfigMap


def test_runs_as_one_unprivileged_replica(manifests: dict[str, Manifest]) -> None:
    deployment = manifests["Deployment"]["spec"]
    assert deployment["replicas"] == 1  # two coordinators would split the rounds
    assert deployment["strategy"]["type"] == "Recreate"  # never two at once, even updating
    pod = deployment["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    own = container(manifests)["securityContext"]
    assert own["allowPrivilegeEscalation"] is False
    assert own["capabilities"]["drop"] == ["ALL"]
