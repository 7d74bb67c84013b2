"""The Containerfile read as text: its instructions, stage by stage, and the images' ENV."""

from __future__ import annotations

import re
import shlex

from . import REPO

__all__ = ["CONTAINERFILE", "arguments", "image_env", "instructions", "stages"]

CONTAINERFILE = REPO / "Containerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), " ".join(rest.split())))
    return found


def stages() -> dict[str, list[tuple[str, str]]]:
    """The instructions of each stage, by stage name, in order (``FROM`` first)."""
    found: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for word, rest in instructions():
        if word == "FROM":
            current = found.setdefault(rest.rsplit(" AS ", 1)[-1], [])
        current.append((word, rest))
    return found


def arguments(name: str, stage: str | None = None) -> list[str]:
    source = instructions() if stage is None else stages()[stage]
    return [rest for word, rest in source if word == name]


def image_env() -> dict[str, str]:
    """The environment both images start with (the runtime stage's ENV)."""
    values: dict[str, str] = {}
    for rest in arguments("ENV", "runtime"):
        values.update(pair.split("=", 1) for pair in shlex.split(rest))
    return values
