"""The README's own code blocks, for tests that run them as written.

A walkthrough test takes its commands from README.md through :func:`block`,
so the README cannot drift from what is tested: a block that is not found
(its section renamed, its marker text gone) fails the test loudly, naming
what was looked for. :func:`commands` splits a shell block into its commands
(continuation lines joined), grouped under the comment line above them (the
README's ``# coordinator (one per FL problem)``, ``# each selector ...``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import REPO

__all__ = ["BlockNotFound", "Part", "block", "commands", "part", "replaced"]

README = REPO / "README.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_HEADING = re.compile(r"^(#{1,6}) (.+)$")


class BlockNotFound(AssertionError):
    """The README no longer holds the block a walkthrough test runs."""


def _section(text: str, heading: str) -> str:
    """The text under the heading ``heading`` (any level), up to the next of its level or above.

    Lines in code blocks are not headings (a shell comment starts with ``#`` too).
    """
    lines = text.splitlines(keepends=True)
    fenced = False
    start, level = None, 0
    for index, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
            continue
        found = None if fenced else _HEADING.match(line)
        if found is None:
            continue
        if start is not None and len(found.group(1)) <= level:
            return "".join(lines[start:index])
        if start is None and found.group(2).strip() == heading:
            start, level = index + 1, len(found.group(1))
    if start is None:
        raise BlockNotFound(f"README.md has no section headed {heading!r}")
    return "".join(lines[start:])


def block(heading: str, containing: str, language: str = "sh") -> str:
    """The one ``language`` code block of the section ``heading`` that contains ``containing``."""
    section = _section(README.read_text(), heading)
    # Fences outside the code blocks of this language (```text, ```yaml) still delimit blocks.
    found = [body for lang, body in _FENCE.findall(section)
             if lang == language and containing in body]  # fmt: skip
    if len(found) != 1:
        raise BlockNotFound(
            f"README.md, section {heading!r}: {len(found)} ```{language} blocks contain "
            f"{containing!r} (a walkthrough test runs exactly one)"
        )
    return found[0]


@dataclass(frozen=True)
class Part:
    """The commands under one comment line of a block (``title``: the comment, without ``#``)."""

    title: str
    lines: list[str]


def commands(text: str) -> list[Part]:
    """The block's commands, continuation lines joined, grouped by the comment lines above them.

    Consecutive comment lines make one title; commands before any comment line
    form a part titled ``""``; trailing comments stay on their command (``sh``
    ignores them).
    """
    parts = [Part("", [])]
    for line in re.sub(r"\\\n\s*", "", text).splitlines():
        if line.startswith("#"):
            comment = line.lstrip("#").strip()
            if parts[-1].lines or not parts[-1].title:
                parts.append(Part(comment, []))
            else:
                parts[-1] = Part(f"{parts[-1].title} {comment}", [])
        elif line.strip():
            parts[-1].lines.append(line.strip())
    return [part for part in parts if part.lines]


def part(parts: list[Part], title_start: str) -> list[str]:
    """The lines of the one part whose title starts with ``title_start``."""
    found = [p for p in parts if p.title.startswith(title_start)]
    if len(found) != 1:
        raise BlockNotFound(f"{len(found)} parts of the block are titled {title_start!r}...")
    return found[0].lines


def replaced(line: str, *changes: tuple[str, str]) -> str:
    """``line`` with each (old, new) replaced; an ``old`` that is not there fails loudly,
    so a substitution a test documents cannot silently stop applying."""
    for old, new in changes:
        if old not in line:
            raise BlockNotFound(f"{old!r} is no longer in the README's line {line!r}")
        line = line.replace(old, new)
    return line
