"""Preventive enforcement: the agent as a Docker Engine authorization plugin.

dockerd asks the plugin about every API request before acting on it (moby ``pkg/authorization``):

- ``POST /Plugin.Activate`` -> ``{"Implements": ["authz"]}``
- ``POST /AuthZPlugin.AuthZReq`` with ``{"RequestMethod", "RequestUri", "RequestHeaders", "RequestBody"
  (base64)}`` -> ``{"Allow": bool, "Msg": str}``; dockerd shows ``Msg`` to the client on a denial.
- ``POST /AuthZPlugin.AuthZRes`` (the same plus the response) -> ``{"Allow": true}``: by then the engine
  has acted, so refusing the response would protect nothing.

Every request is classified by :func:`agent.core.api.classify`, which reads the request target as dockerd's
router does (origin or absolute form, percent-decoded, with or without version). Starts, restarts, exec
and copying files into a container are judged on the container with the live policy; managed plugins, swarm
and builds are refused unless the configuration allows them; a state-changing request that cannot be
classified is refused. Deciding on a container looks it up through the same engine, and that lookup is
itself put to this plugin, so connections are served concurrently (one thread each; dockerd keeps them
alive).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import re
import socket
import socketserver
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.adapters.engine import Engine, Gone
from agent.adapters.plugins import plugin_names
from agent.config import PreventiveConfig
from agent.core.api import ApiRequest, Op, classify
from agent.core.facts import ContainerFacts
from agent.core.plugins import slot_findings
from agent.errors import EngineError, InputError, StateError

if TYPE_CHECKING:
    from agent.runtime.enforcer import Enforcer

log = logging.getLogger(__name__)

ACTIVATE = "/Plugin.Activate"
AUTHZ_REQ = "/AuthZPlugin.AuthZReq"
AUTHZ_RES = "/AuthZPlugin.AuthZRes"
CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"
#: dockerd forwards request and response bodies only up to 1 MiB (then base64): anything far bigger is not dockerd
MAX_MESSAGE = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Answer:
    allow: bool
    msg: str = ""

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {"Allow": self.allow}
        if self.msg:
            doc["Msg"] = self.msg
        return json.dumps(doc).encode()


ALLOW = Answer(True)


@dataclass(frozen=True, slots=True)
class AuthzRequest:
    """One ``AuthZReq`` message, parsed strictly."""

    method: str
    uri: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    user: str = ""

    @classmethod
    def parse(cls, doc: Any) -> AuthzRequest:
        """Raises InputError on any field of the wrong type or a body that is not base64."""
        if not isinstance(doc, dict):
            raise InputError("authorization request: not a JSON object")
        method, uri = doc.get("RequestMethod"), doc.get("RequestUri")
        if not isinstance(method, str) or not method:
            raise InputError("authorization request: RequestMethod missing or not a string")
        if not isinstance(uri, str) or not uri:  # origin or absolute form: agent.core.api reads both
            raise InputError("authorization request: RequestUri missing or not a string")
        headers = doc.get("RequestHeaders") or {}
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise InputError("authorization request: RequestHeaders is not a map of strings")
        user = doc.get("User") or ""
        if not isinstance(user, str):
            raise InputError("authorization request: User is not a string")
        raw_body = doc.get("RequestBody")
        body = None
        if raw_body is not None:
            if not isinstance(raw_body, str):
                raise InputError("authorization request: RequestBody is not a base64 string")
            try:
                body = base64.b64decode(raw_body, validate=True)
            except (binascii.Error, ValueError):
                raise InputError("authorization request: RequestBody is not valid base64") from None
        return cls(method, uri, headers, body, user)


def start_target(method: str, uri: str) -> str | None:
    """The container a request would start (as named in the URI), or None if it starts nothing."""
    request = classify(method, uri)
    return request.container if request.op is Op.CONTAINER_START else None


class Decider(Protocol):
    def __call__(self, ref: str, *, start: bool = False) -> Answer:
        """Judge the container ``ref`` (a start, an exec or a copy into it)."""

    def rebinding(self, request: ApiRequest) -> Answer:
        """A rename or removal: refused while it could swap the container a pending start names."""

    def responded(self, method: str, uri: str, status: int, body: bytes | None) -> None:
        """dockerd has acted on a request (``AuthZRes``): its status and response body."""

    def operation(self, request: ApiRequest) -> Answer:
        """Judge a plugin, swarm or build request."""

    def create(self, request: ApiRequest, body: bytes | None) -> Answer:
        """Judge a container create from its body (None: dockerd forwarded none)."""


#: judged on the container they name
_ON_CONTAINER = frozenset({Op.CONTAINER_START, Op.CONTAINER_EXEC, Op.CONTAINER_COPY_IN})
#: judged by the configuration's switches
_SWITCHED = frozenset({Op.PLUGIN, Op.SWARM, Op.BUILD})
#: judged on the request's body
_ON_BODY = frozenset({Op.CONTAINER_CREATE})
#: could change which container a name means
_REBINDING = frozenset({Op.CONTAINER_RENAME, Op.CONTAINER_REMOVE})


def answer_request(raw: bytes, decide: Decider) -> Answer:
    """Answer one ``AuthZReq``. Fails closed: a request that runs code, or one whose kind cannot be told,
    that cannot be parsed or decided is denied; a request that runs no new code is allowed."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return Answer(False, "ImageGuard: unreadable authorization request (not JSON); refused")
    method = doc.get("RequestMethod") if isinstance(doc, dict) else None
    uri = doc.get("RequestUri") if isinstance(doc, dict) else None
    if not isinstance(method, str) or not isinstance(uri, str):
        return Answer(False, "ImageGuard: authorization request without method or URI; refused")
    request = classify(method, uri)
    if request.op is Op.UNKNOWN:
        log.warning("refused %s %s: %s", method, uri[:200], request.why)
        return Answer(False, f"ImageGuard: {request.why}; a request ImageGuard cannot classify is refused")
    if request.op in _REBINDING:
        return decide.rebinding(request)
    judged_container = request.op in _ON_CONTAINER and request.container is not None
    if not judged_container and request.op not in _SWITCHED | _ON_BODY:
        return ALLOW
    try:
        parsed = AuthzRequest.parse(doc)
    except InputError as exc:
        return Answer(False, f"ImageGuard: {exc}; refused")
    if request.op in _ON_BODY:
        try:
            return decide.create(request, parsed.body)
        except Exception as exc:  # any failure to decide refuses the request
            log.exception("authorization of a container create failed")
            return Answer(False, f"ImageGuard could not decide on a container create: {exc}; refused")
    if not judged_container:
        return decide.operation(request)
    target = request.container or ""
    try:
        return decide(target, start=request.op is Op.CONTAINER_START)
    except Exception as exc:  # any failure to decide refuses the request
        log.exception("authorization of %s of %s failed", request.op.value, target)
        return Answer(False, f"ImageGuard could not decide on container {target}: {exc}; refused")


class PendingStarts:
    """Containers whose allowed start dockerd has not carried out yet, by every name they go by.

    dockerd resolves the name in a start request again after the plugin allowed it, so a rename or a
    remove-and-create in between could make it start another container than the one judged. While a start
    is pending (until dockerd's ``AuthZRes`` for it, at most ``ttl`` seconds), renames and removals that
    touch it are refused.
    """

    def __init__(self, ttl: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._held: dict[str, tuple[float, frozenset[str]]] = {}  # start ref -> (expiry, all its names)

    def hold(self, ref: str, *aliases: str) -> None:
        with self._lock:
            self._held[ref] = (self.clock() + self.ttl, frozenset(n for n in (ref, *aliases) if n))

    def release(self, ref: str) -> None:
        with self._lock:
            self._held.pop(ref, None)

    def active(self) -> set[str]:
        now = self.clock()
        with self._lock:
            self._held = {r: v for r, v in self._held.items() if v[0] > now}
            return set().union(*(names for _, names in self._held.values()))


class Gate:
    """Decides start requests with the enforcer's live policy (the same rules as the monitor).

    Only in enforce mode: in audit mode, or with enforcement switched off, every start is allowed at once
    and the monitor records what it would have done.
    """

    def __init__(self, enforcer: Enforcer, rules: PreventiveConfig | None = None) -> None:
        self.enforcer = enforcer
        self.rules = rules or PreventiveConfig()
        self.pending = PendingStarts()

    def rebinding(self, request: ApiRequest) -> Answer:
        held = self.pending.active()
        if not held:
            return ALLOW
        touched = {request.container or "", request.name or ""} & held
        if request.op is Op.CONTAINER_RENAME or touched:
            what = "rename" if request.op is Op.CONTAINER_RENAME else "removal"
            log.warning("refused the %s of %s while a start is being carried out", what, request.container)
            return Answer(
                False,
                f"ImageGuard: a start of {', '.join(sorted(held))} is being carried out; a container {what} "
                "could swap the container that starts, so it is refused: retry in a moment",
            )
        return ALLOW

    def responded(self, method: str, uri: str, status: int, body: bytes | None) -> None:
        request = classify(method, uri)
        if request.op is Op.CONTAINER_START and request.container is not None:
            self.pending.release(request.container)
        elif request.op is Op.CONTAINER_CREATE and status == 201 and body:
            try:
                created = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                return
            cid = created.get("Id") if isinstance(created, dict) else None
            if isinstance(cid, str) and re.fullmatch(r"[0-9a-f]{64}", cid):
                self.enforcer.prefetch(cid)  # the start that follows needs no engine lookup of its own
        elif request.op is Op.CONTAINER_RENAME:
            self.enforcer.forget_prefetched()

    def create(self, request: ApiRequest, body: bytes | None) -> Answer:
        """A create of a container whose image is known to be disallowed (or started in a way the runtime
        constraints forbid) is refused, so a refused ``docker run`` leaves no container behind."""
        e = self.enforcer.policy.enforcement
        if not e.enabled or e.mode != "enforce" or body is None:
            return ALLOW  # no body: dockerd forwards none above 1 MiB; the start is judged all the same
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return Answer(False, "ImageGuard: the create request's body is not JSON; refused")
        if not isinstance(doc, dict):
            return Answer(False, "ImageGuard: the create request's body is not a JSON object; refused")
        try:
            facts = self.enforcer.engine.facts_for_create(doc, request.name or "")
        except EngineError as exc:
            return Answer(False, f"ImageGuard cannot look up image {doc.get('Image')!r} ({exc}); refused")
        d = self.enforcer.authorize_create(facts)
        if d.verdict != "blocked":
            return ALLOW
        log.warning("prevented create of a container of %s: %s", facts.image, d.detail)
        return Answer(
            False,
            f"ImageGuard: image {facts.image} is not allowed on this device ({d.reason.value}: {d.detail})",
        )

    def operation(self, request: ApiRequest) -> Answer:
        """Plugins, swarm and builds: refused in enforce mode unless the configuration allows them."""
        refusal = _refusal(request, self.rules)
        if refusal is None:
            return ALLOW
        e = self.enforcer.policy.enforcement
        if not e.enabled or e.mode != "enforce":
            log.warning("audit: would refuse %s (%s)", request.path, refusal)
            return ALLOW
        log.warning("refused %s: %s", request.path, refusal)
        return Answer(False, f"ImageGuard: {refusal}")

    def thread_done(self) -> None:
        """Close the engine connection this (connection) thread opened for its lookups."""
        self.enforcer.engine.close()

    def __call__(self, ref: str, *, start: bool = False) -> Answer:
        e = self.enforcer.policy.enforcement
        if not e.enabled or e.mode != "enforce":
            return ALLOW
        if start:  # from before the lookup: the name must mean the same container until dockerd starts it
            self.pending.hold(ref)
        answer, facts = self._judge(ref)
        if start and not answer.allow:
            self.pending.release(ref)
        elif start and facts is not None:
            self.pending.hold(ref, facts.id, facts.name)
        return answer

    def _judge(self, ref: str) -> tuple[Answer, ContainerFacts | None]:
        try:
            handled = self.enforcer.authorize(ref)
        except Gone:
            return Answer(False, f"ImageGuard: no such container {ref!r}; start refused"), None
        except EngineError as exc:
            log.error("refused the start of %s: %s", ref, exc)
            return Answer(False, f"ImageGuard cannot look up container {ref!r} ({exc}); start refused"), None
        d, facts = handled.decision, handled.facts
        name = facts.name or facts.short_id
        if d.verdict == "allowed":
            log.info("allowed start of container %s (%s): %s", name, facts.image, d.reason.value)
            return ALLOW, facts
        log.warning("prevented start of container %s (%s): %s", name, facts.image, d.detail)
        return (
            Answer(
                False,
                f"ImageGuard: image {facts.image} is not allowed on this device ({d.reason.value}: {d.detail})",
            ),
            facts,
        )


def plugin_slot_findings(engine: Engine, socket: Path) -> list[str]:
    """What threatens the plugin slot of the plugin served on ``socket`` (agent/core/plugins.py)."""
    configured = engine.authorization_plugins()
    return slot_findings(plugin_names(socket, configured), configured, engine.managed_plugins())


def _responded(raw: bytes, decide: Decider) -> None:
    """Tell the decider that dockerd has acted (the answer is always "allow": acting is done by then)."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return
    if not isinstance(doc, dict):
        return
    method, uri, status = doc.get("RequestMethod"), doc.get("RequestUri"), doc.get("ResponseStatusCode")
    if not isinstance(method, str) or not isinstance(uri, str):
        return
    body = None
    if isinstance(doc.get("ResponseBody"), str):
        try:
            body = base64.b64decode(doc["ResponseBody"], validate=True)
        except (binascii.Error, ValueError):
            body = None
    decide.responded(method, uri, status if isinstance(status, int) else 0, body)


def _refusal(request: ApiRequest, rules: PreventiveConfig) -> str | None:
    if request.op is Op.BUILD and not rules.allow_build:
        return (
            "image builds are refused on this device: RUN steps would execute code from an unchecked base "
            "image (set [preventive] allow_build = true to permit them)"
        )
    if request.op is Op.SWARM and not rules.allow_swarm:
        return (
            "swarm operations are refused on this device: swarm tasks start containers the authorization "
            "plugin never sees (set [preventive] allow_swarm = true to permit them)"
        )
    if request.op is Op.PLUGIN:
        name = request.name or ""
        allowed = {
            n for p in rules.allow_plugins for n in (p, p if ":" in p.rsplit("/", 1)[-1] else f"{p}:latest")
        }
        if name not in allowed:
            return (
                f"managed plugin {name or '(unnamed)'!r} is not allowed: a plugin runs as root with the mounts "
                "it asks for (list it in [preventive] allow_plugins to permit it)"
            )
    return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _UnixServer

    def do_POST(self) -> None:
        length_text = self.headers.get("Content-Length")
        try:
            length = int(length_text) if length_text is not None else -1
        except ValueError:
            length = -1
        if length < 0 or length > MAX_MESSAGE:
            # without a readable length the connection cannot be reused; dockerd treats this as a plugin
            # error and refuses the request
            self._reply(411 if length < 0 else 413, {"Err": "a Content-Length up to 8 MiB is required"})
            self.close_connection = True
            return
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            return
        if self.path == AUTHZ_REQ:
            answer = answer_request(body, self.server.authorize)
            if not answer.allow:
                log.debug("authz: denied %s", answer.msg)
            self._send(200, answer.to_json())
        elif self.path == AUTHZ_RES:
            self._send(200, b'{"Allow":true}')
            _responded(body, self.server.authorize)
        elif self.path == ACTIVATE:
            self._send(200, b'{"Implements":["authz"]}')
        else:
            self._reply(404, {"Err": f"unknown plugin method {self.path}"})

    def _reply(self, status: int, doc: dict[str, Any]) -> None:
        self._send(status, json.dumps(doc).encode())

    def _send(self, status: int, payload: bytes) -> None:
        self.send_response_only(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def address_string(self) -> str:
        return "dockerd"  # a Unix socket peer has no address

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("authz: " + format, *args)


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, path: str, authorize: Decider, on_thread_end: Callable[[], None] | None) -> None:
        self.authorize = authorize
        self.on_thread_end = on_thread_end
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(path, _Handler, bind_and_activate=False)

    # dockerd keeps connections alive: track them, so that closing the server really stops answering

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            if self.on_thread_end is not None:
                self.on_thread_end()

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._open_lock:
            conns = list(self._open)
        for conn in conns:
            with contextlib.suppress(OSError):  # already closed by its handler
                conn.shutdown(socket.SHUT_RDWR)


class AuthzServer:
    """Serves the plugin protocol on a Unix socket until ``close``."""

    def __init__(
        self, path: Path, authorize: Decider, *, on_thread_end: Callable[[], None] | None = None
    ) -> None:
        """``on_thread_end`` runs on each connection's thread when dockerd closes that connection."""
        self.path = path
        self._authorize = authorize
        self._on_thread_end = on_thread_end
        self._server: _UnixServer | None = None
        self._thread: threading.Thread | None = None
        self._inherited = False

    def start(self, inherited: socket.socket | None = None) -> None:
        """Bind the socket, or serve ``inherited``, a listening socket systemd holds for us (socket
        activation): it outlives restarts of the agent, so dockerd's requests wait in its backlog instead of
        failing while the agent restarts."""
        if inherited is not None:
            self._server = _UnixServer(str(self.path), self._authorize, self._on_thread_end)
            self._server.socket.close()
            self._server.socket = inherited
            self._inherited = True
            self._serve()
            log.info("authorization plugin serving on %s (socket from systemd)", self.path)
            return
        _claim(self.path)
        self._server = _UnixServer(str(self.path), self._authorize, self._on_thread_end)
        try:
            self._server.server_bind()
            # for dockerd (root) only; chmod rather than umask, which would race with other threads' files
            os.chmod(self.path, 0o600)
            self._server.server_activate()
        except OSError as exc:
            self._server.server_close()
            raise StateError(
                f"cannot serve the authorization plugin on {self.path}: {exc.strerror}"
            ) from None
        self._serve()
        log.info("authorization plugin serving on %s", self.path)

    def _serve(self) -> None:
        assert self._server is not None
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="authz", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        if self._thread is None or self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        self._thread.join(timeout=5)
        self._thread = None
        if not self._inherited:  # systemd's socket stays, so that dockerd's next requests wait for us
            self.path.unlink(missing_ok=True)


def _claim(path: Path) -> None:
    """Make the socket path usable: create its directory, remove a stale socket, refuse a live one."""
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"cannot create the plugin socket directory {path.parent}: {exc.strerror}") from None
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StateError(f"{path} exists and is not a socket; remove it or choose another preventive.socket")
    if socket_answers(path):
        raise StateError(f"another process already serves {path} (a second agent?)")
    path.unlink()


def socket_answers(path: Path, timeout: float = 1.0) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()
