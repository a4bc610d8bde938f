"""The ``imageguard`` command line: parse arguments, call the library, print. Nothing else lives here.

Exit codes: 0 success, 1 a negative result (something blocked, not valid, not found), 2 usage or input error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent import __version__
from agent import config as config_mod
from agent.errors import ImageGuardError, InputError

EXIT_OK, EXIT_NEGATIVE, EXIT_ERROR = 0, 1, 2

Handler = Callable[[argparse.Namespace], int]


def emit(args: argparse.Namespace, data: Any, text: Callable[[], str] | str) -> None:
    """Print ``data`` as JSON with --json, else the human text."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        out = text() if callable(text) else text
        if out:
            print(out)


def load_config(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(Path(args.config) if args.config else None)


def read_json_file(path: str, what: str) -> Any:
    try:
        raw = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InputError(f"{what} {path}: not UTF-8 text") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} {path}: not valid JSON: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    from agent import cli_agent  # the agent-side commands

    parser = argparse.ArgumentParser(
        prog="imageguard",
        description="Lets only trusted container images run on this device.",
        epilog="Exit codes: 0 success, 1 negative result, 2 usage or input error.",
    )
    parser.add_argument("--version", action="version", version=f"imageguard {__version__}")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"configuration file (default {config_mod.DEFAULT_CONFIG_PATH} if present)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cli_agent.register(sub)
    for module in _optional_command_modules():
        module.register(sub)
    return parser


def _optional_command_modules() -> list[Any]:
    import importlib

    out = []
    for name in ("agent.cli_verify", "agent.cli_console", "agent.cli_doctor", "agent.cli_instances"):
        try:
            out.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return out


def json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    if args.command != "run":
        # one-shot commands report through their output and exit code; the library's log is for the agent
        logging.basicConfig(level=logging.ERROR, format="imageguard: %(levelname)s: %(message)s")
    try:
        return handler(args)
    except ImageGuardError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": {"code": exc.code, "message": str(exc)}}, indent=2))
        print(f"imageguard: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into head & co: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
