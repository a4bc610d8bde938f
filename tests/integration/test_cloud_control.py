"""Request/response for every CONTAINER-AUTH-V1 resource against a running agent process, driven only with
Debian's tools: mosquitto_sub / mosquitto_pub for the MQTT side, ``protoc --encode/--decode`` with Kura's
schema for protobuf payloads (an encoder and decoder independent of ours)."""

from __future__ import annotations

import codecs
import gzip
import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.schemas import validate
from tests.fixtures.mosquitto import MosquittoBroker, TlsFiles, free_port
from tests.support.agentproc import REPO, AgentProcess, wait_for, write_config
from tests.support.dockerd import Dockerd

pytestmark = pytest.mark.integration

PROTO = REPO / "agent" / "mqtt" / "kurapayload.proto"
ACCOUNT, DEVICE, APP = "acme", "dev-1", "CONTAINER-AUTH-V1"
ALLOWED, OTHER = "ig-test/allowed:1", "ig-test/other:1"
D_X = "sha256:" + "ab" * 32


# --- helpers shared by the test_cloud_* modules ------------------------------------------------------


def request_topic(method: str, *resource: str, device: str = DEVICE) -> str:
    return "/".join((f"$EDC/{ACCOUNT}/{device}/{APP}", method, *resource))


def protoc(mode: str, data: bytes) -> bytes:
    out = subprocess.run(
        ["protoc", f"--{mode}", "kuradatatypes.KuraPayload", "-I", str(PROTO.parent), str(PROTO)],
        input=data,
        capture_output=True,
        check=True,
        timeout=30,
    )
    return out.stdout


def _text_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def encode_request(rid: str | None, body: Any, encoding: str, requester: str = "console") -> bytes:
    """A request payload built without our code: JSON by hand, protobuf by ``protoc --encode``."""
    raw = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    if encoding == "json":
        doc: dict[str, Any] = {"metrics": {"requester.client.id": requester}}
        if rid is not None:
            doc["metrics"]["request.id"] = rid
        if raw is not None:
            doc["body_text"] = raw.decode()
        return json.dumps(doc).encode()
    lines = []
    if rid is not None:
        lines.append(f'metric {{ name: "request.id" type: STRING string_value: {_text_string(rid)} }}')
    lines.append(
        f'metric {{ name: "requester.client.id" type: STRING string_value: {_text_string(requester)} }}'
    )
    if raw is not None:
        lines.append(f"body: {_text_string(raw.decode())}")
    return protoc("encode", "\n".join(lines).encode())


@dataclass
class Decoded:
    code: int | None
    message: str | None
    metrics: dict[str, Any]
    body: Any


def decode_payload(payload: bytes) -> Decoded:
    """Decode a KuraPayload with protoc (protobuf) or json (JSON encoding) - not with agent code."""
    if payload[:1] == b"{":
        doc = json.loads(payload)
        metrics = {k: (v["value"] if isinstance(v, dict) else v) for k, v in doc.get("metrics", {}).items()}
        body = codecs.decode(doc["body"].encode(), "base64") if "body" in doc else None
    else:
        if payload[:2] == b"\x1f\x8b":
            payload = gzip.decompress(payload)
        text = protoc("decode", payload).decode()
        metrics = {}
        for m in re.finditer(r'metric \{\s*name: "([^"]+)"\s*type: (\w+)\s*(\w+): (.*?)\n\s*\}', text):
            name, value = m.group(1), m.group(4)
            metrics[name] = int(value) if m.group(3) in ("int_value", "long_value") else _unquote(value)
        found = re.search(r'^body: (".*")$', text, re.M)
        body = _unquote(found.group(1)).encode("latin-1") if found else None
    parsed = json.loads(body) if body else None
    return Decoded(metrics.get("response.code"), metrics.get("response.exception.message"), metrics, parsed)


def _unquote(value: str) -> str:
    if value.startswith('"'):
        return codecs.escape_decode(value[1:-1].encode())[0].decode("latin-1")  # type: ignore[no-any-return]
    return value


class Subscriber:
    """``mosquitto_sub`` in the background; returns once the broker acknowledged the subscription."""

    def __init__(self, broker: MosquittoBroker, topic: str, *extra: str) -> None:
        self.proc = subprocess.Popen(
            # line-buffered, so the SUBACK line arrives while mosquitto_sub is still running
            [
                "stdbuf",
                "-oL",
                "mosquitto_sub",
                *broker.cli(),
                "-d",
                "-q",
                "1",
                "-t",
                topic,
                "-F",
                "PAYLOAD %t %x",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if b"SUBACK" in line:
                return
        raise AssertionError(f"mosquitto_sub ended before subscribing (exit {self.proc.wait()})")

    def messages(self, timeout: float = 20) -> list[tuple[str, bytes]]:
        """Wait for mosquitto_sub to end (-C count / -W timeout) and return (topic, payload) pairs."""
        out, _ = self.proc.communicate(timeout=timeout)
        result = []
        for line in out.decode(errors="replace").splitlines():
            if line.startswith("PAYLOAD "):
                _, topic, hexed = [*line.split(" ", 2), ""][:3]
                result.append((topic, bytes.fromhex(hexed)))
        return result


def publish(broker: MosquittoBroker, topic: str, payload: bytes, *extra: str) -> None:
    subprocess.run(
        ["mosquitto_pub", *broker.cli(), "-q", "1", "-t", topic, "-s", *extra],
        input=payload,
        check=True,
        timeout=20,
    )


class Console:
    """A console made of mosquitto_sub + mosquitto_pub."""

    def __init__(self, broker: MosquittoBroker, encoding: str) -> None:
        self.broker = broker
        self.encoding = encoding
        self.n = 0

    def call(self, method: str, *resource: str, body: Any = None, rid: str | None = "auto") -> Decoded | None:
        self.n += 1
        request_id = f"{self.encoding}-{self.n}" if rid == "auto" else rid
        reply = f"$EDC/{ACCOUNT}/console/{APP}/REPLY/{request_id or '#'}"
        sub = Subscriber(self.broker, reply, "-C", "1", "-W", "3" if request_id is None else "20")
        publish(
            self.broker, request_topic(method, *resource), encode_request(request_id, body, self.encoding)
        )
        got = sub.messages(timeout=30)
        if not got:
            return None
        assert got[0][0] == reply
        assert (got[0][1][:1] == b"{") == (self.encoding == "json"), "the reply uses the request's encoding"
        return decode_payload(got[0][1])

    def ok(self, schema: str, method: str, *resource: str, body: Any = None) -> Any:
        reply = self.call(method, *resource, body=body)
        assert reply is not None, f"no reply to {method} {resource}"
        assert reply.code == 200, reply.message
        validate(reply.body, f"control/{schema}", f"{method} {'/'.join(resource)} reply")
        return reply.body

    def status(self, method: str, *resource: str, body: Any = None) -> tuple[int | None, str]:
        reply = self.call(method, *resource, body=body)
        assert reply is not None, f"no reply to {method} {resource}"
        return reply.code, reply.message or ""


def public_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def agent_config(path: Path, engine: Dockerd, broker: MosquittoBroker, **mqtt: Any) -> Path:
    device = mqtt.pop("device", {"id": DEVICE})
    return write_config(
        path / "config.toml",
        {
            "device": device,
            "engine": {"url": engine.url},
            "state": {"dir": str(path / "state")},
            "enforcement": {"stop_grace_seconds": 0},
            "mqtt": {
                "url": broker.url,
                "account": ACCOUNT,
                "reconnect_min_seconds": 0.2,
                "reconnect_max_seconds": 1.0,
                **mqtt,
            },
        },
    )


def make_broker(workdir: Path, tls: TlsFiles | None = None) -> MosquittoBroker:
    broker = MosquittoBroker(workdir=workdir, port=free_port(), tls=tls)
    broker.start()
    return broker


# --- the tests ---------------------------------------------------------------------------------------


@dataclass
class Env:
    broker: MosquittoBroker
    engine: Dockerd
    agent: AgentProcess


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory, dockerd: Dockerd, busybox_images: dict[str, str]
) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("cloud-control")
    dockerd.remove_all_containers()
    broker = make_broker(tmp / "broker")
    agent = AgentProcess(agent_config(tmp, dockerd, broker), tmp / "agent.log")
    try:
        agent.start()
        agent.wait_log("mqtt: connected")
        dockerd.docker("run", "-d", "--name", "good", ALLOWED)  # blocked: the allowlist starts empty
        wait_for(lambda: "good" not in dockerd.docker("ps", "-a", "--format", "{{.Names}}").stdout, 20)
        yield Env(broker, dockerd, agent)
    finally:
        if agent.proc is not None:
            assert agent.stop() == 0, agent.log()
        broker.stop()
        dockerd.remove_all_containers()


@pytest.mark.parametrize("encoding", ["json", "kura-protobuf"])
def test_every_resource_round_trip(env: Env, encoding: str, busybox_images: dict[str, str]) -> None:
    c = Console(env.broker, encoding)
    allowed_id = busybox_images[ALLOWED]

    status = c.ok("get-status.reply", "GET", "status")
    assert status["device"] == DEVICE and status["mqtt"]["connected"] is True
    assert status["engine"]["reachable"] is True

    # policy: replace if newer, equal is unchanged, older is a rollback (400); nothing changes on 400
    v = c.ok("get-policy.reply", "GET", "policy")["version"]
    doc = {"version": v + 1, "allowlist": [{"digest": allowed_id, "comment": "busybox"}]}
    assert c.ok("apply-result.reply", "PUT", "policy", body=doc)["status"] == "applied"
    assert c.ok("apply-result.reply", "PUT", "policy", body=doc)["status"] == "unchanged"
    code, message = c.status("PUT", "policy", body={**doc, "version": v})
    assert code == 400 and "older" in message
    assert c.ok("get-policy.reply", "GET", "policy")["version"] == v + 1

    # allowlist
    result = c.ok("apply-result.reply", "POST", "allowlist", body={"digests": [D_X], "comment": encoding})
    assert result == {"layer": "device", "version": v + 2, "status": "applied", "revoked": 0}
    listed = c.ok("get-allowlist.reply", "GET", "allowlist")["allowlist"]
    assert {"digest": D_X, "comment": encoding, "layer": "device"} in listed
    code, message = c.status("POST", "allowlist", body={"digests": ["sha256:nothex"]})
    assert code == 400 and "at /digests/0" in message
    assert c.ok("apply-result.reply", "DEL", "allowlist", D_X)["version"] == v + 3
    assert c.status("DEL", "allowlist", D_X)[0] == 404

    # trust anchors (an unreachable registry in scope, so EXEC verify has an anchor to use)
    anchor = {"name": "release", "kind": "key", "pem": public_pem(), "scope": ["127.0.0.1:1/*"]}
    assert c.ok("apply-result.reply", "PUT", "trust-anchors", "release", body=anchor)["status"] == "applied"
    names = [a["name"] for a in c.ok("get-trust-anchors.reply", "GET", "trust-anchors")["trust_anchors"]]
    assert names == ["release"]
    code, message = c.status("PUT", "trust-anchors", "release", body={**anchor, "pem": "not a key"})
    assert code == 400
    verified = c.ok("exec-verify.reply", "EXEC", "verify", body={"image": "127.0.0.1:1/acme/app:1"})
    assert verified["valid"] is False and verified["reason"] == "registry-unreachable"
    assert c.ok("apply-result.reply", "DEL", "trust-anchors", "release")["status"] == "applied"
    assert c.status("DEL", "trust-anchors", "release")[0] == 404

    # enforcement
    assert c.ok("get-enforcement.reply", "GET", "enforcement") == {"enabled": True, "mode": "enforce"}
    changed = c.ok("put-enforcement.reply", "PUT", "enforcement", body={"mode": "audit"})
    assert changed["enforcement"]["mode"] == "audit"
    c.ok("put-enforcement.reply", "PUT", "enforcement", body={"mode": "enforce"})

    # containers, decisions, scan
    name = f"keep-{encoding}"
    env.engine.docker("run", "-d", "--name", name, ALLOWED)
    env.agent.wait_log(f"allowed container {name}")
    containers = c.ok("get-containers.reply", "GET", "containers")["containers"]
    mine = next(x for x in containers if x["name"] == name)
    assert mine["verdict"] == "allowed" and mine["reason"] == "allowlisted" and mine["state"] == "running"
    page = c.ok("get-decisions.reply", "GET", "decisions", body={"limit": 1})
    assert len(page["decisions"]) == 1 and page["next"] is not None
    older = c.ok("get-decisions.reply", "GET", "decisions", body={"limit": 1, "before": page["next"]})
    assert older["decisions"][0]["id"] != page["decisions"][0]["id"]
    scan = c.ok("exec-scan.reply", "EXEC", "scan", body={"dry_run": True})
    assert scan["scanned"] >= 1 and scan["dry_run"] is True
    assert name in {d["container"]["name"] for d in scan["decisions"]}
    env.engine.docker("rm", "-f", name)

    # errors
    assert c.status("GET", "nothing-here")[0] == 404
    code, message = c.status("PUT", "enforcement", body={"mode": "lenient"})
    assert code == 400 and "at /mode" in message
    code, message = c.status("GET", "decisions", body={"limit": 0})
    assert code == 400 and "at /limit" in message


def test_request_without_id_gets_no_reply_and_agent_keeps_serving(env: Env) -> None:
    c = Console(env.broker, "json")
    assert c.call("GET", "status", rid=None) is None
    publish(env.broker, request_topic("GET", "status"), b"\x00\xffnot a payload")
    status = c.ok("get-status.reply", "GET", "status")
    assert status["mqtt"]["requests"]["dropped"] >= 2
    assert env.agent.proc is not None and env.agent.proc.poll() is None
