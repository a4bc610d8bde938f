"""What every command module shares: exit codes, output, reading the configuration and JSON input."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from agent import config as config_mod
from agent.core.anchors import TrustAnchor
from agent.errors import InputError

#: 0 ok, 1 a negative result, 2 usage or input error, 3 could not check (engine, registry, broker)
EXIT_OK, EXIT_NEGATIVE, EXIT_ERROR, EXIT_UNAVAILABLE = 0, 1, 2, 3
#: a bug in ImageGuard (sysexits' EX_SOFTWARE): never an answer about the device
EXIT_INTERNAL = 70

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


def json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def warn_issuer_only(anchors: Iterable[TrustAnchor]) -> None:
    """Say so when an identity names only an issuer: it matches everyone that issuer certifies."""
    for anchor in anchors:
        for ident in anchor.issuer_only_identities:
            print(
                f"imageguard: warning: trust anchor {anchor.name!r}: an identity names the issuer "
                f"{ident.issuer or ident.issuer_regexp!r} "
                "but no subject, so it accepts every certificate that issuer grants (any account of an "
                "OIDC provider); add --certificate-identity[-regexp] to say who may sign",
                file=sys.stderr,
            )


def format_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """An aligned table with a header row; the last column is never padded (it may be long)."""
    table = [[str(c) for c in header], *([str(c) for c in row] for row in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    lines = []
    for r in table:
        cells = [c.ljust(w) for c, w in zip(r, widths, strict=False)] + r[len(widths) :]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
