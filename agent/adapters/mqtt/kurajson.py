"""The JSON form of a KuraPayload (``mqtt.encoding = "json"``).

Schema: ``schemas/kura-payload-json.schema.json``.

It is Kura's SIMPLE_JSON layout, so a Kura-aware consumer reads it, plus typed metrics so no type is lost::

    {
      "sentOn": 1718000000000,                          # KuraPayload.timestamp (ms), optional
      "position": {"latitude": 46.1, "longitude": 13.2},  # optional, Kura's field names
      "metrics": {
        "request.id": "42",                             # plain string  -> STRING
        "dry_run": true,                                # plain boolean -> BOOL
        "count": 3,                                     # plain integer -> INT64
        "ratio": 0.5,                                   # other number  -> DOUBLE
        "response.code": {"type": "INT32", "value": 200}, # typed form, any of the 7 Kura types
        "raw": {"type": "BYTES", "value": "AAE="}        # BYTES as base64
                                                        # DOUBLE/FLOAT values may be "NaN", "-Infinity"...
      },
      "body": "eyJhIjoxfQ=="                            # body bytes, base64
    }

On input the body may instead be ``"body_text"`` (a string sent as UTF-8) or ``"body_json"`` (any JSON value,
sent compactly), which makes hand-written requests (``mosquitto_pub -m``) easy; at most one body key.
The encoder writes STRING, BOOL and INT64 metrics plainly and every other type in the typed form, so that
``decode(encode(m)) == m`` always holds.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

from agent.adapters.mqtt.kurapayload import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    KuraMessage,
    KuraPosition,
    MetricType,
    MetricValue,
    check_size,
)
from agent.core.schemas import validate
from agent.errors import PayloadError, SchemaError

_PLAIN = (MetricType.STRING, MetricType.BOOL, MetricType.INT64)
_BODY_KEYS = frozenset(("body", "body_text", "body_json"))
_FLOAT_WORDS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def encode_json(message: KuraMessage) -> bytes:
    doc: dict[str, Any] = {}
    if message.timestamp_ms is not None:
        doc["sentOn"] = message.timestamp_ms
    if message.position is not None:
        pos = message.position
        doc["position"] = {
            "latitude": _float_out(pos.latitude),
            "longitude": _float_out(pos.longitude),
            **{n: getattr(pos, n) for n in KuraPosition.OPTIONAL if getattr(pos, n) is not None},
        }
    metrics: dict[str, Any] = {}
    for name, m in message.metrics.items():
        if m.type in _PLAIN:
            metrics[name] = m.value
        elif m.type is MetricType.BYTES:
            assert isinstance(m.value, bytes)
            metrics[name] = {"type": "BYTES", "value": base64.b64encode(m.value).decode("ascii")}
        elif m.type in (MetricType.DOUBLE, MetricType.FLOAT):
            assert isinstance(m.value, float)
            metrics[name] = {"type": m.type.name, "value": _float_out(m.value)}
        else:
            metrics[name] = {"type": m.type.name, "value": m.value}
    doc["metrics"] = metrics
    if message.body is not None:
        doc["body"] = base64.b64encode(message.body).decode("ascii")
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _float_out(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _reject_constant(word: str) -> Any:
    raise ValueError(f"{word} is not JSON")


def decode_json(data: bytes, *, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> KuraMessage:
    """Parse and validate the JSON form. Raises PayloadError / PayloadTooLarge only."""
    check_size(data, max_bytes)
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PayloadError(f"payload is not JSON: {str(exc)[:200]}") from None
    if isinstance(doc, dict) and len(_BODY_KEYS.intersection(doc)) > 1:
        raise PayloadError("JSON payload: at /: give at most one of body, body_text, body_json")
    try:
        validate(doc, "kura-payload-json", "JSON payload")
    except SchemaError as exc:
        raise PayloadError(str(exc)) from None
    except RecursionError:
        raise PayloadError("JSON payload: nested too deeply") from None
    try:
        return _from_doc(doc)
    except PayloadError:
        raise
    except (ValueError, TypeError, binascii.Error, RecursionError) as exc:
        raise PayloadError(f"JSON payload: {str(exc)[:200]}") from None


def _from_doc(doc: dict[str, Any]) -> KuraMessage:
    metrics = {name: _metric_in(name, v) for name, v in doc.get("metrics", {}).items()}
    position = None
    if "position" in doc:
        p = dict(doc["position"])
        for key in ("timestamp", "satellites", "status"):
            if key in p:
                p[key] = int(p[key])  # JSON Schema's "integer" admits 3.0
        position = KuraPosition(**p)
    body: bytes | None = None
    if "body" in doc:
        body = base64.b64decode(doc["body"], validate=True)
    elif "body_text" in doc:
        try:
            body = doc["body_text"].encode("utf-8")
        except UnicodeEncodeError:
            raise PayloadError("JSON payload: at /body_text: not encodable as UTF-8") from None
    elif "body_json" in doc:
        body = json.dumps(doc["body_json"], ensure_ascii=False, separators=(",", ":")).encode(
            "utf-8", "strict"
        )
    ts = doc.get("sentOn")
    return KuraMessage(
        timestamp_ms=int(ts) if ts is not None else None, metrics=metrics, body=body, position=position
    )


def _metric_in(name: str, raw: Any) -> MetricValue:
    try:
        if isinstance(raw, dict):
            mtype = MetricType[raw["type"]]
            value = raw["value"]
            if mtype is MetricType.BYTES:
                return MetricValue.blob(base64.b64decode(value, validate=True))
            if mtype in (MetricType.DOUBLE, MetricType.FLOAT):
                number = _FLOAT_WORDS[value] if isinstance(value, str) else float(value)
                return (
                    MetricValue.double(number) if mtype is MetricType.DOUBLE else MetricValue.float32(number)
                )
            if mtype in (MetricType.INT32, MetricType.INT64):
                value = int(value)
            return MetricValue(mtype, value)
        if isinstance(raw, bool | str):
            return MetricValue.of(raw)
        if isinstance(raw, int):
            return MetricValue.int64(raw)
        return MetricValue.double(float(raw))
    except PayloadError as exc:
        raise PayloadError(f"JSON payload: at /metrics/{_pointer(name)}: {exc.message}") from None


def _pointer(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")
