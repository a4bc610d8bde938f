"""The cloud side of CONTAINER-AUTH-V1 made only of Debian's tools, for tests against a running agent process:
mosquitto_sub / mosquitto_pub for MQTT, ``protoc --encode/--decode`` with Kura's schema for protobuf payloads
(an encoder and decoder independent of ours), and the agent configuration that connects to the broker."""

from __future__ import annotations

import codecs
import gzip
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.core.schemas import validate
from tests.support.agentproc import REPO, write_config
from tests.support.dockerd import Dockerd
from tests.support.fixtures.mosquitto import MosquittoBroker, TlsFiles
from tests.support.ports import free_port

PROTO = REPO / "agent" / "adapters" / "mqtt" / "kurapayload.proto"
ACCOUNT, DEVICE, APP = "acme", "dev-1", "CONTAINER-AUTH-V1"


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


def sub_argv(broker: MosquittoBroker, topic: str, fmt: str, *extra: str) -> list[str]:
    """``mosquitto_sub`` at QoS 1 in debug mode (it prints SUBACK), each message printed as ``fmt``; run
    line-buffered, so the SUBACK line arrives while mosquitto_sub is still running."""
    return ["stdbuf", "-oL", "mosquitto_sub", *broker.cli(), "-d", "-q", "1", "-t", topic, "-F", fmt, *extra]


class Subscriber:
    """``mosquitto_sub`` in the background; returns once the broker acknowledged the subscription."""

    def __init__(self, broker: MosquittoBroker, topic: str, *extra: str) -> None:
        self.proc = subprocess.Popen(
            sub_argv(broker, topic, "PAYLOAD %t %x", *extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
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
                # unsigned policy unless a test provisions a signing key (tests of the default set it False)
                "allow_unsigned_policy": "policy_signing_key" not in mqtt,
                **mqtt,
            },
        },
    )


def make_broker(workdir: Path, tls: TlsFiles | None = None) -> MosquittoBroker:
    broker = MosquittoBroker(workdir=workdir, port=free_port(), tls=tls)
    broker.start()
    return broker
