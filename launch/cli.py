"""What every entry point does with a mistake its user can fix, and how its ``--help`` lists the config keys.

A mistake in a config, a path or a file (``ConfigError``, ``InputError``, ``CheckpointError``,
``StatisticsError``), or a full disk (``StorageFull``), ends the program with one line on stderr that
names the key or the file, what was given and what was expected (or what was kept), and exit code 2:
no traceback, which would bury that line.
``--debug`` (or ``COSMOS_DEBUG=1``) shows the traceback. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

from cosmos_policy.errors import CheckpointError, ConfigError, InputError, StatisticsError, StorageFull

USER_ERRORS = (ConfigError, InputError, CheckpointError, StatisticsError, StorageFull)
EXIT_USER_ERROR = 2


def debugging(argv: list[str] | None = None) -> bool:
    return "--debug" in (sys.argv if argv is None else argv) or os.environ.get("COSMOS_DEBUG", "") not in ("", "0")


def one_line(exc: BaseException) -> str:
    """The error's message on one line (a remote actor's error: its cause's message, not Ray's wrapping)."""
    cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError keeps the original exception here
    if isinstance(cause, USER_ERRORS):
        exc = cause
    return " ".join(str(exc).split())


def guard(main: Callable[[], Any], argv: list[str] | None = None) -> Any:
    """Run ``main``; a user's mistake is one line on stderr and exit code 2 (``--debug``: the traceback)."""
    try:
        return main()
    except USER_ERRORS as exc:
        if debugging(argv):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


def run_command(parser: argparse.ArgumentParser, command: Callable[[argparse.Namespace], Any], argv: list[str] | None = None) -> Any:
    """An entry point's ``main``: parse ``argv``, then ``command(args)`` under ``guard``."""
    args = parser.parse_args(argv)
    return guard(lambda: command(args), argv)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of its one line (also COSMOS_DEBUG=1)")


def keys_epilog(intro: str) -> str:
    """``intro``, then every config key of an experiment with its default and one-line docstring."""
    from launch.config import config_keys

    rows = [f"  {key} = {default!r}\n      {doc}" for key, default, doc in config_keys()]
    return f"{intro}\n\nconfig keys (override any as key=value; defaults before the experiment's YAML):\n" + "\n".join(rows)
