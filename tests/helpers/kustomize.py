"""A small renderer of the kustomizations in scripts/k8s, for machines without kubectl.

It does what ``kubectl kustomize`` does with the fields those kustomizations
use, and refuses every other field (``NotImplementedError``), so it cannot
quietly render something else: ``resources`` (files, and folders holding a
kustomization), ``namespace``, ``patches`` (strategic-merge patch files of maps
and scalars, matched by kind and name), ``replicas``. Debian's kubectl (1.20)
is too old for these kustomizations; where a newer kubectl is installed,
tests/deploy/test_k8s.py checks that both render the same objects.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

__all__ = ["files_of", "render"]

Manifest = dict[str, Any]

_FIELDS = {"apiVersion", "kind", "resources", "namespace", "patches", "replicas"}
_CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole",
                   "ClusterRoleBinding", "PriorityClass", "CustomResourceDefinition"}  # fmt: skip
_SCALED = {"Deployment", "StatefulSet", "ReplicaSet", "ReplicationController"}


def _kustomization(folder: Path) -> dict[str, Any]:
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(spec) - _FIELDS
    if unknown:
        raise NotImplementedError(
            f"{folder}/kustomization.yaml: {sorted(unknown)} not rendered here"
        )
    return spec


def _documents(path: Path) -> list[Manifest]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def _find(objects: list[Manifest], kinds: set[str] | None, name: str) -> Manifest:
    found = [
        o for o in objects if o["metadata"]["name"] == name and (not kinds or o["kind"] in kinds)
    ]
    if len(found) != 1:
        raise ValueError(f"{len(found)} objects named {name!r} of kinds {kinds}")
    return found[0]


def _merge(target: Manifest, patch: Manifest, where: str) -> None:
    """Strategic merge of maps and scalars; a list in a patch is refused."""
    for key, value in patch.items():
        if isinstance(value, list):
            raise NotImplementedError(f"{where}.{key}: lists in patches are not rendered here")
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value, f"{where}.{key}")
        else:
            target[key] = copy.deepcopy(value)


def render(folder: Path) -> list[Manifest]:
    """The objects ``kubectl kustomize folder`` prints (in the order of the sources)."""
    spec = _kustomization(folder)
    objects: list[Manifest] = []
    for entry in spec.get("resources", []):
        path = folder / entry
        objects += render(path) if path.is_dir() else _documents(path)
    for patch in spec.get("patches", []):
        if set(patch) != {"path"}:
            raise NotImplementedError(f"{folder}: patch {patch}: only `path:` is rendered here")
        for document in _documents(folder / patch["path"]):
            target = _find(objects, {document["kind"]}, document["metadata"]["name"])
            _merge(target, document, f"{patch['path']}:{document['kind']}")
    for entry in spec.get("replicas", []):
        _find(objects, _SCALED, entry["name"])["spec"]["replicas"] = entry["count"]
    namespace = spec.get("namespace")
    for item in objects if namespace else []:
        if item["kind"] == "Namespace" and item["metadata"]["name"] != namespace:
            raise NotImplementedError(f"{folder}: a Namespace other than {namespace!r}")
        if item["kind"] not in _CLUSTER_SCOPED:
            item["metadata"]["namespace"] = namespace
    return objects


def files_of(folder: Path) -> set[Path]:
    """Every file the kustomization in ``folder`` reads, its own included."""
    spec = _kustomization(folder)
    files = {folder / "kustomization.yaml"}
    for entry in spec.get("resources", []):
        path = (folder / entry).resolve()
        files |= files_of(path) if path.is_dir() else {path}
    return files | {folder / patch["path"] for patch in spec.get("patches", [])}
