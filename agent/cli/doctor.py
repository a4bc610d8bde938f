"""``imageguard doctor``: check and explain the set-up (engine, authorization plugin, state, broker, clock)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent.cli.common import EXIT_NEGATIVE, EXIT_OK, emit, json_flag, load_config

_MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "--  "}


def register(sub: Any) -> None:
    p = sub.add_parser("doctor", help="check the set-up and explain what to fix (exit 1 if anything fails)")
    p.add_argument(
        "--daemon-json",
        metavar="FILE",
        default=None,
        help="dockerd's configuration, read when the engine cannot be asked (default /etc/docker/daemon.json)",
    )
    json_flag(p)
    p.set_defaults(handler=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from agent.cli import diagnose as doctor

    cfg = load_config(args)
    daemon_json = Path(args.daemon_json) if args.daemon_json else doctor.DAEMON_JSON
    checks = doctor.run_checks(cfg, daemon_json=daemon_json)
    report = doctor.to_dict(checks)

    def text() -> str:
        lines = []
        for c in checks:
            lines.append(f"{_MARK[c.status]}  {c.name:<16} {c.detail}")
            if c.hint and c.status in ("fail", "warn"):
                lines.append(f"      {'':<16} -> {c.hint}")
        return "\n".join(lines)

    emit(args, report, text)
    return EXIT_OK if report["ok"] else EXIT_NEGATIVE
