"""The cloudlet dispatcher with a fake routing table: status mapping, reply topics, drops, hostile input."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.adapters.mqtt.codec import PayloadCodec
from agent.adapters.mqtt.kurapayload import KuraMessage, MetricType, MetricValue, encode_protobuf
from agent.adapters.mqtt.requests import Dispatcher, Request, Response
from agent.adapters.mqtt.topics import Topics
from agent.errors import ControlError, SchemaError
from tests.support.strategies import json_values

T = Topics(account="acme", device_id="dev-1")


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.requests: list[Request] = []

    def publish(self, topic: str, payload: bytes) -> None:
        self.sent.append((topic, payload))


def _boom(_r: Request) -> Response:
    raise RuntimeError("secret internals")


def _make() -> tuple[Dispatcher, Recorder]:
    rec = Recorder()

    def echo(r: Request) -> Response:
        rec.requests.append(r)
        return Response.of_json({"params": dict(r.params), "body": r.json})

    def special(r: Request) -> Response:
        rec.requests.append(r)
        return Response(status=200, body=b"special")

    def strict(r: Request) -> Response:
        doc = r.require_json()
        if not isinstance(doc, dict):
            raise SchemaError("allowlist entry", "", "must be an object")
        if "digest" not in doc:
            raise SchemaError("allowlist entry", "/digest", "is required")
        raise ControlError(404, "no such entry")

    routes = {
        ("GET", ("allowlist",)): echo,
        ("GET", ("allowlist", "{digest}")): echo,
        ("GET", ("allowlist", "_all")): special,
        ("PUT", ("allowlist", "{digest}")): strict,
        ("EXEC", ("crash",)): _boom,
        ("GET", ("bad",)): lambda r: "not a response",  # type: ignore[dict-item, arg-type, return-value]
    }
    return Dispatcher(T, routes, rec.publish, codec=PayloadCodec(max_payload_bytes=4096)), rec


def _req(
    body: bytes | None = None, rid: str | None = "42", who: str | None = "console", **extra: MetricValue
) -> bytes:
    metrics: dict[str, MetricValue] = dict(extra)
    if rid is not None:
        metrics["request.id"] = MetricValue.string(rid)
    if who is not None:
        metrics["requester.client.id"] = MetricValue.string(who)
    return encode_protobuf(KuraMessage(timestamp_ms=1, metrics=metrics, body=body))


def _only_reply(rec: Recorder) -> tuple[str, KuraMessage]:
    assert len(rec.sent) == 1
    topic, payload = rec.sent[0]
    return topic, PayloadCodec().decode(payload)


@pytest.mark.parametrize(
    ("path", "body", "status", "message_part"),
    [
        ("GET/allowlist", None, 200, None),
        ("GET/allowlist/sha256:ab", None, 200, None),
        ("GET/allowlist/_all", None, 200, None),
        ("GET/nothing", None, 404, "no resource 'nothing'"),
        ("GET/allowlist/a/b", None, 404, "no resource"),
        ("GET/allowlist/", None, 404, "no resource"),
        ("POST/allowlist", None, 400, "POST is not supported on 'allowlist'; use GET"),
        ("SUBMIT/allowlist", None, 400, "unknown method 'SUBMIT'"),
        ("PUT/allowlist/x", None, 400, "no body"),
        ("PUT/allowlist/x", b"{nope", 400, "not JSON"),
        ("PUT/allowlist/x", b"[1]", 400, "allowlist entry: at /: must be an object"),
        ("PUT/allowlist/x", b"{}", 400, "at /digest: is required"),
        ("PUT/allowlist/x", b'{"digest": 1}', 404, "no such entry"),
        ("EXEC/crash", None, 500, "internal error"),
        ("GET/bad", None, 500, "internal error"),
    ],
)
def test_status_mapping(path: str, body: bytes | None, status: int, message_part: str | None) -> None:
    d, rec = _make()
    d.handle(f"{T.control_base}/{path}", _req(body))
    topic, reply = _only_reply(rec)
    assert topic == "$EDC/acme/console/CONTAINER-AUTH-V1/REPLY/42"
    code = reply.metrics["response.code"]
    assert (code.type, code.value) == (MetricType.INT32, status)
    msg = reply.string("response.exception.message")
    if message_part is None:
        assert msg is None
    else:
        assert msg is not None and message_part in msg
        assert "secret internals" not in msg


def test_params_body_and_specificity() -> None:
    d, rec = _make()
    d.handle(f"{T.control_base}/GET/allowlist/sha256:ab", _req(b'{"x": [1]}'))
    _, reply = _only_reply(rec)
    assert json.loads(reply.body or b"") == {"params": {"digest": "sha256:ab"}, "body": {"x": [1]}}
    (req,) = rec.requests
    assert (req.method, req.resource, req.request_id, req.requester) == (
        "GET",
        ("allowlist", "sha256:ab"),
        "42",
        "console",
    )
    rec.sent.clear()
    d.handle(f"{T.control_base}/GET/allowlist/_all", _req())
    assert _only_reply(rec)[1].body == b"special"


@pytest.mark.parametrize(
    ("rid", "who"),
    [(None, "console"), ("42", None), ("a/b", "console"), ("42", "con+sole"), ("", "console")],
)
def test_requests_without_usable_ids_are_dropped(rid: str | None, who: str | None) -> None:
    d, rec = _make()
    d.handle(f"{T.control_base}/GET/allowlist", _req(rid=rid, who=who))
    assert rec.sent == [] and d.stats.dropped == 1


def test_ids_must_be_strings() -> None:
    d, rec = _make()
    payload = encode_protobuf(
        KuraMessage(
            metrics={"request.id": MetricValue.int64(42), "requester.client.id": MetricValue.string("c")}
        )
    )
    d.handle(f"{T.control_base}/GET/allowlist", payload)
    assert rec.sent == [] and d.stats.dropped == 1


@pytest.mark.parametrize("gzip", [False, True])
def test_oversized_request_answered_400_when_ids_readable(gzip: bool) -> None:
    d, rec = _make()
    ids = {"request.id": MetricValue.string("42"), "requester.client.id": MetricValue.string("c")}
    payload = encode_protobuf(KuraMessage(metrics=ids, body=b"\xff" * 10_000), gzip=gzip)
    assert payload.startswith(b"\x1f\x8b") == gzip
    d.handle(f"{T.control_base}/GET/allowlist", payload)
    topic, reply = _only_reply(rec)
    assert topic.endswith("/c/CONTAINER-AUTH-V1/REPLY/42") and reply.integer("response.code") == 400
    assert "4096 bytes (mqtt.max_payload_bytes)" in (reply.string("response.exception.message") or "")
    rec.sent.clear()
    d.handle(f"{T.control_base}/GET/allowlist", b'{"body_text":"' + b"a" * 10_000 + b'"}')
    assert rec.sent == [] and d.stats.dropped == 1


def test_json_request_gets_json_reply() -> None:
    d, rec = _make()
    doc = {"metrics": {"request.id": "7", "requester.client.id": "tool"}, "body_json": {"k": "v"}}
    d.handle(f"{T.control_base}/GET/allowlist/d1", json.dumps(doc).encode())
    topic, payload = rec.sent[0]
    reply = json.loads(payload)
    assert topic.endswith("/tool/CONTAINER-AUTH-V1/REPLY/7")
    assert reply["metrics"]["response.code"] == {"type": "INT32", "value": 200}


def test_replies_and_foreign_topics_are_ignored() -> None:
    d, rec = _make()
    d.handle(f"{T.control_base}/REPLY/42", _req())
    d.handle("$EDC/acme/other/CONTAINER-AUTH-V1/GET/allowlist", _req())
    assert rec.sent == [] and d.stats.received == 0


def test_publish_failure_does_not_escape() -> None:
    def failing(_t: str, _p: bytes) -> None:
        raise OSError("broker gone")

    d = Dispatcher(T, {("GET", ("x",)): lambda r: Response()}, failing)
    d.handle(f"{T.control_base}/GET/x", _req())
    assert d.stats.errors == 1


def test_bad_routes_rejected() -> None:
    with pytest.raises(ValueError):
        Dispatcher(T, {("FETCH", ("x",)): lambda r: Response()}, print)
    with pytest.raises(ValueError):
        Dispatcher(T, {("GET", ("a/b",)): lambda r: Response()}, print)


@settings(max_examples=300)
@given(st.binary(max_size=300), st.sampled_from(["GET/allowlist", "PUT/allowlist/x", "EXEC/crash", "NOPE"]))
def test_arbitrary_payloads_never_crash(data: bytes, path: str) -> None:
    d, rec = _make()
    d.handle(f"{T.control_base}/{path}", data)
    assert d.stats.errors <= 1  # only the deliberately crashing handler counts
    assert len(rec.sent) <= 1


@settings(max_examples=200)
@given(json_values, st.sampled_from(["GET/allowlist/x", "PUT/allowlist/x"]))
def test_arbitrary_json_bodies_never_crash(value: object, path: str) -> None:
    d, rec = _make()
    with contextlib.suppress(ValueError):  # hypothesis floats include NaN, which JSON cannot carry
        body = json.dumps(value, allow_nan=False).encode()
        d.handle(f"{T.control_base}/{path}", _req(body))
        _, reply = _only_reply(rec)
        assert reply.integer("response.code") in (200, 400, 404)
