"""How every command line of the project shows its ``--help``: with each option's default."""

from __future__ import annotations

import argparse

__all__ = ["HelpFormatter"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after each option's help, where there is a default to show.

    argparse's own formatter also writes ``(default: None)`` for options with
    no default, ``(default: False)`` for flags and ``(default: )`` for an
    empty one; those say nothing, and are left out, as is a default the help
    text already explains (``(default: FL_ROOT_PATH)``).
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if (
            action.default in (None, False, "", argparse.SUPPRESS)
            or action.required
            or "(default" in (action.help or "")
        ):
            return action.help
        return super()._get_help_string(action)
