"""``imageguard wire-dockerd``: make dockerd ask the authorization plugin, without losing its configuration.

It merges ``"authorization-plugins": ["imageguard"]`` into an existing ``daemon.json`` (every other setting and
any other plugin kept, the file's mode kept, the previous file saved as ``daemon.json.imageguard-bak``), and
when the plugin socket lies outside ``/run/docker/plugins`` writes the ``.spec`` file that lets dockerd find
it by name. ``--dry-run`` prints the result and changes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from agent.cli.common import EXIT_OK, emit, json_flag, load_config
from agent.errors import InputError

DAEMON_JSON = Path("/etc/docker/daemon.json")
PLUGIN_DIR = Path("/run/docker/plugins")
SPEC_DIR = Path("/etc/docker/plugins")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "wire-dockerd",
        help="merge the authorization plugin into dockerd's daemon.json (keeps everything else)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--daemon-json", metavar="FILE", default=str(DAEMON_JSON), help=f"default {DAEMON_JSON}")
    p.add_argument(
        "--spec-dir", metavar="DIR", default=str(SPEC_DIR), help=f"for a .spec file (default {SPEC_DIR})"
    )
    p.add_argument("--dry-run", action="store_true", help="print what would be written, change nothing")
    json_flag(p)
    p.set_defaults(handler=cmd_wire_dockerd)


def merged(current: dict[str, Any], name: str) -> dict[str, Any]:
    """``current`` with ``name`` among its authorization plugins (pure; refuses a malformed list)."""
    plugins = current.get("authorization-plugins", [])
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise InputError("daemon.json: authorization-plugins is not a list of names; fix it by hand first")
    return {**current, "authorization-plugins": plugins if name in plugins else [*plugins, name]}


def cmd_wire_dockerd(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    socket_path = cfg.preventive.socket
    name = socket_path.stem  # dockerd finds plugin NAME as NAME.sock / NAME.spec
    path = Path(args.daemon_json)
    try:
        text = path.read_text(encoding="utf-8")
        current = json.loads(text) if text.strip() else {}
    except FileNotFoundError:
        text, current = "", {}
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read: {exc}") from None
    except ValueError as exc:
        raise InputError(
            f"{path} is not valid JSON ({exc}); dockerd would not start with it either"
        ) from None
    if not isinstance(current, dict):
        raise InputError(f"{path}: expected a JSON object")
    new = merged(current, name)
    spec = None
    if socket_path.parent != PLUGIN_DIR:
        spec = (Path(args.spec_dir) / f"{name}.spec", f"unix://{socket_path}\n")
    changed = new != current
    result = {
        "daemon_json": str(path),
        "changed": changed,
        "authorization-plugins": new["authorization-plugins"],
        "spec": str(spec[0]) if spec else None,
        "dry_run": args.dry_run,
    }
    if not args.dry_run:
        if changed:
            _write(path, json.dumps(new, indent=2) + "\n", text)
        if spec is not None:
            spec[0].parent.mkdir(parents=True, exist_ok=True)
            spec[0].write_text(spec[1], encoding="utf-8")

    def text_out() -> str:
        lines = [json.dumps(new, indent=2)] if args.dry_run else []
        verb = "would be" if args.dry_run else "is"
        lines.append(
            f"{path} {verb} {'updated' if changed else 'already right'}: authorization-plugins "
            f"{new['authorization-plugins']}"
        )
        if spec is not None:
            lines.append(f"{spec[0]} {verb} written (the socket {socket_path} is outside {PLUGIN_DIR})")
        if changed and not args.dry_run:
            lines.append(
                "restart dockerd to apply it (systemctl restart docker), with the agent running first"
            )
        return "\n".join(lines)

    emit(args, result, text_out)
    return EXIT_OK


def _write(path: Path, content: str, previous: str) -> None:
    """Atomically, keeping the file's mode; the previous content is kept as ``<file>.imageguard-bak``."""
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    if previous:
        path.with_name(path.name + ".imageguard-bak").write_text(previous, encoding="utf-8")
    tmp = path.with_name(path.name + ".imageguard-tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(content, encoding="utf-8")
    os.chmod(tmp, mode)
    os.replace(tmp, path)
