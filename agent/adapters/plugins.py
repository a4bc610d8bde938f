"""Where dockerd finds a legacy plugin by name: sockets in /run/docker/plugins, then spec files."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

PLUGIN_SOCKET_DIR = Path("/run/docker/plugins")
PLUGIN_SPEC_DIRS = (Path("/etc/docker/plugins"), Path("/usr/lib/docker/plugins"))


def resolve_plugin(name: str) -> str | None:
    """The address dockerd uses for a legacy plugin name (socket dir first, then spec files)."""
    for sock in (PLUGIN_SOCKET_DIR / f"{name}.sock", PLUGIN_SOCKET_DIR / name / f"{name}.sock"):
        if sock.exists():
            return f"unix://{sock}"
    for d in PLUGIN_SPEC_DIRS:
        for spec in (d / f"{name}.spec", d / name / f"{name}.spec"):
            try:
                return spec.read_text(encoding="utf-8").strip()
            except OSError:
                continue
        try:
            doc = json.loads((d / f"{name}.json").read_text(encoding="utf-8"))
            return str(doc.get("Addr")) if isinstance(doc, dict) else None
        except (OSError, ValueError):
            continue
    return None


def plugin_names(socket: Path, configured: Iterable[str]) -> set[str]:
    """The names ImageGuard's plugin on ``socket`` goes by: its socket file's stem, and every configured
    authorization plugin name that dockerd resolves to that socket."""
    ours = f"unix://{socket}"
    return {socket.stem} | {n for n in configured if resolve_plugin(n) == ours}
