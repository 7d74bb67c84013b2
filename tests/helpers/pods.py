"""Pods of rendered manifests as Kubernetes would start them: their spec, environment, command.

Shared by tests/deploy/test_k8s.py (which checks the manifests against each
other) and tests/deploy/test_k8s_pods.py (which runs the pods as processes).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from typing import Any

from . import REPO
from .containerfile import image_env

__all__ = ["FULL", "SLIM", "VERSION", "by_kind", "command_of", "environment", "expand", "pods"]

Manifest = dict[str, Any]

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
#: The images scripts/build-image makes.
SLIM, FULL = f"fl-coordinator:{VERSION}", f"fl-coordinator:{VERSION}-full"
#: What the image's ENV sets that is no setting of the coordinator.
IMAGE_ONLY = {"PATH", "PYTHONUNBUFFERED"}


def by_kind(objects: list[Manifest], kind: str) -> dict[str, Manifest]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pods(objects: list[Manifest]) -> dict[str, Manifest]:
    """The pod spec of every workload (a Pod's own, a template's), with its labels."""
    found = {}
    for item in objects:
        if item["kind"] == "Pod":
            found[item["metadata"]["name"]] = {"labels": item["metadata"]["labels"], **item["spec"]}
        elif item["kind"] in ("Deployment", "StatefulSet", "Job"):
            template = item["spec"]["template"]
            found[item["metadata"]["name"]] = {"labels": template["metadata"]["labels"],
                                               **template["spec"]}  # fmt: skip
    return found


def environment(
    objects: list[Manifest],
    container: Manifest,
    namespace: str,
    pod: str,
    secret: Callable[[str, str], str],
) -> dict[str, str]:
    """The container's environment as Kubernetes makes it, but PATH and PYTHONUNBUFFERED.

    Our images' ENV first (the Containerfile's), then ``envFrom`` ConfigMaps, then
    ``env``: values, the fieldRefs ``metadata.namespace`` and ``metadata.name``
    (``namespace``, ``pod``), and ``secretKeyRef`` as ``secret(name, key)``.
    """
    config_maps = by_kind(objects, "ConfigMap")
    env: dict[str, str] = {}
    if container["image"] in (SLIM, FULL):
        env.update({k: v for k, v in image_env().items() if k not in IMAGE_ONLY})
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]]["data"])
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        elif "fieldRef" in variable["valueFrom"]:
            path = variable["valueFrom"]["fieldRef"]["fieldPath"]
            env[variable["name"]] = {"metadata.namespace": namespace, "metadata.name": pod}[path]
        else:
            ref = variable["valueFrom"]["secretKeyRef"]
            env[variable["name"]] = secret(ref["name"], ref["key"])
    return env


def expand(argument: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` in command and args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), argument)


def command_of(container: Manifest, env: dict[str, str]) -> list[str]:
    """What the container runs: its command and args, ``$(VAR)`` expanded (no image CMD here)."""
    return [expand(part, env) for part in container["command"] + container.get("args", [])]
