"""The Kubernetes manifests in scripts/k8s: rendered, validated, checked against each other.

No cluster here. Each set is rendered as ``kubectl kustomize`` would
(helpers/kustomize.py; compared with kubectl itself where it is installed),
every object is validated strictly against the OpenAPI schemas of three
Kubernetes versions (kubernetes-validate), and the objects are checked against
each other and against the coordinator's own rules: a Service aimed at no
container port, a probe on the wrong port, a claim mounted where FL_ROOT_PATH
does not point, a setting the coordinator would refuse, a selector id the
coordinator would not accept or could not dial. The init containers' commands
run here for real.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from helpers import REPO
from helpers.containerfile import arguments
from helpers.kustomize import files_of, render
from helpers.pods import FULL, SLIM, by_kind, expand, pods
from helpers.pods import environment as pod_environment

from fl_coordinator.cli.main import build_parser
from fl_coordinator.config import KEYS, default_settings, load_settings
from fl_coordinator.rpc.addresses import split_address
from fl_coordinator.storage.layout import check_selector_id

K8S = REPO / "scripts" / "k8s"
#: Every set of manifests; the first three are federations (a coordinator and selectors).
SETS = ("federation", "digits", "fedota", "rollback")
FEDERATIONS = SETS[:3]
#: The oldest Kubernetes the manifests are for (gRPC probes are GA since 1.27), one
#: between, and the newest kubernetes-validate knows.
VERSIONS = ("1.27", "1.30", "1.37")
#: Made outside the set: the Secret by hand (README), the original's claim by its spawner.
EXTERNAL = {
    "federation": {"Secret/fl-tokens"},
    "digits": {"Secret/fl-tokens"},
    "fedota": {"PersistentVolumeClaim/fl-pvc"},
    "rollback": {"ConfigMap/fl-settings", "PersistentVolumeClaim/fl-problem-data"},
}
#: The problem's namespace in each set, for PROBLEM_ID (a fieldRef); the base has none.
NAMESPACE = {"federation": "fl-problem", "digits": "fl-digits", "fedota": "fl-problem",
             "rollback": "fl-problem"}  # fmt: skip
FL_UID = 10001

Manifest = dict[str, Any]


@pytest.fixture(scope="module", params=SETS)
def name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def objects(name: str) -> list[Manifest]:
    return render(K8S / name)


@pytest.fixture(scope="module", params=FEDERATIONS)
def federation(request: pytest.FixtureRequest) -> tuple[str, list[Manifest]]:
    """A set with a coordinator and selectors, and its objects."""
    return request.param, render(K8S / request.param)


def containers(pod: Manifest) -> Iterator[Manifest]:
    yield from pod.get("initContainers", [])
    yield from pod["containers"]


def ports_of(container: Manifest) -> dict[str | int, int]:
    """A container's ports by name and by number."""
    ports: dict[str | int, int] = {}
    for port in container.get("ports", []):
        ports[port["containerPort"]] = port["containerPort"]
        if "name" in port:
            ports[port["name"]] = port["containerPort"]
    return ports


def selected(objects: list[Manifest], selector: dict[str, str]) -> dict[str, Manifest]:
    return {n: p for n, p in pods(objects).items() if selector.items() <= p["labels"].items()}


def environment(objects: list[Manifest], container: Manifest, set_name: str, pod: str) -> dict:
    """The container's environment as Kubernetes makes it (tokens as a placeholder)."""
    return pod_environment(objects, container, NAMESPACE[set_name], pod, lambda *_: "a-token")


def running(pod: Manifest, program: str) -> Manifest | None:
    """The container of ``pod`` that runs ``program`` (its command), if any."""
    for container in pod["containers"]:
        if container.get("command", [None])[0] == program:
            return container
    return None


def serves(container: Manifest) -> bool:
    """Runs ``fl-coordinator serve`` from the slim image (its CMD, or said so)."""
    command = container.get("command", ["fl-coordinator"]) + container.get("args", ["serve"])
    return container["image"] == SLIM and command == ["fl-coordinator", "serve"]


def coordinators(objects: list[Manifest]) -> dict[str, Manifest]:
    """Workloads whose main container is our coordinator."""
    return {n: p for n, p in pods(objects).items() if serves(p["containers"][0])}


def selector_sets(objects: list[Manifest]) -> dict[str, Manifest]:
    """StatefulSets of selectors: ours (``fl-selector``) or the original's (its image)."""
    return {
        n: s
        for n, s in by_kind(objects, "StatefulSet").items()
        if running(s["spec"]["template"]["spec"], "fl-selector")
        or s["spec"]["template"]["spec"]["containers"][0]["image"].startswith("fedota/fl-selector")
    }


def claim_mount(pod: Manifest, container: Manifest) -> str:
    (volume,) = [v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    (mount,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume]
    return mount


# -- rendering and schemas -------------------------------------------------------------


def test_every_file_is_part_of_a_set() -> None:
    used = set().union(*(files_of(K8S / s) for s in SETS))
    assert set(K8S.rglob("*.yaml")) == used
    assert {p.parent.name for p in K8S.glob("*/kustomization.yaml")} == set(SETS)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_renders_as_kubectl_kustomize_does(name: str, objects: list[Manifest]) -> None:
    printed = subprocess.run(
        ["kubectl", "kustomize", str(K8S / name)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    theirs = list(yaml.safe_load_all(printed))
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(theirs, key=key) == sorted(objects, key=key)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_is_valid_kubernetes(objects: list[Manifest], version: str) -> None:
    for item in objects:
        assert kubernetes_validate.validate(item, version, strict=True) == version, item["kind"]


def test_a_misspelt_field_is_refused_by_the_schemas(objects: list[Manifest]) -> None:
    """The premise of the validation above: strict schemas refuse unknown fields."""
    (first, *_) = [o for o in objects if "spec" in o]
    broken = {**first, "spec": {**first["spec"], "selectr": {}}}
    with pytest.raises(kubernetes_validate.ValidationError, match="selectr"):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


# -- cross-references --------------------------------------------------------------------


def test_references_are_to_objects_of_the_set(name: str, objects: list[Manifest]) -> None:
    present = {f"{o['kind']}/{o['metadata']['name']}" for o in objects}
    wanted = set()
    for pod in pods(objects).values():
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                wanted.add(f"PersistentVolumeClaim/{volume['persistentVolumeClaim']['claimName']}")
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for container in containers(pod):
            assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes
            for source in container.get("envFrom", []):
                wanted.add(f"ConfigMap/{source['configMapRef']['name']}")
            for variable in container.get("env", []):
                if "secretKeyRef" in variable.get("valueFrom", {}):
                    wanted.add(f"Secret/{variable['valueFrom']['secretKeyRef']['name']}")
    assert wanted - present == EXTERNAL[name]


def test_services_reach_container_ports(objects: list[Manifest]) -> None:
    for service_name, service in by_kind(objects, "Service").items():
        matched = selected(objects, service["spec"]["selector"])
        assert matched, f"Service {service_name} selects no pod"
        for pod in matched.values():
            ports: dict[str | int, int] = {}
            for container in pod["containers"]:
                ports |= ports_of(container)
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in ports, (service_name, port)
                assert ports[port["targetPort"]] == port["port"], (service_name, port)


def test_probes_ask_a_port_of_their_container(federation: tuple[str, list[Manifest]]) -> None:
    _, objects = federation
    probes = 0
    for pod in pods(objects).values():
        for container in pod["containers"]:
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                if kind in container:
                    probe = container[kind]
                    port = (probe.get("grpc") or probe.get("tcpSocket"))["port"]
                    assert port in ports_of(container), (container["name"], kind)
                    probes += 1
    assert probes >= 3


def test_coordinator_settings_are_accepted(federation: tuple[str, list[Manifest]]) -> None:
    name, objects = federation
    (pod_name, pod), *others = coordinators(objects).items()
    assert not others
    container = pod["containers"][0]
    env = environment(objects, container, name, pod_name)
    assert set(env) <= {key.name for key in KEYS}  # no typo reaches the coordinator
    settings, _ = load_settings({}, env)
    ports = ports_of(container)
    assert (settings.port, settings.status_port, settings.metrics_port) == (
        ports["grpc"],
        ports["status"],
        ports["metrics"],
    )
    assert settings.problem_id == NAMESPACE[name]  # from the namespace
    assert settings.host == "0.0.0.0"
    assert claim_mount(pod, container) == settings.fl_root_path
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[kind]["grpc"] == {"port": settings.port}


def selector_ids(name: str, objects: list[Manifest]) -> dict[str, list[str]]:
    """The ids the selectors of each StatefulSet give themselves, replica by replica."""
    ids = {}
    for set_name, stateful_set in selector_sets(objects).items():
        template = stateful_set["spec"]["template"]["spec"]
        container = template["containers"][0]
        found = []
        for index in range(stateful_set["spec"]["replicas"]):
            env = environment(objects, container, name, f"{set_name}-{index}")
            if container.get("command") == ["fl-selector"]:  # ours: --advertise and --port
                args = dict(expand(a, env).split("=", 1) for a in container["args"][1:])
                found.append(f"{args['--advertise']}:{args['--port']}")
            else:  # the Go selector: HOSTNAME.SELECTOR_SERVICE:PORT (its config.yaml)
                found.append(
                    f"{env['HOSTNAME']}.{env['SELECTOR_SERVICE']}:{env.get('PORT', 50051)}"
                )
        ids[set_name] = found
    return ids


def test_selector_ids_are_dialable_names_the_coordinator_accepts(
    federation: tuple[str, list[Manifest]],
) -> None:
    name, objects = federation
    services = by_kind(objects, "Service")
    assert selector_sets(objects)
    for set_name, ids in selector_ids(name, objects).items():
        stateful_set = by_kind(objects, "StatefulSet")[set_name]
        governing = services[stateful_set["spec"]["serviceName"]]
        # Pod DNS names (pod.service) exist only under a headless governing Service.
        assert governing["spec"]["clusterIP"] == "None"
        assert governing["spec"]["publishNotReadyAddresses"] is True
        pod_labels = stateful_set["spec"]["template"]["metadata"]["labels"]
        assert governing["spec"]["selector"].items() <= pod_labels.items()
        (port,) = [p["port"] for p in governing["spec"]["ports"]]
        expected = [f"{set_name}-{i}.{governing['metadata']['name']}:{port}"
                    for i in range(stateful_set["spec"]["replicas"])]  # fmt: skip
        assert ids == expected
        for selector_id in ids:
            assert check_selector_id(selector_id) == selector_id
            host, dialed = split_address(selector_id)
            assert (host, dialed) == (selector_id.rsplit(":", 1)[0], port)


def test_selectors_dial_the_coordinator_service(federation: tuple[str, list[Manifest]]) -> None:
    name, objects = federation
    services = by_kind(objects, "Service")
    (coordinator,) = coordinators(objects)
    for stateful_set in selector_sets(objects).values():
        container = stateful_set["spec"]["template"]["spec"]["containers"][0]
        env = environment(objects, container, name, "any")
        if container.get("command") == ["fl-selector"]:
            address = dict(a.split("=", 1) for a in container["args"][1:])["--coordinator"]
        else:
            address = env["COORDINATOR_ADDRESS"]
        host, port = split_address(address)
        service = services[host]
        assert list(selected(objects, service["spec"]["selector"])) == [coordinator]
        assert port in {p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"}


def test_clients_enter_through_a_service_with_affinity(
    federation: tuple[str, list[Manifest]],
) -> None:
    """A client's check-in and upload are two connections that must reach one selector."""
    _, objects = federation
    selectors = set(selector_sets(objects))
    entries = [s for s in by_kind(objects, "Service").values()
               if s["spec"].get("clusterIP") != "None"
               and set(selected(objects, s["spec"]["selector"])) == selectors]  # fmt: skip
    assert len(entries) == 1
    assert entries[0]["spec"]["sessionAffinity"] == "ClientIP"


def test_our_pods_run_as_the_image_user(name: str, objects: list[Manifest]) -> None:
    ours = {n: p for n, p in pods(objects).items() if p["containers"][0]["image"] == SLIM}
    assert ours
    for pod in ours.values():
        context = pod["securityContext"]
        assert (context["runAsNonRoot"], context["runAsUser"], context["fsGroup"]) == (
            True,
            FL_UID,
            FL_UID,
        )
        for container in containers(pod):
            own = container["securityContext"]
            assert own["allowPrivilegeEscalation"] is False
            assert own["readOnlyRootFilesystem"] is True
            assert own["capabilities"]["drop"] == ["ALL"]
            assert own["capabilities"].get("add", []) == (
                ["CHOWN"] if container["name"] == "volume-owner" else []
            )
            assert container["resources"]["requests"].keys() == {"cpu", "memory"}
            assert container["image"] in (SLIM, FULL)


def test_the_image_user_is_the_pods_user() -> None:
    assert arguments("USER") == [f"{FL_UID}:{FL_UID}"]


def test_images_are_the_ones_build_image_makes() -> None:
    script = (REPO / "scripts" / "build-image").read_text()
    assert 'slim="fl-coordinator:$version"' in script
    assert 'full="fl-coordinator:$version-full"' in script


# -- the whole federation ------------------------------------------------------------------


def test_federation_has_every_part() -> None:
    objects = render(K8S / "digits")
    kinds = {f"{o['kind']}/{o['metadata']['name']}" for o in objects}
    assert kinds == {
        "Namespace/fl-digits", "ConfigMap/fl-settings", "PersistentVolumeClaim/fl-problem-data",
        "StatefulSet/fl-coordinator", "Service/fl-coordinator", "Service/fl-selector",
        "Service/fl-selector-entry", "StatefulSet/fl-selector", "PodDisruptionBudget/fl-selector",
    }  # fmt: skip
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {
        "fl-digits"
    }
    assert by_kind(objects, "ConfigMap")["fl-settings"]["data"]["CHECKIN_LIMIT"] == "6"
    assert by_kind(objects, "StatefulSet")["fl-selector"]["spec"]["replicas"] == 3
    (claim,) = by_kind(objects, "PersistentVolumeClaim").values()
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # selectors write there too
    budget = by_kind(objects, "PodDisruptionBudget")["fl-selector"]["spec"]
    selectors = by_kind(objects, "StatefulSet")["fl-selector"]["spec"]["template"]
    assert budget["selector"]["matchLabels"].items() <= selectors["metadata"]["labels"].items()
    assert budget["maxUnavailable"] == 1


def test_federation_coordinator_is_one_replica_with_tokens_from_the_secret() -> None:
    objects = render(K8S / "federation")
    coordinator = by_kind(objects, "StatefulSet")["fl-coordinator"]["spec"]
    # One, and never two at once, even while updating: a StatefulSet of one. Its pod
    # keeps its name, the host name in the ownership lease it leaves behind.
    assert coordinator["replicas"] == 1
    assert coordinator["serviceName"] == "fl-coordinator"
    assert coordinator.get("updateStrategy", {"type": "RollingUpdate"})["type"] == "RollingUpdate"
    pod = coordinator["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["volume-owner", "init-problem"]
    assert [c["image"] for c in pod["initContainers"]] == [SLIM, FULL]  # init needs Keras
    readme = (REPO / "README.md").read_text()
    selectors = by_kind(objects, "StatefulSet")["fl-selector"]["spec"]["template"]["spec"]
    for container, keys in ((pod["containers"][0], {"AUTH_TOKEN", "STATUS_TOKEN"}),
                            (selectors["containers"][0], {"AUTH_TOKEN"})):  # fmt: skip
        refs = {v["name"]: v["valueFrom"]["secretKeyRef"] for v in container["env"]
                if "secretKeyRef" in v.get("valueFrom", {})}  # fmt: skip
        assert set(refs) == keys
        for key, ref in refs.items():
            assert (ref["name"], ref["key"]) == ("fl-tokens", key)
            assert f"--from-literal={key}=" in readme  # the README makes that Secret


# -- the drop-in set for the original webserver ----------------------------------------------


def test_drop_in_has_the_original_names_and_kinds() -> None:
    objects = render(K8S / "fedota")
    # The spawner creates these kinds only; anything else would be skipped silently.
    assert {o["kind"] for o in objects} <= {"Service", "Pod", "StatefulSet"}
    service = by_kind(objects, "Service")["coordinator"]
    assert {p["port"] for p in service["spec"]["ports"]} >= {50050}
    pod = by_kind(objects, "Pod")["coordinator-0"]["spec"]
    container = pod["containers"][0]
    assert claim_mount(pod, container) == "/mnt"
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "fl-pvc"
    env = {v["name"]: v for v in container["env"]}
    assert env["FL_ROOT_PATH"]["value"] == "/mnt"
    assert int(env["CHECKIN_LIMIT"]["value"]) >= 1
    assert env["PROBLEM_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert not {"AUTH_TOKEN", "AUTH_TOKEN_FILE", "STATUS_TOKEN"} & set(env)  # Go sends none
    selector = by_kind(objects, "StatefulSet")["selector"]["spec"]["template"]["spec"]
    go_env = {v["name"]: v.get("value") for v in selector["containers"][0]["env"]}
    assert go_env["COORDINATOR_ADDRESS"] == "coordinator:50050"
    assert by_kind(objects, "Service")["selector"]["spec"]["ports"][0]["port"] == 50051


def test_rollback_job_restores_on_the_federations_folder() -> None:
    """The Job runs ``rollback --round N`` where the coordinator keeps the problem folder."""
    (job,) = by_kind(render(K8S / "rollback"), "Job").values()
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = build_parser().parse_args(container["command"][1:] + container["args"])
    assert (args.command, args.round) == ("rollback", 1)
    federation = render(K8S / "federation")
    (coordinator,) = coordinators(federation).values()
    serving = coordinator["containers"][0]
    assert container["envFrom"] == serving["envFrom"]  # the same settings: folder, file names
    assert pod["volumes"] == [v for v in coordinator["volumes"] if "persistentVolumeClaim" in v]
    assert claim_mount(pod, container) == claim_mount(coordinator, serving)
    assert pod["securityContext"] == coordinator["securityContext"]


# -- the init containers' commands, run here --------------------------------------------------


def init_command(name: str, container_name: str, root: Path) -> list[str]:
    """An init container's command, with ``root`` where the volume is mounted."""
    (pod,) = coordinators(render(K8S / name)).values()
    (container,) = [c for c in pod["initContainers"] if c["name"] == container_name]
    mount = claim_mount(pod, container)
    return [part.replace(mount, str(root)) for part in container["command"]]


def shell(command: list[str], root: Path) -> subprocess.CompletedProcess[str]:
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # fl-coordinator of .venv
    return subprocess.run(command, env={**os.environ, "PATH": path, "FL_ROOT_PATH": str(root)},
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_init_container_prepares_a_new_folder_once(tmp_path: Path) -> None:
    assert default_settings().init_files_path == "initFiles/"  # what the shell test assumes
    root = tmp_path / "problem"
    command = init_command("federation", "init-problem", root)
    first = shell(command, root)
    assert first.returncode == 0, first.stderr
    checkpoint = root / "initFiles" / "fl_checkpoint"
    made = checkpoint.read_bytes()
    again = shell(command, root)
    assert (again.returncode, again.stdout) == (0, f"{root} is initialised already\n")
    assert checkpoint.read_bytes() == made
    # The drop-in's runs the same test on its fixed folder.
    drop_in = shell(init_command("fedota", "init-problem", root), root)
    assert (drop_in.returncode, drop_in.stdout) == (0, f"{root} is initialised already\n")


@pytest.mark.parametrize("name", ["federation", "fedota"])
def test_volume_owner_hands_a_root_owned_folder_to_the_image_user(
    tmp_path: Path, name: str
) -> None:
    if os.geteuid() != 0:
        pytest.fail(f"chown needs root (CI runs as root); uid here is {os.geteuid()}")
    root = tmp_path / "volume"
    (root / "initFiles").mkdir(parents=True)
    (root / "initFiles" / "fl_checkpoint").write_bytes(b"left by the Go stack")
    (root / "selector-0.selector:50051").mkdir()
    result = shell(init_command(name, "volume-owner", root), root)
    assert result.returncode == 0, result.stderr
    owners = {p.name: p.stat().st_uid for p in (root, *root.rglob("*"))}
    assert owners["volume"] == FL_UID
    assert owners["selector-0.selector:50051"] == 0  # a Go selector's folder stays its own
    if name == "fedota":  # the original's initFiles/ becomes the coordinator's
        assert owners["initFiles"] == owners["fl_checkpoint"] == FL_UID
