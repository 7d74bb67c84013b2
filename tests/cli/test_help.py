"""``--help`` of every command shows each option's default (issue 13, item 10).

Each command's help is asked of the real program (a subprocess); what it
must show is read from the command's own parser, so an option added later is
checked too.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from fl_coordinator.cli.main import build_parser as coordinator_parser
from fl_coordinator.federation.client_cli import build_parser as client_parser
from fl_coordinator.federation.demo_cli import build_parser as demo_parser
from fl_coordinator.federation.selector_cli import build_parser as selector_parser

PYTHON = [sys.executable, "-m"]


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[name]


COMMANDS = {
    "serve": (["fl_coordinator", "serve"], lambda: _subcommand(coordinator_parser(), "serve")),
    "init": (["fl_coordinator", "init"], lambda: _subcommand(coordinator_parser(), "init")),
    "rollback": (
        ["fl_coordinator", "rollback"],
        lambda: _subcommand(coordinator_parser(), "rollback"),
    ),
    "watch": (["fl_coordinator", "watch"], lambda: _subcommand(coordinator_parser(), "watch")),
    "health": (["fl_coordinator", "health"], lambda: _subcommand(coordinator_parser(), "health")),
    "demo": (["fl_coordinator", "demo"], demo_parser),
    "fl-selector serve": (
        ["fl_coordinator.federation.selector_cli", "serve"],
        lambda: _subcommand(selector_parser(), "serve"),
    ),
    "fl-client": (["fl_coordinator.federation.client_cli"], client_parser),
}


def _shown_defaults(parser: argparse.ArgumentParser) -> list[str]:
    """``(default: X)`` for every option whose default says something."""
    return [
        f"(default: {action.default})"
        for action in parser._actions
        if action.default not in (None, False, "", argparse.SUPPRESS)
        and not action.required
        and "(default" not in (action.help or "")
    ]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_shows_every_default(name: str) -> None:
    module, parser = COMMANDS[name]
    done = subprocess.run([*PYTHON, *module, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps lines
    for shown in _shown_defaults(parser()):
        assert shown in text, (name, shown)
    assert "(default: None)" not in text and "(default: False)" not in text


def test_help_shows_the_defaults_operators_ask_about() -> None:
    """A few by value, so that the test above cannot pass on an empty list."""
    assert "(default: 5.0)" in " ".join(
        _shown_defaults(_subcommand(coordinator_parser(), "health"))
    )
    selector = " ".join(_shown_defaults(_subcommand(selector_parser(), "serve")))
    assert "(default: 127.0.0.1:50050)" in selector and "(default: 50051)" in selector
    assert "(default: 127.0.0.1:50051)" in " ".join(_shown_defaults(client_parser()))
