"""The ``imageguard`` command line: parse arguments, call the library, print. Nothing else lives here.

Exit codes: 0 success, 1 a negative result (something blocked, not valid, not found), 2 usage or input error,
3 could not check (engine, registry or broker unreachable).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from agent import __version__
from agent import config as config_mod
from agent.cli.common import EXIT_INTERNAL, EXIT_OK, Handler
from agent.errors import ImageGuardError


def build_parser() -> argparse.ArgumentParser:
    # the command modules load only when the parser is built: importing agent.cli stays cheap
    from agent.cli import agent, console, docs, doctor, instances, plugin, state, verify

    parser = argparse.ArgumentParser(
        prog="imageguard",
        description="Lets only trusted container images run on this device.",
        epilog="Exit codes: 0 success, 1 negative result, 2 usage or input error, 3 could not check "
        "(engine, registry or broker unreachable). The configuration file can also be named by "
        "IMAGEGUARD_CONFIG.",
    )
    parser.add_argument("--version", action="version", version=f"imageguard {__version__}")
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=os.environ.get("IMAGEGUARD_CONFIG") or None,
        help=f"configuration file (default $IMAGEGUARD_CONFIG, else {config_mod.DEFAULT_CONFIG_PATH} if present)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (agent, verify, console, doctor, instances, state, plugin, docs):
        module.register(sub)
    _config_everywhere(parser)
    parser.set_defaults(root_parser=parser)  # for the commands generated from it (agent/cli/docs.py)
    return parser


def _config_everywhere(parser: argparse.ArgumentParser) -> None:
    """``--config`` after the subcommand too (``imageguard status --config F``); given there, it wins."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in dict.fromkeys(action.choices.values()):
                subparser.add_argument(
                    "--config", metavar="FILE", default=argparse.SUPPRESS, help="configuration file"
                )
                _config_everywhere(subparser)


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
    except Exception as exc:
        # a bug, not the user's input: one line that says so; the traceback only when asked for
        if os.environ.get("IMAGEGUARD_DEBUG"):
            raise
        print(
            f"imageguard: internal error: {type(exc).__name__}: {exc} (this is a bug; run again with "
            "IMAGEGUARD_DEBUG=1 for the traceback and report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
