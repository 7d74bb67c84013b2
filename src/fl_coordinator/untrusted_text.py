"""Bounded, escaped text from the network, for log lines, status messages and errors.

A peer chooses every byte it sends: a selector id of 3 MiB, a header value
with a newline and a forged log line after it, terminal escape sequences.
Whatever comes from the network and is shown to a person goes through
:func:`shown` first: at most :data:`LIMIT` characters, non-printable ones
escaped (so one value stays one line, and a terminal shows it as text), and
the full length when it was cut. :func:`cut` bounds the length only, for
places that escape by themselves (JSON, ``repr``).

The cost does not depend on the size of the value: only its first
:data:`LIMIT` characters are looked at.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["LIMIT", "cut", "shown", "shown_ends"]

#: Characters of a value from the network kept in a log line or message.
LIMIT = 200


def _marker(length: int, unit: str) -> str:
    return f"…[{length} {unit}]"


def cut(value: str, limit: int = LIMIT) -> str:
    """``value`` if it has at most ``limit`` characters, else its start and its length.

    ``cut("a" * 3_000_000)`` is ``"aaa…[3000000 chars]"``, at most ``limit``
    characters long in all.
    """
    if len(value) <= limit:
        return value
    marker = _marker(len(value), "chars")
    return value[: max(0, limit - len(marker))] + marker


def _escape(char: str) -> str:
    if char == "\\":
        return "\\\\"
    if char.isprintable():
        return char
    return char.encode("unicode_escape").decode("ascii")


def _escaped_within(chars: Iterable[str], room: int) -> list[str]:
    """The escapes of ``chars``, in order, as many whole ones as fit in ``room`` characters:
    a cut never splits an escape (``\\n`` cut to ``n`` would read as a letter)."""
    kept: list[str] = []
    for char in chars:
        escaped = _escape(char)
        room -= len(escaped)
        if room < 0:
            break
        kept.append(escaped)
    return kept


def shown(value: str | bytes, limit: int = LIMIT) -> str:
    """``value`` as one printable line of at most ``limit`` characters.

    Control and other non-printable characters (newlines, ESC, bidi
    overrides) are written as Python escapes (``\\n``, ``\\x1b``,
    ``\\u202e``) and backslashes doubled, so the text cannot be mistaken for
    something else. Bytes are decoded as UTF-8 (invalid sequences replaced).
    A longer value ends with ``…[<length> chars]`` (``bytes`` for bytes).
    """
    if isinstance(value, bytes):
        length, unit = len(value), "bytes"
        text = value[:limit].decode("utf-8", "replace")
    else:
        length, unit = len(value), "chars"
        text = value[:limit]
    escaped = "".join(map(_escape, text))
    if length <= limit and len(escaped) <= limit:
        return escaped
    marker = _marker(length, unit)
    return "".join(_escaped_within(text, limit - len(marker))) + marker


def shown_ends(value: str, limit: int = LIMIT) -> str:
    """``value`` escaped as by :func:`shown`, but a longer one keeps its start *and* its end.

    For a message that names something before it says what is wrong with it
    (``<path>: dataset 'x' is a soft link (only hard links are followed)``): on a
    long path, a cut at the end would leave the name and lose the explanation.
    ``shown_ends("a" * 1000 + "!", 40)`` is ``"aaaaaaaa…[1001 chars]…aaaaaaaaaaaaaaaaa!"``:
    a third of the room for the start, the rest for the end, at most ``limit``
    characters in all.
    """
    escaped = "".join(map(_escape, value[: limit + 1]))
    if len(value) <= limit and len(escaped) <= limit:
        return escaped
    marker = f"{_marker(len(value), 'chars')}…"
    room = max(0, limit - len(marker))
    head, tail = room // 3, room - room // 3
    start = _escaped_within(value[:head], head)
    end = _escaped_within(reversed(value[-tail:]) if tail else (), tail)
    return "".join(start) + marker + "".join(reversed(end))
