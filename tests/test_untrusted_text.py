"""Text from the network, bounded and escaped before a person sees it."""

from __future__ import annotations

import pytest

from fl_coordinator.untrusted_text import LIMIT, cut, shown, shown_ends


def test_short_printable_text_is_unchanged() -> None:
    assert shown("10.0.0.5:50051") == "10.0.0.5:50051" == cut("10.0.0.5:50051")
    assert shown("sélecteur-Ω:1") == "sélecteur-Ω:1"  # printable Unicode stays readable


def test_a_huge_value_is_cut_with_its_length() -> None:
    huge = "7" * (3 * 1024 * 1024)
    for bounded in (shown(huge), cut(huge)):
        assert len(bounded) <= LIMIT
        assert bounded.startswith("777") and bounded.endswith("…[3145728 chars]")
    assert shown(b"\xff" * 1000, limit=50).endswith("…[1000 bytes]")


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("a\nFAKE LOG LINE", "a\\nFAKE LOG LINE"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("bidi\u202etxt.exe", "bidi\\u202etxt.exe"),
        ("back\\slash", "back\\\\slash"),
        (b"bytes\x00\xff", "bytes\\x00\ufffd"),
    ],
)
def test_what_is_not_printable_is_escaped(raw: str | bytes, escaped: str) -> None:
    assert shown(raw) == escaped
    assert "\n" not in shown(raw * 100)


def test_escaping_cannot_make_it_longer_than_the_limit() -> None:
    value = "\x00" * 150  # 150 chars, 600 once escaped
    assert len(shown(value, limit=200)) <= 200
    assert shown(value, limit=200).endswith("…[150 chars]")


def _escapes(value: str) -> list[str]:
    return [shown(char, limit=20) for char in value]


@pytest.mark.parametrize("unit", ["\n", "\x1b", "\u202e", "\\", "é\x00", "ab\U000e0001"])
@pytest.mark.parametrize("limit", [30, 41, 64, 200])
def test_a_cut_never_splits_an_escape(unit: str, limit: int) -> None:
    """What is kept of a long value is whole escapes: its start a run of them from the
    first character on, its end (shown_ends) a run of them up to the last."""
    value = unit * 500
    escapes = _escapes(value)
    heads = {"".join(escapes[:n]) for n in range(len(escapes) + 1)}
    tails = {"".join(escapes[n:]) for n in range(len(escapes) + 1)}
    cut_start = shown(value, limit)
    assert len(cut_start) <= limit and cut_start.endswith(f"…[{len(value)} chars]")
    assert cut_start.partition("…[")[0] in heads
    both = shown_ends(value, limit)
    start, _, rest = both.partition("…[")
    end = rest.partition("]…")[2]
    assert len(both) <= limit and start in heads and end in tails
    assert end, "a long value keeps some of its end"
