"""The authorization plugin: request classification, strict parsing, fail-closed answers, the socket server."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.engine import Gone
from agent.config import PreventiveConfig
from agent.core.api import ApiRequest, classify
from agent.core.policy import Enforcement
from agent.errors import EngineError, InputError, StateError
from agent.runtime.authz import (
    ALLOW,
    Answer,
    AuthzRequest,
    AuthzServer,
    Gate,
    PendingStarts,
    answer_request,
    start_target,
)
from tests.support.fakes import FakeDecision, FakeEnforcer, FakeFacts, FakeHandled

START_CASES = [
    # (method, uri, container the request would start, or None)
    ("POST", "/v1.41/containers/abc/start", "abc"),
    ("POST", "/containers/abc/start", "abc"),
    ("POST", "/v1.24/containers/web-1/start?detachKeys=ctrl-x", "web-1"),
    ("POST", "/v1.41/containers/abc/restart?t=0", "abc"),
    ("post", "/v1.41/containers/abc/start", "abc"),  # method case does not matter: err towards a start
    ("POST", "/v1.41/containers/abc/start/", "abc"),
    ("POST", "/v1.41//containers/abc/start", "abc"),
    ("POST", "/v1.41/containers/abc%2Fstart", "abc"),  # percent-decoded as dockerd's router does
    ("POST", "/v1.41/containers/x/../abc/start", "abc"),
    ("POST", "/v1.41/containers/a/b/start", "a/b"),  # docker routes {name:.*}
    ("POST", "/v1.41/containers/abc/start#frag", "abc"),
    ("GET", "/v1.41/containers/abc/start", None),
    ("POST", "/v1.41/containers/abc/stop", None),
    ("POST", "/v1.41/containers/abc/unpause", None),
    ("POST", "/v1.41/containers/create?name=start", None),
    ("POST", "/v1.41/containers/abc/started", None),
    ("POST", "/v1.41/exec/abc/start", None),
    ("GET", "/v1.41/containers/json", None),
    ("POST", "/v1.41/plugins/start/enable", None),
    ("POST", "http://docker/v1.41/containers/abc/start", "abc"),
    ("POST", "https://any.host:99/containers/abc/restart?t=1", "abc"),
    ("HEAD", "/_ping", None),
]


@pytest.mark.parametrize(("method", "uri", "expected"), START_CASES)
def test_start_target(method: str, uri: str, expected: str | None) -> None:
    assert start_target(method, uri) == expected


def req(method: str = "POST", uri: str = "/v1.41/containers/abc/start", **extra: Any) -> bytes:
    doc: dict[str, Any] = {"User": "", "RequestMethod": method, "RequestUri": uri, "RequestHeaders": {}}
    doc.update(extra)
    return json.dumps(doc).encode()


class Recorder:
    def __init__(self, answer: Answer | Exception = ALLOW) -> None:
        self.answer = answer
        self.calls: list[str] = []

    def operation(self, request: ApiRequest) -> Answer:
        self.calls.append(f"op:{request.op.value}")
        return DENY

    def create(self, request: ApiRequest, body: bytes | None) -> Answer:
        self.calls.append(f"create:{request.name}")
        return DENY

    def rebinding(self, request: ApiRequest) -> Answer:
        self.calls.append(f"rebind:{request.container}")
        return DENY

    def responded(self, method: str, uri: str, status: int, body: bytes | None) -> None:
        self.calls.append(f"done:{uri}")

    def __call__(self, ref: str, *, start: bool = False) -> Answer:
        self.calls.append(ref)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


DENY = Answer(False, "not on the allowlist")
B64 = base64.b64encode(b'{"x": 1}').decode()

ANSWER_CASES = [
    # (id, raw request, decider's answer, allowed?, decider called with)
    ("start decided: deny", req(), DENY, False, ["abc"]),
    ("start decided: allow", req(RequestBody=B64), ALLOW, True, ["abc"]),
    ("other request: allowed at once", req("GET", "/v1.41/containers/json"), DENY, True, []),
    ("not JSON", b"{nope", ALLOW, False, []),
    ("not UTF-8", b"\xff\xfe", ALLOW, False, []),
    ("JSON but not an object", b"[1, 2]", ALLOW, False, []),
    ("no URI: cannot tell", json.dumps({"RequestMethod": "POST"}).encode(), ALLOW, False, []),
    ("URI not a string", req(RequestUri=5), ALLOW, False, []),
    ("start with a body that is not base64", req(RequestBody="%%%"), ALLOW, False, []),
    ("start with a body of the wrong type", req(RequestBody=[1]), ALLOW, False, []),
    ("start with headers not strings", req(RequestHeaders={"A": 1}), ALLOW, False, []),
    ("start with headers not a map", req(RequestHeaders=["A"]), ALLOW, False, []),
    ("start with User not a string", req(User=7), ALLOW, False, []),
    (
        "other request with a bad body",
        req("POST", "/v1.41/containers/abc/stop", RequestBody="%%%"),
        DENY,
        True,
        [],
    ),
    ("create with a bad body", req("POST", "/v1.41/containers/create", RequestBody="%%%"), ALLOW, False, []),
    (
        "create: judged on its body",
        req("POST", "/v1.41/containers/create?name=x", RequestBody=B64),
        ALLOW,
        False,
        ["create:x"],
    ),
    ("decider raises", req(), RuntimeError("boom"), False, ["abc"]),
    # the request target in absolute form is routed by its path, as dockerd does
    ("absolute-form start", req(RequestUri="http://docker/v1.41/containers/abc/start"), DENY, False, ["abc"]),
    ("absolute-form, other scheme", req(RequestUri="unix://x/containers/abc/start"), DENY, False, ["abc"]),
    ("exec into a container", req(RequestUri="/v1.41/containers/abc/exec"), DENY, False, ["abc"]),
    ("copy into a container", req("PUT", "/v1.41/containers/abc/archive?path=/"), DENY, False, ["abc"]),
    ("unknown state-changing target", req(RequestUri="/v1.41/containers/abc/strat"), ALLOW, False, []),
    ("unreadable target", req(RequestUri="containers/abc/start"), ALLOW, False, []),
    ("broken escape", req(RequestUri="/v1.41/containers/abc%zzstart"), ALLOW, False, []),
    (
        "plugin install: the switch",
        req(RequestUri="/v1.41/plugins/pull?remote=x"),
        ALLOW,
        False,
        ["op:plugin"],
    ),
    ("build: the switch", req(RequestUri="/build?t=x"), ALLOW, False, ["op:build"]),
    ("swarm service: the switch", req(RequestUri="/v1.41/services/create"), ALLOW, False, ["op:swarm"]),
    ("stop: runs nothing new", req(RequestUri="/v1.41/containers/abc/stop"), DENY, True, []),
    (
        "rename: may swap a pending start",
        req(RequestUri="/v1.41/containers/abc/rename?name=x"),
        ALLOW,
        False,
        ["rebind:abc"],
    ),
    (
        "remove: may swap a pending start",
        req("DELETE", "/v1.41/containers/abc?force=1"),
        ALLOW,
        False,
        ["rebind:abc"],
    ),
]


@pytest.mark.parametrize(
    ("raw", "decided", "allowed", "calls"), [c[1:] for c in ANSWER_CASES], ids=[c[0] for c in ANSWER_CASES]
)
def test_answer_request(raw: bytes, decided: Answer | Exception, allowed: bool, calls: list[str]) -> None:
    decider = Recorder(decided)
    answer = answer_request(raw, decider)
    assert answer.allow is allowed
    assert decider.calls == calls
    if not allowed:
        assert answer.msg.startswith("ImageGuard") or answer.msg == DENY.msg
        assert json.loads(answer.to_json()) == {"Allow": False, "Msg": answer.msg}


def test_parse_decodes_body_strictly() -> None:
    doc = json.loads(req(RequestBody=B64, RequestHeaders={"Content-Type": "application/json"}))
    parsed = AuthzRequest.parse(doc)
    assert parsed.body == b'{"x": 1}' and parsed.headers == {"Content-Type": "application/json"}
    with pytest.raises(InputError, match="base64"):
        AuthzRequest.parse({**doc, "RequestBody": B64[:-2] + "!="})
    with pytest.raises(InputError, match="RequestUri"):
        AuthzRequest.parse({**doc, "RequestUri": ""})


# -- the gate: live policy -> answer ----------------------------------------------------------------


class _Reason:
    value = "not-allowlisted"


BLOCKED = FakeHandled(FakeDecision("blocked", _Reason(), "no allowlist entry"), FakeFacts())
ALLOWED = FakeHandled(FakeDecision("allowed", _Reason(), "on the list"), FakeFacts())

GATE_CASES = [
    # (id, enforcement, enforcer outcome, allowed?, asked the enforcer?, text in the denial)
    ("enforce: blocked", Enforcement(True, "enforce"), BLOCKED, False, True, "acme/app:1 is not allowed"),
    ("enforce: allowed", Enforcement(True, "enforce"), ALLOWED, True, True, ""),
    ("audit: allowed at once", Enforcement(True, "audit"), BLOCKED, True, False, ""),
    ("disabled: allowed at once", Enforcement(False, "enforce"), BLOCKED, True, False, ""),
    ("no such container", Enforcement(True, "enforce"), Gone("x"), False, True, "no such container"),
    ("engine error", Enforcement(True, "enforce"), EngineError("down"), False, True, "cannot look up"),
]


@pytest.mark.parametrize(
    ("enforcement", "outcome", "allowed", "asked", "text"),
    [c[1:] for c in GATE_CASES],
    ids=[c[0] for c in GATE_CASES],
)
def test_gate(enforcement: Enforcement, outcome: Any, allowed: bool, asked: bool, text: str) -> None:
    enforcer = FakeEnforcer(enforcement, outcome)
    answer = Gate(enforcer)("web")  # type: ignore[arg-type]
    assert answer.allow is allowed
    assert enforcer.calls == (["web"] if asked else [])
    assert text in answer.msg


OPERATION_CASES = [
    # (id, enforcement, rules, request target, allowed?)
    ("build refused by default", Enforcement(True, "enforce"), PreventiveConfig(), "/build", False),
    (
        "build allowed by the switch",
        Enforcement(True, "enforce"),
        PreventiveConfig(allow_build=True),
        "/build",
        True,
    ),
    ("audit: build let through", Enforcement(True, "audit"), PreventiveConfig(), "/build", True),
    ("swarm refused by default", Enforcement(True, "enforce"), PreventiveConfig(), "/swarm/init", False),
    (
        "swarm allowed by the switch",
        Enforcement(True, "enforce"),
        PreventiveConfig(allow_swarm=True),
        "/swarm/init",
        True,
    ),
    ("plugin refused", Enforcement(True, "enforce"), PreventiveConfig(), "/plugins/pull?name=x", False),
    (
        "named plugin allowed",
        Enforcement(True, "enforce"),
        PreventiveConfig(allow_plugins=("vieux/sshfs",)),
        "/plugins/vieux/sshfs:latest/enable",
        True,
    ),
    (
        "another plugin refused",
        Enforcement(True, "enforce"),
        PreventiveConfig(allow_plugins=("vieux/sshfs",)),
        "/plugins/imageguard/enable",
        False,
    ),
]


@pytest.mark.parametrize(
    ("enforcement", "rules", "target", "allowed"),
    [c[1:] for c in OPERATION_CASES],
    ids=[c[0] for c in OPERATION_CASES],
)
def test_gate_operations(
    enforcement: Enforcement, rules: PreventiveConfig, target: str, allowed: bool
) -> None:
    enforcer = FakeEnforcer(enforcement, ALLOWED)
    answer = Gate(enforcer, rules).operation(classify("POST", target))  # type: ignore[arg-type]
    assert answer.allow is allowed
    assert enforcer.calls == []
    if not allowed:
        assert "[preventive]" in answer.msg


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_pending_starts_hold_every_name_until_released_or_expired() -> None:
    clock = Clock()
    pending = PendingStarts(ttl=30, clock=clock)
    pending.hold("web", "c0ffee", "web")
    assert pending.active() == {"web", "c0ffee"}
    pending.release("web")
    assert pending.active() == set()
    pending.hold("db", "d1")
    clock.t = 31  # dockerd never answered: the hold expires
    assert pending.active() == set()


def test_gate_refuses_renames_and_removals_while_a_start_is_pending() -> None:
    enforcer = FakeEnforcer(Enforcement(True, "enforce"), ALLOWED)
    gate = Gate(enforcer)  # type: ignore[arg-type]
    assert gate("web", start=True).allow
    assert not gate.rebinding(classify("POST", "/containers/other/rename?name=web")).allow
    assert not gate.rebinding(classify("DELETE", "/containers/web")).allow
    assert gate.rebinding(classify("DELETE", "/containers/unrelated")).allow
    gate.responded("POST", "/v1.41/containers/web/start", 204, None)  # dockerd has started it
    assert gate.rebinding(classify("POST", "/containers/other/rename?name=web")).allow
    refused = Gate(FakeEnforcer(Enforcement(True, "enforce"), BLOCKED))  # type: ignore[arg-type]
    assert not refused("web", start=True).allow
    assert refused.rebinding(classify("POST", "/containers/web/rename?name=x")).allow  # nothing pending


# -- the server on a real Unix socket ---------------------------------------------------------------


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ig-authz-", dir="/tmp"))  # short: socket paths are limited to 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


class UnixConnection(HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(self.path))


def post(
    conn: HTTPConnection, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    conn.request("POST", path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, json.loads(data) if data else None


@pytest.fixture
def server(sockdir: Path) -> Iterator[tuple[AuthzServer, Recorder]]:
    decider = Recorder(DENY)
    srv = AuthzServer(sockdir / "p.sock", decider)
    srv.start()
    yield srv, decider
    srv.close()


def test_protocol_round_trip(server: tuple[AuthzServer, Recorder]) -> None:
    srv, decider = server
    assert stat.S_IMODE(srv.path.stat().st_mode) == 0o600
    conn = UnixConnection(srv.path)
    try:  # one kept-alive connection, as dockerd uses
        assert post(conn, "/Plugin.Activate", b"") == (200, {"Implements": ["authz"]})
        assert post(conn, "/AuthZPlugin.AuthZReq", req()) == (200, {"Allow": False, "Msg": DENY.msg})
        assert post(conn, "/AuthZPlugin.AuthZReq", req("GET", "/v1.41/info")) == (200, {"Allow": True})
        assert post(conn, "/AuthZPlugin.AuthZRes", req(ResponseStatusCode=204)) == (200, {"Allow": True})
        status, doc = post(conn, "/Unknown.Method", b"{}")
        assert status == 404 and "unknown" in doc["Err"]
    finally:
        conn.close()
    assert decider.calls == ["abc", "done:/v1.41/containers/abc/start"]  # the response is passed on


def test_oversized_or_unsized_messages_are_refused(server: tuple[AuthzServer, Recorder]) -> None:
    srv, decider = server
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(srv.path))
        s.sendall(b"POST /AuthZPlugin.AuthZReq HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 413")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(srv.path))
        s.sendall(b"POST /AuthZPlugin.AuthZReq HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 411")
    assert decider.calls == []


def test_decisions_may_call_back_into_the_server(sockdir: Path) -> None:
    """A start is decided by looking the container up through dockerd, which asks the plugin again."""
    path = sockdir / "p.sock"

    class Decider(Recorder):
        def __call__(self, ref: str, *, start: bool = False) -> Answer:
            nested = UnixConnection(path)
            try:
                status, doc = post(
                    nested, "/AuthZPlugin.AuthZReq", req("GET", f"/v1.41/containers/{ref}/json")
                )
            finally:
                nested.close()
            return Answer(status == 200 and doc["Allow"])

    srv = AuthzServer(path, Decider())
    srv.start()
    try:
        results: list[Any] = []

        def one() -> None:
            conn = UnixConnection(path)
            try:
                results.append(post(conn, "/AuthZPlugin.AuthZReq", req()))
            finally:
                conn.close()

        threads = [threading.Thread(target=one) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        assert results == [(200, {"Allow": True})] * 16
    finally:
        srv.close()


def test_socket_claiming(sockdir: Path) -> None:
    path = sockdir / "sub" / "p.sock"
    first = AuthzServer(path, Recorder())
    first.start()
    try:
        with pytest.raises(StateError, match="already serves"):
            AuthzServer(path, Recorder()).start()
    finally:
        first.close()
    assert not path.exists()  # closing removes the socket
    # a stale socket (its server died without cleaning up) is replaced
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    second = AuthzServer(path, Recorder())
    second.start()
    second.close()
    path.write_text("not a socket")
    with pytest.raises(StateError, match="not a socket"):
        AuthzServer(path, Recorder()).start()
    assert path.read_text() == "not a socket"
    os.unlink(path)


def test_thread_end_hook_runs_when_a_connection_closes(sockdir: Path) -> None:
    ended = threading.Event()
    srv = AuthzServer(sockdir / "p.sock", Recorder(), on_thread_end=ended.set)
    srv.start()
    try:
        conn = UnixConnection(srv.path)
        assert post(conn, "/Plugin.Activate", b"")[0] == 200
        assert not ended.is_set()  # kept alive: the thread still serves this connection
        conn.close()
        assert ended.wait(5)
    finally:
        srv.close()
