"""KuraPayload protobuf codec: round trips, Kura's wire facts, gzip rules, size limits, hostile bytes."""

from __future__ import annotations

import contextlib
import math
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.adapters.mqtt.kurapayload import (
    KuraMessage,
    KuraPosition,
    MetricType,
    MetricValue,
    decode_protobuf,
    encode_protobuf,
    gunzip_bounded,
    peek_string_metrics,
)
from agent.errors import PayloadError, PayloadTooLarge
from tests.support.reference_pb import KuraPayloadPB
from tests.support.strategies import messages


def _gz(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


@given(messages, st.booleans())
def test_round_trip(message: KuraMessage, gzip: bool) -> None:
    assert decode_protobuf(encode_protobuf(message, gzip=gzip)) == message


def test_wire_layout_matches_kura() -> None:
    msg = KuraMessage(
        timestamp_ms=1700000000000, metrics={"response.code": MetricValue.int32(200)}, body=b"x"
    )
    pb = KuraPayloadPB()
    pb.ParseFromString(encode_protobuf(msg, gzip=False))
    (metric,) = pb.metric
    # response.code must be INT32 (type 3) carried in int_value (field 6), as Kapua reads it
    assert (metric.name, metric.type, metric.int_value, metric.HasField("long_value")) == (
        "response.code",
        3,
        200,
        False,
    )
    assert pb.timestamp == 1700000000000 and pb.body == b"x"
    # metric is field 5000, body 5001: key varints c2 b8 02 and ca b8 02
    raw = encode_protobuf(msg, gzip=False)
    assert b"\xc2\xb8\x02" in raw and raw.endswith(b"\xca\xb8\x02\x01x")


@pytest.mark.parametrize(
    ("build", "value"),
    [
        (MetricValue.int32, 2**31),
        (MetricValue.int32, -(2**31) - 1),
        (MetricValue.int32, True),
        (MetricValue.int64, 2**63),
        (MetricValue.float32, 1e39),
        (MetricValue.string, "\ud800"),
    ],
)
def test_metric_values_are_checked(build: object, value: object) -> None:
    with pytest.raises(PayloadError):
        build(value)  # type: ignore[operator]


def test_bare_int_is_ambiguous() -> None:
    with pytest.raises(TypeError):
        MetricValue.of(5)
    assert MetricValue.of("a").type is MetricType.STRING
    assert MetricValue.of(1.5).type is MetricType.DOUBLE


def test_gzip_only_when_shorter() -> None:
    tiny = KuraMessage(metrics={"a": MetricValue.string("b")})
    assert not encode_protobuf(tiny).startswith(b"\x1f\x8b")
    big = KuraMessage(body=b"a" * 5000)
    out = encode_protobuf(big)
    assert out.startswith(b"\x1f\x8b") and len(out) < 200
    assert decode_protobuf(out) == big


def test_gzip_is_detected_and_falls_back_to_raw() -> None:
    raw = encode_protobuf(KuraMessage(metrics={"k": MetricValue.string("v")}), gzip=False)
    assert decode_protobuf(_gz(raw)).string("k") == "v"
    assert decode_protobuf(_gz(raw) + _gz(b"")).string("k") == "v"  # several members
    # magic bytes but not gzip -> parsed as raw protobuf (and here rejected as such)
    with pytest.raises(PayloadError):
        decode_protobuf(b"\x1f\x8bnot gzip")


def test_size_limit_before_and_after_gunzip() -> None:
    with pytest.raises(PayloadTooLarge):
        decode_protobuf(b"\x00" * 2048, max_bytes=1024)
    bomb = _gz(encode_protobuf(KuraMessage(body=b"\x00" * 10_000_000), gzip=False))
    assert len(bomb) < 20_000
    with pytest.raises(PayloadTooLarge):
        decode_protobuf(bomb, max_bytes=64 * 1024)
    assert gunzip_bounded(_gz(b"abc"), 3) == b"abc"
    with pytest.raises(PayloadTooLarge):
        gunzip_bounded(_gz(b"abcd"), 3)


def test_missing_required_fields_rejected() -> None:
    # metric (field 5000) with a name but no type
    with pytest.raises(PayloadError, match="required"):
        decode_protobuf(b"\xc2\xb8\x02\x03\x0a\x01a")


def test_last_metric_of_a_name_wins() -> None:
    pb = KuraPayloadPB()
    for v in ("1", "2"):
        m = pb.metric.add(name="x", type=5)
        m.string_value = v
    assert decode_protobuf(pb.SerializeToString()).string("x") == "2"


def test_nan_survives() -> None:
    out = decode_protobuf(encode_protobuf(KuraMessage(metrics={"n": MetricValue.double(math.nan)})))
    value = out.metrics["n"].value
    assert isinstance(value, float) and math.isnan(value)


@settings(max_examples=500)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_only_raise_payload_error(data: bytes) -> None:
    for candidate in (data, _gz(data), b"\x1f\x8b" + data):
        with contextlib.suppress(PayloadError):
            decode_protobuf(candidate)


@given(st.binary(max_size=400))
def test_peek_never_raises(data: bytes) -> None:
    peek_string_metrics(data, ["request.id"], max_bytes=1024)


def test_peek_reads_ids_of_oversized_payloads() -> None:
    msg = KuraMessage(
        metrics={"request.id": MetricValue.string("42"), "requester.client.id": MetricValue.string("c")},
        body=b"\xff" * 100_000,
    )
    for data in (encode_protobuf(msg, gzip=False), _gz(encode_protobuf(msg, gzip=False))):
        found = peek_string_metrics(data, ["request.id", "requester.client.id"], max_bytes=1024)
        assert found == {"request.id": "42", "requester.client.id": "c"}


# --- the agent's codec against the protobuf library ----------------------------------------------------


def _reference_to_message(pb: KuraPayloadPB) -> KuraMessage:  # type: ignore[valid-type]
    fields = {
        MetricType.DOUBLE: "double_value",
        MetricType.FLOAT: "float_value",
        MetricType.INT64: "long_value",
        MetricType.INT32: "int_value",
        MetricType.BOOL: "bool_value",
        MetricType.STRING: "string_value",
        MetricType.BYTES: "bytes_value",
    }
    metrics = {}
    for m in pb.metric:
        metrics.pop(m.name, None)
        metrics[m.name] = MetricValue(MetricType(m.type), getattr(m, fields[MetricType(m.type)]))
    position = None
    if pb.HasField("position"):
        p = pb.position
        optional = ("altitude", "precision", "heading", "speed", "timestamp", "satellites", "status")
        position = KuraPosition(
            p.latitude, p.longitude, **{n: getattr(p, n) for n in optional if p.HasField(n)}
        )
    return KuraMessage(
        timestamp_ms=pb.timestamp if pb.HasField("timestamp") else None,
        metrics=metrics,
        body=pb.body if pb.HasField("body") else None,
        position=position,
    )


@settings(max_examples=300)
@given(messages)
def test_protobuf_library_reads_what_we_write(message: KuraMessage) -> None:
    pb = KuraPayloadPB()
    pb.ParseFromString(encode_protobuf(message, gzip=False))
    assert pb.IsInitialized()
    assert _reference_to_message(pb) == message


@settings(max_examples=300)
@given(messages)
def test_we_read_what_the_protobuf_library_writes(message: KuraMessage) -> None:
    pb = KuraPayloadPB()
    pb.ParseFromString(encode_protobuf(message, gzip=False))
    reference_bytes = pb.SerializeToString()
    assert reference_bytes == encode_protobuf(message, gzip=False)  # same bytes, field for field
    assert decode_protobuf(reference_bytes) == message
