"""``imageguard doctor``: checks the set-up and says what to do about each problem.

Checks: the engine answers; the authorization plugin socket answers and dockerd is wired to it (or, with
preventive mode off, is not); the state directory is private; the broker is reachable; the clock is sane.
Each check is a small function returning a :class:`Check`; none of them changes anything.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from agent.adapters.engine import Engine
from agent.adapters.plugins import plugin_names, resolve_plugin
from agent.app import LOCK_NAME, read_lock
from agent.config import Config
from agent.core.plugins import ManagedPlugin, slot_findings
from agent.errors import EngineError
from agent.runtime.authz import ACTIVATE

Status = Literal["ok", "warn", "fail", "skip"]

DAEMON_JSON = Path("/etc/docker/daemon.json")
#: before this the clock is certainly wrong (this release did not exist): certificates cannot be judged
CLOCK_FLOOR = datetime(2025, 1, 1).timestamp()
CLOCK_SKEW_WARN = 30.0
ENGINE_TIMEOUT = 5.0
#: how long dockerd keeps retrying an unreachable plugin before refusing a request (moby pkg/plugins)
DOCKERD_PLUGIN_RETRY = "about 15 s"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    hint: str = ""


@dataclass
class Facts:
    """What several checks share: gathered once."""

    engine_info: dict[str, Any] | None = None
    engine_error: str = ""
    plugin_answers: bool = False
    #: authorization plugins dockerd uses, and where this was learnt
    authz_plugins: tuple[str, ...] = ()
    authz_source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: the engine's managed plugins (None: could not be listed)
    managed_plugins: tuple[ManagedPlugin, ...] | None = None


def run_checks(config: Config, *, daemon_json: Path = DAEMON_JSON, now: float | None = None) -> list[Check]:
    facts = Facts()
    plugin = check_plugin_socket(config, facts)
    engine = check_engine(config, facts)
    wiring = check_plugin_wiring(config, facts, daemon_json)
    return [
        engine,
        plugin,
        wiring,
        check_plugin_slot(config, facts),
        check_state_dir(config.state_dir),
        check_broker(config),
        check_clock(facts, time.time() if now is None else now),
    ]


# -- engine and plugin ---------------------------------------------------------------------------------


def check_engine(config: Config, facts: Facts) -> Check:
    url = config.engine.url
    try:
        engine = Engine(url, min(config.engine.timeout_seconds, ENGINE_TIMEOUT))
        version = engine.ping()
        facts.engine_info = engine.info()
        facts.managed_plugins = engine.managed_plugins()
    except EngineError as exc:
        facts.engine_error = str(exc)
        hint = "start dockerd, or set [engine] url to its socket"
        socket_path = Path(url.removeprefix("unix://")) if url.startswith("unix://") else None
        if socket_path is not None and socket_path.exists() and not os.access(socket_path, os.R_OK | os.W_OK):
            # dockerd is there; this user may not talk to it
            hint = (
                f"this user (uid {os.geteuid()}) may not use {socket_path}: run as root or as a member of "
                "its group (usually docker)"
            )
        elif config.preventive.enabled and not facts.plugin_answers:
            hint = (
                "the agent's authorization plugin does not answer: if dockerd uses it, dockerd holds every "
                f"request for {DOCKERD_PLUGIN_RETRY} and then refuses it; start the agent"
            )
        elif "authorization denied" in str(exc):
            hint = "an authorization plugin refused the query; see dockerd's log"
        return Check("engine", "fail", f"no answer from {url}: {exc}", hint)
    return Check(
        "engine", "ok", f"Docker {version.get('Version')} (API {version.get('ApiVersion')}) answers at {url}"
    )


def plugin_activates(path: Path, timeout: float = 2.0) -> bool:
    """True if the socket answers ``/Plugin.Activate`` as an authorization plugin."""
    conn = _UnixHTTPConnection(path, timeout)
    try:
        conn.request("POST", ACTIVATE, body=b"{}", headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        doc = json.loads(resp.read(65536))
        return resp.status == 200 and "authz" in (doc.get("Implements") or ())
    except (OSError, HTTPException, ValueError, AttributeError, TypeError):
        return False
    finally:
        conn.close()


class _UnixHTTPConnection(HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self._path))


def check_plugin_socket(config: Config, facts: Facts) -> Check:
    p = config.preventive
    if not p.enabled:
        return Check("plugin socket", "skip", "preventive mode is off ([preventive] enabled = false)")
    try:
        mode = p.socket.lstat().st_mode
    except FileNotFoundError:
        return Check(
            "plugin socket",
            "fail",
            f"{p.socket} does not exist: the agent is not running or not serving the plugin",
            "start the agent before dockerd (systemd: Before=docker.service, see deploy/)",
        )
    except OSError as exc:
        return Check("plugin socket", "fail", f"cannot inspect {p.socket}: {exc.strerror}")
    if not stat.S_ISSOCK(mode):
        return Check(
            "plugin socket", "fail", f"{p.socket} is not a socket", "remove it and restart the agent"
        )
    facts.plugin_answers = plugin_activates(p.socket)
    if not facts.plugin_answers:
        return Check(
            "plugin socket",
            "fail",
            f"{p.socket} exists but no authorization plugin answers on it (stale socket of a stopped agent?)",
            "start the agent",
        )
    return Check("plugin socket", "ok", f"the agent answers as an authorization plugin on {p.socket}")


def check_plugin_wiring(config: Config, facts: Facts, daemon_json: Path) -> Check:
    names, source = _authz_plugins(config, facts, daemon_json)
    ours = f"unix://{config.preventive.socket}"
    wired = [n for n in names if resolve_plugin(n) == ours]
    others = [n for n in names if n not in wired]
    note = f" (also: {', '.join(others)})" if others else ""
    if config.preventive.enabled:
        if wired:
            return Check("plugin wiring", "ok", f"dockerd asks plugin {wired[0]} ({source}){note}")
        if source == "":
            return Check(
                "plugin wiring",
                "warn",
                "cannot tell which authorization plugins dockerd uses (engine unreachable, no daemon.json, "
                "no local dockerd process)",
            )
        return Check(
            "plugin wiring",
            "fail",
            f"dockerd does not use the agent's plugin ({source}: {', '.join(names) or 'no plugins'}): "
            "starts are only caught after the fact",
            f'add "authorization-plugins": ["{config.preventive.socket.stem}"] to {daemon_json} and restart '
            "dockerd (see deploy/docker/daemon.json)",
        )
    if wired:
        return Check(
            "plugin wiring",
            "fail",
            f"dockerd uses plugin {wired[0]} at {config.preventive.socket} but preventive mode is off: "
            "dockerd refuses every request while nobody answers there",
            "set [preventive] enabled = true, or remove the plugin from dockerd's configuration",
        )
    return Check("plugin wiring", "skip", f"preventive mode is off and dockerd does not use it{note}")


def check_plugin_slot(config: Config, facts: Facts) -> Check:
    """Nothing else may answer dockerd's authorization questions, nor take ImageGuard's plugin name."""
    if not config.preventive.enabled:
        return Check("plugin slot", "skip", "preventive mode is off")
    if facts.engine_info is None or facts.managed_plugins is None:
        return Check("plugin slot", "skip", "the engine does not answer: its plugins cannot be listed")
    configured = [str(n) for n in (facts.engine_info.get("Plugins") or {}).get("Authorization") or []]
    findings = slot_findings(
        plugin_names(config.preventive.socket, configured), configured, facts.managed_plugins
    )
    if findings:
        return Check(
            "plugin slot",
            "fail",
            "; ".join(findings),
            "remove plugins you did not install (docker plugin ls; docker plugin rm -f NAME) and drop unknown "
            "authorization plugins from dockerd's configuration",
        )
    return Check(
        "plugin slot", "ok", "no other plugin answers dockerd's authorization questions or takes the name"
    )


def _authz_plugins(config: Config, facts: Facts, daemon_json: Path) -> tuple[list[str], str]:
    if facts.engine_info is not None:
        plugins = (facts.engine_info.get("Plugins") or {}).get("Authorization") or []
        return [str(n) for n in plugins], "engine info"
    procs = dockerd_processes(config.engine.url)
    if procs:
        pid, args = procs[0]
        names = _flag_values(args, "--authorization-plugin")
        if not names and not _has_flag(args, "--config-file"):
            names = _daemon_json_plugins(daemon_json)
        return names, f"dockerd pid {pid} command line"
    if daemon_json.exists():
        return _daemon_json_plugins(daemon_json), str(daemon_json)
    return [], ""


def _daemon_json_plugins(path: Path) -> list[str]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    plugins = doc.get("authorization-plugins") if isinstance(doc, dict) else None
    return [str(p) for p in plugins] if isinstance(plugins, list) else []


def dockerd_processes(engine_url: str) -> list[tuple[int, list[str]]]:
    """Local dockerd processes serving ``engine_url`` (pid, arguments)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
        except OSError:
            continue
        if not args or Path(args[0]).name != "dockerd":
            continue
        hosts = _flag_values(args, "--host") + _flag_values(args, "-H")
        default = engine_url in ("unix:///var/run/docker.sock", "unix:///run/docker.sock")
        if engine_url in hosts or (not hosts and default):
            out.append((int(entry.name), args))
    return out


def _flag_values(args: Iterable[str], flag: str) -> list[str]:
    values, it = [], iter(args)
    for a in it:
        if a == flag:
            values.append(next(it, ""))
        elif a.startswith(flag + "="):
            values.append(a.split("=", 1)[1])
    return values


def _has_flag(args: Iterable[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


# -- state, broker, clock ------------------------------------------------------------------------------


def check_state_dir(state_dir: Path) -> Check:
    try:
        st = state_dir.stat()
    except FileNotFoundError:
        return Check(
            "state directory", "warn", f"{state_dir} does not exist yet", "the agent creates it (0700)"
        )
    except OSError as exc:
        return Check("state directory", "fail", f"cannot inspect {state_dir}: {exc.strerror}")
    problems = []
    if not stat.S_ISDIR(st.st_mode):
        return Check("state directory", "fail", f"{state_dir} is not a directory")
    if st.st_uid != os.geteuid():
        problems.append(f"owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})")
    if st.st_mode & 0o077:
        problems.append(f"mode {stat.S_IMODE(st.st_mode):04o} lets other users in")
    try:
        children = sorted(state_dir.iterdir())
    except PermissionError:
        # private to its owner, as it should be: this user cannot look inside
        return Check(
            "state directory",
            "warn" if not problems else "fail",
            f"{state_dir} is not readable by this user (uid {os.geteuid()})"
            + (f"; {'; '.join(problems)}" if problems else ""),
            "run imageguard doctor as root (or the agent's user) to check it",
        )
    for child in children:
        try:
            cst = child.lstat()
        except OSError:
            continue
        if cst.st_mode & 0o022:
            problems.append(f"{child.name} is writable by others")
    if problems:
        return Check(
            "state directory",
            "fail",
            f"{state_dir}: " + "; ".join(problems),
            f"chown root and chmod 700 {state_dir} (policy and verified digests live there)",
        )
    holder = read_lock(state_dir / LOCK_NAME)
    running = f"agent running (pid {holder.get('pid')})" if holder else "no agent holds it"
    return Check("state directory", "ok", f"{state_dir} is private ({running})")


def check_broker(config: Config, timeout: float = 3.0) -> Check:
    if config.mqtt is None:
        return Check("broker", "skip", "no [mqtt] section: the agent runs without a cloud connection")
    u = urlsplit(config.mqtt.url)
    tls = u.scheme == "mqtts"
    host, port = u.hostname or "", u.port or (8883 if tls else 1883)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if tls:
                ctx = ssl.create_default_context(
                    cafile=str(config.mqtt.ca_bundle) if config.mqtt.ca_bundle else None
                )
                if config.mqtt.client_cert is not None:
                    ctx.load_cert_chain(
                        str(config.mqtt.client_cert),
                        str(config.mqtt.client_key) if config.mqtt.client_key else None,
                    )
                with ctx.wrap_socket(sock, server_hostname=host):
                    pass
    except ssl.SSLError as exc:
        return Check(
            "broker",
            "fail",
            f"TLS with {host}:{port} failed: {exc}",
            "check [mqtt] ca_bundle and client_cert",
        )
    except OSError as exc:
        return Check(
            "broker",
            "fail",
            f"cannot connect to {host}:{port}: {exc.strerror or exc}",
            "telemetry waits in the outbox until the broker is back; check [mqtt] url and the network",
        )
    return Check(
        "broker", "ok", f"{host}:{port} accepts connections" + (" (TLS handshake ok)" if tls else "")
    )


def check_clock(facts: Facts, now: float) -> Check:
    if now < CLOCK_FLOOR:
        return Check(
            "clock",
            "fail",
            f"the system clock says {time.strftime('%Y-%m-%d', time.gmtime(now))}",
            "set the clock (NTP): certificate validity and signature times are judged by it",
        )
    engine_time = (facts.engine_info or {}).get("SystemTime")
    if isinstance(engine_time, str):
        try:
            skew = datetime.fromisoformat(engine_time.replace("Z", "+00:00")).timestamp() - now
        except ValueError:
            return Check("clock", "ok", f"plausible (the engine's clock {engine_time!r} is unreadable)")
        if abs(skew) > CLOCK_SKEW_WARN:
            return Check(
                "clock",
                "warn",
                f"the engine's clock differs from this one by {skew:+.0f} s",
                "synchronise both clocks (NTP)",
            )
        return Check("clock", "ok", f"plausible, engine clock within {abs(skew):.1f} s")
    return Check("clock", "ok", "plausible (engine clock not compared)")


def to_dict(checks: list[Check]) -> dict[str, Any]:
    return {
        "ok": not any(c.status == "fail" for c in checks),
        "checks": [asdict(c) for c in checks],
    }
