"""The closest thing to a cluster without one: rendered manifests' pods run as processes.

There is no Kubernetes here, so :class:`Cluster` does, for the objects of a
rendered kustomization (helpers/kustomize.py), what the cluster would do with
them, and :meth:`Cluster.kubectl` carries out the README's ``kubectl`` lines:

* each pod of a StatefulSet (``NAME-0``, ``NAME-1`` ...) or Job is a host of its
  own (a network namespace, helpers/netns.py) with the pod's name as its host
  name, whose ``/etc/hosts`` resolves the Services' DNS names as cluster DNS
  would (``fl-coordinator``: the coordinator's pod; ``fl-selector-0.fl-selector``:
  that selector, under its headless Service);
* a pod runs its init containers in order (each must exit 0), then its main
  container, each as the command and args of the manifest (``$(VAR)`` expanded)
  under ``sh``, with the environment Kubernetes would give it (the image's ENV,
  ConfigMaps, values, fieldRefs, the Secret's keys: helpers/pods.py), as the
  manifest's user, with the claim's folder and its emptyDirs mounted where the
  manifest mounts them;
* a pod is ready when its main container says it serves (instead of the probes).

Not modelled: images (this checkout's commands run instead), probes, the
read-only root file system, resource limits, Service load-balancing (a client
host's ``fl-selector-entry`` is one chosen selector, as ``ClientIP`` affinity
keeps a client on one), a scheduler, restarts on failure.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Any

import trio

from . import REPO
from .kustomize import render
from .netns import Host, Network
from .pods import by_kind, command_of, environment, pods
from .walkthrough import Operator, Program, Shell

__all__ = ["Cluster"]

Manifest = dict[str, Any]

#: What a main container logs once it serves (standing in for its readiness probe).
READY = {"fl-coordinator": r"status stream at", "fl-selector": r"selector \S+ serving"}
_FIRST_POD_ADDRESS = 10  # 192.0.2.10, .11, ...


class Cluster:
    """One namespace's objects, its pods as processes (see the module's docstring)."""

    def __init__(self, network: Network, operator: Operator, root: Path, namespace: str) -> None:
        self.network = network
        self.operator = operator
        self.root = root  # the claim's folder, and the pods' emptyDirs
        self.namespace = namespace
        self.volume = root / "volume"
        self.volume.mkdir(parents=True)
        self.objects: list[Manifest] = []
        self.secrets: dict[str, dict[str, str]] = {}
        self.hosts: dict[str, Host] = {}
        self.running: dict[str, Program] = {}  # pod -> its main container
        self._starts: dict[str, int] = {}
        self._ready: dict[str, trio.Event] = {}
        self._entries: dict[str, str] = {}  # client host -> the selector pod it enters by

    # -- the kubectl lines of the README -----------------------------------------------------

    async def kubectl(self, line: str) -> Program | None:
        """Carry out one ``kubectl`` line; ``exec`` returns what it started, ``logs`` the pod's
        main container."""
        words = shlex.split(line, comments=True)
        assert words[0] == "kubectl", line
        words = words[1:]
        if words[:1] == ["-n"]:
            assert words[1] == self.namespace, line
            words = words[2:]
        match words:
            case ["create", "namespace", name]:
                assert name == self.namespace, line
            case ["create", "secret", "generic", name, *literals]:
                self.secrets[name] = dict(_literal(item) for item in literals)
            case ["apply", "-k", folder]:
                await self.apply(REPO / folder)
            case ["rollout", "status", workload]:
                await self.rollout_status(workload.split("/", 1)[1])
            case ["exec", *rest] if "--" in rest:
                *flags, pod = rest[: rest.index("--")]
                assert set(flags) <= {"-it", "-i", "-t"}, line
                return await self.exec(pod, shlex.join(rest[rest.index("--") + 1 :]))
            case ["logs", "-f", pod]:
                return self.running[pod]
            case ["scale", workload, replicas] if replicas.startswith("--replicas="):
                await self.scale(workload.split("/", 1)[1], int(replicas.split("=", 1)[1]))
            case ["wait", "--for=delete", pod]:
                status = await self.running[pod.split("/", 1)[1]].wait()
                assert status == 0, f"{pod} stopped with status {status}"
            case ["wait", "--for=condition=complete", job]:
                program = self.running[f"{job.split('/', 1)[1]}-job"]
                status = await program.wait()
                assert status == 0, f"{job} failed ({status}):\n{program.tail()}"
            case _:
                raise AssertionError(f"the test's cluster does not know `{line}`")
        return None

    async def apply(self, folder: Path) -> None:
        """Take the rendered objects of ``folder``; start the pods of new workloads."""
        rendered = render(folder)
        for item in rendered:
            item["metadata"].setdefault("namespace", self.namespace)
        self.objects += rendered
        new = [pod for item in rendered for pod in self._pods_of(item)]
        for pod in new:
            self._host(pod)
        for pod in new:
            await self._start(pod)

    async def rollout_status(self, stateful_set: str) -> None:
        """Wait until every pod of ``stateful_set`` is ready."""
        for pod in self._pods_of(by_kind(self.objects, "StatefulSet")[stateful_set]):
            await self._ready[pod].wait()

    async def scale(self, stateful_set: str, replicas: int) -> None:
        item = by_kind(self.objects, "StatefulSet")[stateful_set]
        before = self._pods_of(item)
        item["spec"]["replicas"] = replicas
        after = self._pods_of(item)
        for pod in before[replicas:]:
            self.running[pod].stop()  # SIGTERM, as the kubelet sends it
        for pod in after[len(before) :]:
            await self._start(pod)

    async def exec(self, pod: str, line: str) -> Program:
        """Start ``line`` in ``pod``, with its main container's environment."""
        spec, container = self._spec(pod)
        return await self._run(pod, spec, container, line, "exec")

    # -- clients, outside the pods -------------------------------------------------------------

    def client(self, name: str, entry: str) -> Host:
        """A client's host, for which ``fl-selector-entry`` is the selector pod ``entry``."""
        self._entries[name] = entry
        return self._host(name)

    # -- pods ----------------------------------------------------------------------------------

    def _pods_of(self, item: Manifest) -> list[str]:
        name = item["metadata"]["name"]
        if item["kind"] == "StatefulSet":
            return [f"{name}-{index}" for index in range(item["spec"]["replicas"])]
        return [f"{name}-job"] if item["kind"] == "Job" else []

    def _spec(self, pod: str) -> tuple[Manifest, Manifest]:
        """The pod spec of ``pod`` and its main container."""
        workload = pod.rsplit("-", 1)[0]
        spec = pods(self.objects)[workload]
        return spec, spec["containers"][0]

    def _host(self, name: str) -> Host:
        if name not in self.hosts:
            address = f"192.0.2.{_FIRST_POD_ADDRESS + len(self.hosts)}"
            self.hosts[name] = self.network.add(f"h{len(self.hosts)}", address)
        for host_name, host in self.hosts.items():
            self.network.resolve(host, self._names(host_name))
        return self.hosts[name]

    def _names(self, host_name: str) -> dict[str, str]:
        """What cluster DNS answers on ``host_name``: Services' names and pods' under
        headless Services (the Services here are one of each kind)."""
        names = {}
        for service in by_kind(self.objects, "Service").values():
            if service["spec"].get("clusterIP") == "None":  # headless: pod.service
                for stateful_set in by_kind(self.objects, "StatefulSet").values():
                    if stateful_set["spec"]["serviceName"] == service["metadata"]["name"]:
                        for pod in self._pods_of(stateful_set):
                            if pod in self.hosts:
                                names[f"{pod}.{service['metadata']['name']}"] = self.hosts[
                                    pod
                                ].address
        coordinator = self.hosts.get("fl-coordinator-0")
        if coordinator is not None:
            names["fl-coordinator"] = coordinator.address
        entry = self._entries.get(host_name)
        if entry is not None:
            names["fl-selector-entry"] = self.hosts[entry].address
        return names

    def _shell(self, pod: str, spec: Manifest, container: Manifest, env: dict[str, str]) -> Shell:
        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        binds = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                binds[mount["mountPath"]] = self.volume
            else:  # an emptyDir: the pod's own, writable by any user (as Kubernetes makes it)
                folder = self.root / "emptyDir" / pod / mount["name"]
                folder.mkdir(parents=True, exist_ok=True)
                folder.chmod(0o1777)
                binds[mount["mountPath"]] = folder
        context = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
        return Shell(self.hosts[pod], Path("/tmp"), binds=binds, env=env, hostname=pod,
                     user=context.get("runAsUser"))  # fmt: skip

    async def _run(
        self, pod: str, spec: Manifest, container: Manifest, line: str | None, what: str
    ) -> Program:
        env = environment(self.objects, container, self.namespace, pod, self._secret)
        line = line if line is not None else shlex.join(command_of(container, env))
        self._starts[pod] = self._starts.get(pod, 0) + 1
        name = f"{pod}-{self._starts[pod]}-{container['name']}-{what}"
        return await self.operator.start(name, self._shell(pod, spec, container, env), line)

    async def _start(self, pod: str) -> None:
        """Run the pod's init containers, then start its main container (in the background)."""
        spec, main = self._spec(pod)
        self._ready[pod] = trio.Event()
        for container in spec.get("initContainers", []):
            program = await self._run(pod, spec, container, None, "init")
            status = await program.wait()
            assert status == 0, (
                f"{pod}: init container {container['name']} failed:\n{program.tail()}"
            )
        program = await self._run(pod, spec, main, None, "main")
        self.running[pod] = program
        if not pod.endswith("-job"):  # a Job's pod is not ready: it completes
            ready = READY[main["command"][0]]
            self.operator.nursery.start_soon(self._readiness, program, ready, self._ready[pod])

    @staticmethod
    async def _readiness(program: Program, ready: str, event: trio.Event) -> None:
        await program.line(ready)
        event.set()

    def _secret(self, name: str, key: str) -> str:
        return self.secrets[name][key]


def _literal(item: str) -> tuple[str, str]:
    """``--from-literal=KEY=VALUE``, VALUE as the shell expands it (``$(openssl rand -hex 24)``)."""
    assert item.startswith("--from-literal="), item
    key, value = item.removeprefix("--from-literal=").split("=", 1)
    expanded = subprocess.run(["sh", "-c", f'printf %s "{value}"'], capture_output=True,
                              text=True, check=True, timeout=30)  # fmt: skip
    return key, expanded.stdout
