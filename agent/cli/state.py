"""``imageguard state``: the state database's backup and restore."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent.cli.common import EXIT_OK, emit, json_flag, load_config
from agent.errors import StateError


def register(sub: Any) -> None:
    p = sub.add_parser("state", help="back up and restore the state database")
    ssub = p.add_subparsers(dest="state_command", metavar="ACTION", required=True)
    b = ssub.add_parser(
        "backup",
        help="save a consistent copy of the state database (safe while the agent runs)",
        description="The agent keeps one itself (state.db.bak, after start and every policy change).",
    )
    b.add_argument("--to", metavar="FILE", help="where to save it (default: STATE_DIR/state.db.bak)")
    json_flag(b)
    b.set_defaults(handler=cmd_backup)
    r = ssub.add_parser(
        "restore",
        help="put a backup back in place of the state database (stop the agent first)",
        description="The database it replaces is kept beside it as state.db.replaced-<time>, never deleted.",
    )
    r.add_argument(
        "--from", dest="source", metavar="FILE", help="the backup (default: STATE_DIR/state.db.bak)"
    )
    json_flag(r)
    r.set_defaults(handler=cmd_restore)


def cmd_backup(args: argparse.Namespace) -> int:
    from agent.adapters.store import DB_NAME, Store

    cfg = load_config(args)
    if not (cfg.state_dir / DB_NAME).exists():
        raise StateError(f"there is no state database at {cfg.state_dir / DB_NAME} to back up")
    store = Store(cfg.state_dir)
    try:
        dest = Path(args.to) if args.to else store.backup_path
        store.save_to(dest)
    finally:
        store.close()
    emit(args, {"backup": str(dest)}, f"saved the state database to {dest}")
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    from agent.adapters.store import BACKUP_NAME, check_database, restore_backup
    from agent.app import LOCK_NAME, read_lock

    cfg = load_config(args)
    source = Path(args.source) if args.source else cfg.state_dir / BACKUP_NAME
    if not source.exists():
        raise StateError(f"there is no backup at {source}")
    held = read_lock(cfg.state_dir / LOCK_NAME)
    if held is not None:
        raise StateError(
            f"the agent is running on {cfg.state_dir} (pid {held.get('pid', '?')}); stop it first "
            "(systemctl stop imageguard), then restore"
        )
    check_database(source)
    aside = restore_backup(cfg.state_dir, source)
    result = {"restored": str(source), "replaced": str(aside) if aside else None}
    text = f"restored the state database from {source}" + (
        f"; the database it replaced is kept as {aside}" if aside else ""
    )
    emit(args, result, text)
    return EXIT_OK
