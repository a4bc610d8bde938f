"""``imageguard console``: the cloud side (request, rollout, watch, devices, sign-policy).

The console reads the same TOML configuration as the agent: ``[mqtt]`` (url, account, credentials, encoding)
and ``[device] id``, which is the console's own client id (e.g. ``console-1``, the reply topics' level).

Exit codes of ``console request``: 0 for response.code 200; 2 for 400 or 403 (the device refused the
request); 1 for any other code (404, 500, ...); 3 when it could not ask (broker unreachable, no reply within
``--timeout``).
``console rollout``: 0 when every device that answered (and every expected one) holds the version (applied,
or unchanged because it already had it); 1 otherwise (rejected, offline, no answer, nobody answered).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from agent.cli.common import EXIT_NEGATIVE, EXIT_OK, emit, json_flag, load_config, read_json_file
from agent.config import Config
from agent.core.policy import PolicyLayer, group_layer
from agent.errors import ConfigError, InputError

log = logging.getLogger(__name__)

REGISTRY_FILE = "console-devices.json"


def register(sub: Any) -> None:
    p = sub.add_parser("console", help="the cloud side: requests, fleet rollout, telemetry, devices")
    csub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    q = csub.add_parser(
        "request",
        help="send one request to a device and print the reply",
        epilog="Exit codes: 0 response 200; 2 response 400/403; 1 any other response or no reply.",
    )
    q.add_argument("device", metavar="DEVICE")
    q.add_argument("method", metavar="METHOD", type=str.upper, choices=["GET", "PUT", "POST", "DEL", "EXEC"])
    q.add_argument("resource", metavar="RESOURCE", help="e.g. policy, allowlist/sha256:..., status")
    q.add_argument("--body", metavar="FILE", help="request body ('-' for standard input)")
    _timeout(q, 10.0)
    json_flag(q)
    q.set_defaults(handler=cmd_request)

    q = csub.add_parser(
        "rollout",
        help="publish a retained fleet policy layer and wait for the devices' acknowledgements",
        epilog="Exit codes: 0 every device holds the version; 1 otherwise.",
    )
    q.add_argument("--group", required=True, metavar="G")
    q.add_argument(
        "--policy", required=True, metavar="FILE", help="the layer document (or a signed envelope)"
    )
    q.add_argument(
        "--sign-key", metavar="FILE", help="sign the document with this private key (cosign.key/PEM)"
    )
    q.add_argument("--passphrase-file", metavar="FILE", help="passphrase of an encrypted --sign-key")
    q.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="ID",
        help="a device that must acknowledge (repeatable; members seen in births are added)",
    )
    q.add_argument("--expect", type=int, default=0, metavar="N", help="wait for at least N devices")
    q.add_argument(
        "--settle",
        type=float,
        default=1.0,
        metavar="S",
        help="finish only after no new device appeared for S seconds (default 1)",
    )
    q.add_argument(
        "--force",
        action="store_true",
        help="publish even if the broker holds a retained layer of the same or a newer version",
    )
    _timeout(q, 60.0)
    _registry(q)
    json_flag(q)
    q.set_defaults(handler=cmd_rollout)

    q = csub.add_parser("watch", help="print verdicts, alerts and policy events as they arrive")
    q.add_argument("--alerts-only", action="store_true")
    q.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: Ctrl-C)")
    q.add_argument("--count", type=int, metavar="N", help="stop after N events")
    json_flag(q)
    q.set_defaults(handler=cmd_watch)

    q = csub.add_parser("devices", help="devices seen in birth / disconnect certificates")
    q.add_argument("--wait", type=float, default=5.0, metavar="S", help="listen for S seconds (default 5)")
    _registry(q)
    json_flag(q)
    q.set_defaults(handler=cmd_devices)

    q = csub.add_parser("sign-policy", help="wrap a policy document in a signed envelope (prints it)")
    q.add_argument("policy", metavar="POLICY", help="the layer document ('-' for standard input)")
    q.add_argument("--key", required=True, metavar="FILE", help="private key (cosign.key or PEM)")
    q.add_argument("--passphrase-file", metavar="FILE", help="passphrase of an encrypted key")
    q.add_argument("--device", metavar="ID", help="set target {device: ID} if the document names none")
    q.add_argument("--group", metavar="G", help="set target {group: G} if the document names none")
    q.add_argument(
        "--expires",
        metavar="WHEN",
        help="refused by devices after this time: RFC 3339 (2027-01-31T00:00:00Z) or a duration from now "
        "(90m, 12h, 30d)",
    )
    q.set_defaults(handler=cmd_sign_policy)

    q = csub.add_parser(
        "serve",
        help="the always-on fleet console: inventory, rollouts in waves, live alerts, web dashboard",
        description="Run the fleet console service: ingest every device message into a database (SQLite "
        "by default, PostgreSQL by URL), drive rollouts, serve the dashboard and JSON API. Needs [mqtt] and "
        "at least one [[console.users]] or [[console.tokens]] entry.",
    )
    q.add_argument("--listen", metavar="HOST:PORT", help="override [console] listen (default 127.0.0.1:8480)")
    q.add_argument(
        "--database",
        metavar="URL",
        help="override [console] database: sqlite:///path or postgresql+psycopg://user@host/db "
        "(also IMAGEGUARD_CONSOLE_DATABASE)",
    )
    q.add_argument("--log-format", choices=["text", "json"], help="log format (default: from config, text)")
    q.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="log level")
    q.set_defaults(handler=cmd_serve)

    q = csub.add_parser("hash-password", help="print a password hash for a [[console.users]] entry")
    q.add_argument(
        "--password-file",
        metavar="FILE",
        help="read the password from FILE (else IMAGEGUARD_CONSOLE_PASSWORD, or a prompt asked twice)",
    )
    q.set_defaults(handler=cmd_hash_password)

    q = csub.add_parser(
        "new-token", help="make an API token: prints it once, and its [[console.tokens]] entry"
    )
    q.add_argument("name", metavar="NAME", help="what the token is for (the audit log shows token:NAME)")
    json_flag(q)
    q.set_defaults(handler=cmd_new_token)

    q = csub.add_parser("db", help="the console database: upgrade its schema, or show its revision")
    q.add_argument("db_action", choices=("upgrade", "revision"), metavar="upgrade|revision")
    q.add_argument("--database", metavar="URL", help="as for serve")
    q.set_defaults(handler=cmd_db)


def _timeout(p: argparse.ArgumentParser, default: float) -> None:
    p.add_argument(
        "--timeout", type=float, default=default, metavar="S", help=f"seconds (default {default:g})"
    )


def _registry(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--registry",
        metavar="FILE",
        help=f"device registry kept between runs (default STATE_DIR/{REGISTRY_FILE} when writable, else "
        f"~/.local/state/imageguard/{REGISTRY_FILE}; 'none' to keep none)",
    )


def _registry_path(args: argparse.Namespace, cfg: Config) -> Path | None:
    """``--registry``, else the state directory when this user may write there, else the user's own state
    directory (``$XDG_STATE_HOME/imageguard``, default ``~/.local/state/imageguard``)."""
    if args.registry == "none":
        return None
    if args.registry:
        return Path(args.registry)
    if cfg.state_dir.is_dir() and os.access(cfg.state_dir, os.W_OK):
        return cfg.state_dir / REGISTRY_FILE
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "imageguard"
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("console: no place to keep the device registry (%s: %s)", base, exc.strerror)
        return None
    return base / REGISTRY_FILE


def _read_bytes(path: str, what: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot read: {exc.strerror}") from None


def _connect(cfg: Config) -> Any:
    from agent.console.client import Console, ConsoleClient

    if cfg.mqtt is None:
        raise InputError(f"configuration {cfg.source}: the console needs an [mqtt] section")
    client = ConsoleClient(cfg.mqtt, cfg.device.id)
    client.connect()
    return Console(cfg, client)


# --- request -----------------------------------------------------------------------------------------


def cmd_request(args: argparse.Namespace) -> int:
    from agent.console.client import exit_code_for

    cfg = load_config(args)
    body = _read_bytes(args.body, "request body") if args.body else None
    console = _connect(cfg)
    try:
        reply = console.request(args.device, args.method, args.resource, body, timeout=args.timeout)
    finally:
        console.client.close()
    doc = reply.document()
    out = {"response.code": reply.code, "body": doc}
    if reply.message:
        out["response.exception.message"] = reply.message

    def text() -> str:
        lines = [f"response.code: {reply.code}"]
        if reply.message:
            lines.append(f"response.exception.message: {reply.message}")
        if doc is not None:
            lines.append(json.dumps(doc, indent=2, sort_keys=True) if not isinstance(doc, str) else doc)
        return "\n".join(lines)

    emit(args, out, text)
    return exit_code_for(reply.code)


# --- rollout -----------------------------------------------------------------------------------------


def _load_signing_key(path: str, passphrase_file: str | None) -> Any:
    from agent.cli.verify import _password
    from agent.verify.cosign.keys import load_private_key

    data = _read_bytes(path, "signing key")
    # an encrypted key (cosign's format, or encrypted PKCS#8) needs its passphrase: from the file,
    # $COSIGN_PASSWORD or the terminal, never a silent empty one
    passphrase = _password(passphrase_file) if b"ENCRYPTED" in data else ""
    return load_private_key(data, passphrase, what=path)


def prepare_layer(doc: Any, group: str, sign_key: Any | None) -> tuple[dict[str, Any], int]:
    """The body to publish for ``group`` (document or envelope) and its version; checked before publishing."""
    from agent.core.envelope import is_envelope
    from agent.verify.policy_signature import sign_policy

    if is_envelope(doc):
        if sign_key is not None:
            raise InputError("--policy is already a signed envelope; drop --sign-key")
        inner = doc["document"]
    else:
        if not isinstance(doc, dict):
            raise InputError("policy document: expected a JSON object")
        inner = dict(doc)
        inner.setdefault("target", {"group": group})
    if inner.get("target") != {"group": group}:
        raise InputError(f"policy document: its target is {inner.get('target')}, not {{'group': {group!r}}}")
    layer = PolicyLayer.from_document(inner, group_layer(group), what="policy document")
    if is_envelope(doc):
        return dict(doc), layer.version
    return (sign_policy(inner, sign_key) if sign_key is not None else inner), layer.version


class Progress:
    """A one-line bar on a terminal, a line per acknowledgement otherwise."""

    def __init__(self, out: TextIO, started: float) -> None:
        self.out, self.started = out, started
        self.tty = out.isatty()

    def __call__(self, tracker: Any, event: Any) -> None:
        elapsed = time.monotonic() - self.started
        known, done = len(tracker.rows), tracker.answered
        if self.tty:
            width = 30
            filled = int(width * done / known) if known else 0
            bar = "#" * filled + "." * (width - filled)
            self.out.write(f"\r[{bar}] {done}/{known} acknowledged  {elapsed:5.1f}s")
        elif event is not None and event.kind == "policy":
            row = tracker.rows[event.device]
            self.out.write(f"{elapsed:6.2f}s {row.device}: {row.status} ({done}/{known})\n")
        self.out.flush()

    def finish(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


def cmd_rollout(args: argparse.Namespace) -> int:
    from agent.console.client import DeviceRegistry, RolloutTracker

    cfg = load_config(args)
    doc = read_json_file(args.policy, "policy document")
    key = _load_signing_key(args.sign_key, args.passphrase_file) if args.sign_key else None
    body, version = prepare_layer(doc, args.group, key)
    registry = DeviceRegistry(_registry_path(args, cfg))
    expected = set(args.device) | set(registry.members(args.group))
    tracker = RolloutTracker(args.group, version, expected, expect_count=args.expect, settle=args.settle)
    console = _connect(cfg)
    progress = Progress(sys.stderr, time.monotonic())
    try:
        held = console.retained_version(args.group)
        if held is not None and version <= held and not args.force:
            # devices holding `held` would refuse it, but a new device would take the older layer
            raise InputError(
                f"the broker holds version {held} of group {args.group!r}; publish a version greater than "
                f"{held} (or --force to replace the retained layer anyway)"
            )
        console.rollout(tracker, body, timeout=args.timeout, registry=registry, on_progress=progress)
    finally:
        console.client.close()
        progress.finish()
        registry.save()
    rows = [r.to_dict() for r in tracker.table()]
    report = {
        "group": args.group,
        "version": version,
        "ok": tracker.ok,
        "devices": rows,
        "withdrawn": tracker.withdrawn,
    }

    def text() -> str:
        if not rows:
            return f"no device acknowledged group:{args.group} version {version} within {args.timeout:g}s"
        lines = [f"{'DEVICE':<24} {'STATUS':<10} {'VERSION':<8} REASON"]
        for r in rows:
            v = "" if r["version"] is None else str(r["version"])
            lines.append(f"{r['device']:<24} {r['status']:<10} {v:<8} {r['reason']}")
        if tracker.withdrawn:
            lines.append(
                f"devices hold a newer group:{args.group} layer: version {version} was taken off the broker "
                "again, so that devices joining later do not receive it"
            )
        return "\n".join(lines)

    emit(args, report, text)
    return EXIT_OK if tracker.ok else EXIT_NEGATIVE


# --- watch / devices ---------------------------------------------------------------------------------


def describe_event(event: Any) -> str:
    d = event.data
    when = str(d.get("time", time.strftime("%Y-%m-%dT%H:%M:%S")))
    if event.kind in ("verdicts", "alerts"):
        container = d.get("container") or {}
        label = "ALERT  " if event.kind == "alerts" else "verdict"
        return (
            f"{when} {event.device} {label} {d.get('verdict', '?')} {d.get('image') or d.get('image_id')} "
            f"container={container.get('name') or container.get('id', '?')} reason={d.get('reason', '?')} "
            f"mode={d.get('mode', '?')} action={d.get('action', '?')}"
        )
    if event.kind == "policy":
        tail = f" reason={d['reason']}" if d.get("reason") else ""
        return (
            f"{when} {event.device} policy  {d.get('layer')} v{d.get('version')} {d.get('status')} "
            f"(device policy v{d.get('policy_version')}, from {d.get('source')}){tail}"
        )
    return f"{when} {event.device} {event.kind} {json.dumps(dict(d), sort_keys=True)}"


def cmd_watch(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    console = _connect(cfg)

    def show(event: Any) -> None:
        if args.json:
            line = {"kind": event.kind, "device": event.device, "topic": event.topic, "message": event.data}
            print(json.dumps(line, sort_keys=True), flush=True)
        else:
            print(describe_event(event), flush=True)

    try:
        kinds = ("alerts",) if args.alerts_only else ("verdicts", "alerts", "policy", "instances")
        console.subscribe_events(telemetry=kinds, lifecycle=False)
        print(
            f"imageguard: watching {', '.join(kinds)} of account {console.account}",
            file=sys.stderr,
            flush=True,
        )
        console.stream(show, duration=args.duration, count=args.count)
    except KeyboardInterrupt:
        pass
    finally:
        console.client.close()
    return EXIT_OK


def cmd_devices(args: argparse.Namespace) -> int:
    from agent.console.client import DeviceRegistry

    cfg = load_config(args)
    registry = DeviceRegistry(_registry_path(args, cfg))
    console = _connect(cfg)
    try:
        console.subscribe_events(telemetry=(), lifecycle=True)
        console.stream(registry.observe, duration=args.wait)
    finally:
        console.client.close()
        registry.save()
    states = sorted(registry.devices.values(), key=lambda s: s.device)

    def text() -> str:
        if not states:
            return f"no device seen within {args.wait:g}s (births are sent when a device connects)"
        lines = [f"{'DEVICE':<24} {'STATE':<8} {'POLICY':<7} {'GROUPS':<24} LAST SEEN"]
        for s in states:
            seen = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(s.last_seen))
            state = "online" if s.online else "offline"
            lines.append(f"{s.device:<24} {state:<8} {s.policy_version:<7} {','.join(s.groups):<24} {seen}")
        return "\n".join(lines)

    emit(args, [s.to_dict() for s in states], text)
    return EXIT_OK


# --- sign-policy -------------------------------------------------------------------------------------


_DURATION = {"m": 60, "h": 3600, "d": 86400}


def _expiry(text: str) -> str:
    """``--expires``: an RFC 3339 time, or a duration from now such as 12h or 30d."""
    import datetime as dt

    if text[:-1].isdigit() and text[-1] in _DURATION:
        when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=int(text[:-1]) * _DURATION[text[-1]])
        return when.strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(
            f"--expires {text!r}: expected an RFC 3339 time or a duration like 12h or 30d"
        ) from None
    if parsed.tzinfo is None:
        raise InputError(f"--expires {text!r}: give a time zone (Z or +01:00)")
    return parsed.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_sign_policy(args: argparse.Namespace) -> int:
    from agent.verify.policy_signature import sign_policy

    doc = read_json_file(args.policy, "policy document")
    if not isinstance(doc, dict):
        raise InputError("policy document: expected a JSON object")
    if args.device and args.group:
        raise InputError("give --device or --group, not both")
    if "target" not in doc and (args.device or args.group):
        doc["target"] = {"device": args.device} if args.device else {"group": args.group}
    if args.expires:
        doc["expires"] = _expiry(args.expires)
    key = _load_signing_key(args.key, args.passphrase_file)
    print(json.dumps(sign_policy(doc, key), indent=2, sort_keys=True))
    return EXIT_OK


# --- the console service -----------------------------------------------------------------------------


def _console_extra() -> None:
    """The service's libraries are an extra: say how to get them rather than fail on an import."""
    import importlib.util

    missing = [
        m
        for m in ("flask", "flask_wtf", "waitress", "sqlalchemy", "alembic")
        if not importlib.util.find_spec(m)
    ]
    if missing:
        raise ConfigError(
            f"the console service needs {', '.join(missing)}: install the console extra, "
            "pip install 'imageguard-agent[console]'"
        )


def cmd_serve(args: argparse.Namespace) -> int:
    _console_extra()
    from agent import logs
    from agent.console.serve import FleetService

    cfg = load_config(args)
    service = FleetService(cfg, database=args.database, listen=args.listen)  # refuses before it logs
    logs.setup(args.log_level or cfg.logging.level, args.log_format or cfg.logging.format)
    service.start()
    print(f"imageguard console: serving http://{service.listen.host}:{service.port}/", flush=True)
    service.serve_forever()
    return EXIT_OK


def _read_password(path: str | None) -> str:
    import getpass

    if path:
        try:
            text = Path(path).read_text(encoding="utf-8").rstrip("\n")
        except OSError as exc:
            raise InputError(f"--password-file {path}: cannot read: {exc.strerror}") from None
    elif os.environ.get("IMAGEGUARD_CONSOLE_PASSWORD"):
        text = os.environ["IMAGEGUARD_CONSOLE_PASSWORD"]
    elif sys.stdin.isatty():
        text = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != text:
            raise InputError("the two passwords differ")
    else:
        raise InputError(
            "give the password with --password-file, IMAGEGUARD_CONSOLE_PASSWORD or on a terminal"
        )
    if len(text) < 12:
        raise InputError("the password is shorter than 12 characters")
    return text


def cmd_hash_password(args: argparse.Namespace) -> int:
    from werkzeug.security import generate_password_hash

    print(generate_password_hash(_read_password(args.password_file), method="scrypt"))
    return EXIT_OK


def cmd_new_token(args: argparse.Namespace) -> int:
    import hashlib
    import re
    import secrets

    if not re.fullmatch(r"[A-Za-z0-9._@-]{1,64}", args.name):
        raise InputError(f"token name {args.name!r}: use 1-64 letters, digits and . _ @ -")
    token = "igc_" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    entry = f'[[console.tokens]]\nname = "{args.name}"\nsha256 = "{digest}"'
    emit(
        args,
        {"name": args.name, "token": token, "sha256": digest},
        f"token (shown once; send it as 'Authorization: Bearer ...'):\n{token}\n\n"
        f"add to the console's configuration:\n{entry}",
    )
    return EXIT_OK


def cmd_db(args: argparse.Namespace) -> int:
    _console_extra()
    from agent.console.fleetdb import FleetStore, default_url

    cfg = load_config(args)
    url = args.database or cfg.console.database or os.environ.get("IMAGEGUARD_CONSOLE_DATABASE")
    store = FleetStore(url or default_url(cfg.state_dir))
    try:
        if args.db_action == "upgrade":
            print(f"console database at revision {store.migrate()}")
        else:
            print(store.revision() or "empty (never migrated)")
    finally:
        store.close()
    return EXIT_OK
