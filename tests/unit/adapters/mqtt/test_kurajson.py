"""The JSON encoding: Kura SIMPLE_JSON layout, typed metrics, schema errors with pointers, hostile input."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.adapters.mqtt.codec import PayloadCodec, detect_encoding
from agent.adapters.mqtt.kurajson import decode_json, encode_json
from agent.adapters.mqtt.kurapayload import KuraMessage, KuraPosition, MetricType, MetricValue
from agent.errors import PayloadError, PayloadTooLarge
from tests.support.strategies import json_values, messages


@given(messages)
def test_round_trip(message: KuraMessage) -> None:
    assert decode_json(encode_json(message)) == message


def test_layout_is_kura_simple_json_with_typed_extension() -> None:
    msg = KuraMessage(
        timestamp_ms=5,
        metrics={
            "s": MetricValue.string("x"),
            "b": MetricValue.boolean(True),
            "l": MetricValue.int64(7),
            "response.code": MetricValue.int32(200),
            "n": MetricValue.double(math.inf),
        },
        body=b"hi",
        position=KuraPosition(1.0, 2.0),
    )
    doc = json.loads(encode_json(msg))
    assert doc == {
        "sentOn": 5,
        "position": {"latitude": 1.0, "longitude": 2.0},
        "metrics": {
            "s": "x",
            "b": True,
            "l": 7,
            "response.code": {"type": "INT32", "value": 200},
            "n": {"type": "DOUBLE", "value": "Infinity"},
        },
        "body": "aGk=",
    }


@pytest.mark.parametrize(
    ("doc", "expected_type", "expected_value"),
    [
        ('{"metrics":{"m":"v"}}', MetricType.STRING, "v"),
        ('{"metrics":{"m":false}}', MetricType.BOOL, False),
        ('{"metrics":{"m":12}}', MetricType.INT64, 12),
        ('{"metrics":{"m":1.5}}', MetricType.DOUBLE, 1.5),
        ('{"metrics":{"m":{"type":"INT32","value":3}}}', MetricType.INT32, 3),
        ('{"metrics":{"m":{"type":"FLOAT","value":0.5}}}', MetricType.FLOAT, 0.5),
        ('{"metrics":{"m":{"type":"BYTES","value":"AAE="}}}', MetricType.BYTES, b"\x00\x01"),
    ],
)
def test_metric_forms(doc: str, expected_type: MetricType, expected_value: object) -> None:
    m = decode_json(doc.encode()).metrics["m"]
    assert (m.type, m.value) == (expected_type, expected_value)


@pytest.mark.parametrize(
    ("doc", "body"),
    [
        ('{"body":"aGk="}', b"hi"),
        ('{"body_text":"h\\u00e9"}', "hé".encode()),
        ('{"body_json":{"a":[1, 2]}}', b'{"a":[1,2]}'),
        ("{}", None),
    ],
)
def test_body_forms(doc: str, body: bytes | None) -> None:
    assert decode_json(doc.encode()).body == body


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        (b"[1]", "at /:"),
        (b'{"metrics":{"a":{"type":"INT32","value":2147483648}}}', "at /metrics/a/value"),
        (b'{"metrics":{"a":{"type":"BYTES","value":"***"}}}', "at /metrics/a/value"),
        (b'{"metrics":{"a":null}}', "at /metrics/a"),
        (b'{"body":"x","body_json":1}', "at most one"),
        (b'{"sentOn":"now"}', "at /sentOn"),
        (b'{"extra":1}', "at /"),
        (b'{"body_json":NaN}', "not JSON"),
        (b"\xff{", "not JSON"),
        (b"{" * 100_000, "JSON"),
    ],
)
def test_bad_documents(doc: bytes, fragment: str) -> None:
    with pytest.raises(PayloadError) as info:
        decode_json(doc, max_bytes=1 << 20)
    assert fragment in str(info.value)


def test_size_limit() -> None:
    with pytest.raises(PayloadTooLarge):
        decode_json(b'{"body_text":"' + b"a" * 2000 + b'"}', max_bytes=1024)


@settings(max_examples=300)
@given(json_values)
def test_arbitrary_json_only_raises_payload_error(value: object) -> None:
    for doc in (
        value,
        {"metrics": value},
        {"metrics": {"m": value}},
        {"body_json": value},
        {"position": value},
    ):
        with contextlib.suppress(PayloadError):
            decode_json(json.dumps(doc).encode())


@given(st.binary(max_size=200))
def test_arbitrary_bytes_through_codec(data: bytes) -> None:
    for candidate in (data, b"{" + data):
        with contextlib.suppress(PayloadError):
            PayloadCodec().decode(candidate)


def test_detect_and_encode_choice() -> None:
    msg = KuraMessage(metrics={"a": MetricValue.string("b")})
    assert detect_encoding(b' \n{"a":1}') == "json"
    assert detect_encoding(b"\x08\x01") == "kura-protobuf"
    codec = PayloadCodec(encoding="json")
    assert codec.encode(msg).startswith(b"{") and codec.birth_name == "SIMPLE_JSON"
    assert not codec.encode(msg, "kura-protobuf").startswith(b"{")
    assert codec.decode(codec.encode(msg, "kura-protobuf")) == msg
