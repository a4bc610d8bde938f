"""KuraPayload: Kura's message model and its protobuf wire form (proto2, package ``kuradatatypes``).

The protobuf descriptor is built at runtime from ``descriptor_pb2`` (no protoc at install time); it matches
``kurapayload.proto`` next to this module field for field. Gzip follows Kura: receivers detect it by the
magic bytes ``1f 8b`` and fall back to raw protobuf when decompression fails; senders compress only if that
is shorter.

Sizes are bounded before any parsing and again while gunzipping, so a small zip bomb cannot grow in memory.
Every decoding failure raises :class:`agent.errors.PayloadError` (or ``PayloadTooLarge``), nothing else.
"""

from __future__ import annotations

import enum
import math
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from agent.errors import PayloadError, PayloadTooLarge

DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024
GZIP_MAGIC = b"\x1f\x8b"

_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)


class MetricType(enum.IntEnum):
    """``KuraMetric.ValueType``; the numbers are the wire values."""

    DOUBLE = 0
    FLOAT = 1
    INT64 = 2
    INT32 = 3
    BOOL = 4
    STRING = 5
    BYTES = 6


#: the KuraMetric field that carries each type's value
_VALUE_FIELD = {
    MetricType.DOUBLE: "double_value",
    MetricType.FLOAT: "float_value",
    MetricType.INT64: "long_value",
    MetricType.INT32: "int_value",
    MetricType.BOOL: "bool_value",
    MetricType.STRING: "string_value",
    MetricType.BYTES: "bytes_value",
}

Scalar = float | int | bool | str | bytes


def _round_float32(value: float) -> float:
    if math.isnan(value) or math.isinf(value):
        return value
    try:
        rounded: float = struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:
        raise PayloadError(f"FLOAT value {value!r} is outside the 32-bit float range") from None
    return rounded


@dataclass(frozen=True)
class MetricValue:
    """A typed metric value. Python's ``int`` is ambiguous (INT32 or INT64), so the type is always explicit;
    build values with the named constructors (``MetricValue.int32(200)``, ``MetricValue.string("x")``...)."""

    type: MetricType
    value: Scalar

    def __post_init__(self) -> None:
        t, v = self.type, self.value
        if not isinstance(t, MetricType):
            raise PayloadError(f"metric type {t!r} is not a MetricType")
        ok: bool
        if t in (MetricType.INT32, MetricType.INT64):
            lo, hi = _INT32 if t is MetricType.INT32 else _INT64
            ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
        elif t is MetricType.DOUBLE:
            ok = isinstance(v, float)
        elif t is MetricType.FLOAT:
            ok = isinstance(v, float) and (math.isnan(v) or _round_float32(v) == v)
        elif t is MetricType.BOOL:
            ok = isinstance(v, bool)
        elif t is MetricType.STRING:
            ok = isinstance(v, str) and _is_utf8(v)
        else:
            ok = isinstance(v, bytes)
        if not ok:
            raise PayloadError(f"{t.name} metric cannot hold {type(v).__name__} value {_short(v)}")

    @classmethod
    def int32(cls, value: int) -> MetricValue:
        return cls(MetricType.INT32, value)

    @classmethod
    def int64(cls, value: int) -> MetricValue:
        return cls(MetricType.INT64, value)

    @classmethod
    def double(cls, value: float) -> MetricValue:
        return cls(MetricType.DOUBLE, float(value))

    @classmethod
    def float32(cls, value: float) -> MetricValue:
        """A FLOAT metric; the value is rounded to the nearest 32-bit float."""
        return cls(MetricType.FLOAT, _round_float32(float(value)))

    @classmethod
    def boolean(cls, value: bool) -> MetricValue:
        return cls(MetricType.BOOL, value)

    @classmethod
    def string(cls, value: str) -> MetricValue:
        return cls(MetricType.STRING, value)

    @classmethod
    def blob(cls, value: bytes) -> MetricValue:
        return cls(MetricType.BYTES, bytes(value))

    @classmethod
    def of(cls, value: Scalar | MetricValue) -> MetricValue:
        """Infer the type where Python's type says it: str, bool, float (DOUBLE), bytes. A bare ``int`` is
        refused (``TypeError``): say ``int32`` or ``int64``."""
        if isinstance(value, MetricValue):
            return value
        if isinstance(value, bool):
            return cls.boolean(value)
        if isinstance(value, str):
            return cls.string(value)
        if isinstance(value, float):
            return cls.double(value)
        if isinstance(value, bytes):
            return cls.blob(value)
        raise TypeError(f"ambiguous metric value {value!r}: use MetricValue.int32() or MetricValue.int64()")


@dataclass(frozen=True)
class KuraPosition:
    latitude: float
    longitude: float
    altitude: float | None = None
    precision: float | None = None
    heading: float | None = None
    speed: float | None = None
    timestamp: int | None = None
    satellites: int | None = None
    status: int | None = None

    def __post_init__(self) -> None:
        for name in ("latitude", "longitude", "altitude", "precision", "heading", "speed"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int | float) or isinstance(v, bool)):
                raise PayloadError(f"position {name} must be a number, not {type(v).__name__}")
        for name, (lo, hi) in (("timestamp", _INT64), ("satellites", _INT32), ("status", _INT32)):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi):
                raise PayloadError(f"position {name} must be an integer in [{lo}, {hi}], not {_short(v)}")

    #: optional fields in wire order, for encoders
    OPTIONAL = ("altitude", "precision", "heading", "speed", "timestamp", "satellites", "status")


@dataclass(frozen=True)
class KuraMessage:
    """One KuraPayload. ``metrics`` keeps insertion order (the wire order); a repeated name on the wire keeps
    the last value, as Kura's map does."""

    timestamp_ms: int | None = None
    metrics: Mapping[str, MetricValue] = field(default_factory=dict)
    body: bytes | None = None
    position: KuraPosition | None = None

    def __post_init__(self) -> None:
        ts = self.timestamp_ms
        if ts is not None and (
            not isinstance(ts, int) or isinstance(ts, bool) or not _INT64[0] <= ts <= _INT64[1]
        ):
            raise PayloadError(f"timestamp {_short(ts)} is not a 64-bit integer (epoch milliseconds)")
        for name, value in self.metrics.items():
            if not isinstance(name, str) or not _is_utf8(name):
                raise PayloadError(f"metric name {_short(name)} is not a UTF-8 string")
            if not isinstance(value, MetricValue):
                raise PayloadError(f"metric {name!r}: {_short(value)} is not a MetricValue")
        if self.body is not None and not isinstance(self.body, bytes):
            raise PayloadError(f"body must be bytes, not {type(self.body).__name__}")
        # a read-only copy: the message is a value, callers' dicts stay theirs
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))

    def __hash__(self) -> int:
        return hash((self.timestamp_ms, tuple(self.metrics.items()), self.body, self.position))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KuraMessage):
            return NotImplemented
        return (self.timestamp_ms, dict(self.metrics), self.body, self.position) == (
            other.timestamp_ms,
            dict(other.metrics),
            other.body,
            other.position,
        )

    def string(self, name: str) -> str | None:
        """The value of a STRING metric, or None when absent or of another type."""
        m = self.metrics.get(name)
        return m.value if m is not None and m.type is MetricType.STRING and isinstance(m.value, str) else None

    def integer(self, name: str) -> int | None:
        """The value of an INT32 or INT64 metric, or None."""
        m = self.metrics.get(name)
        if m is None or m.type not in (MetricType.INT32, MetricType.INT64) or not isinstance(m.value, int):
            return None
        return m.value


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --- protobuf descriptor, built once at import -----------------------------------------------------------


def _build_classes() -> tuple[Any, Any]:
    fdp = descriptor_pb2.FieldDescriptorProto
    f = descriptor_pb2.FileDescriptorProto(name="imageguard/kurapayload.proto", package="kuradatatypes")
    f.syntax = "proto2"
    payload = f.message_type.add(name="KuraPayload")

    def add(msg: Any, name: str, number: int, label: int, ftype: int, type_name: str = "") -> None:
        fld = msg.field.add(name=name, number=number, label=label, type=ftype)
        if type_name:
            fld.type_name = type_name

    opt, req, rep = fdp.LABEL_OPTIONAL, fdp.LABEL_REQUIRED, fdp.LABEL_REPEATED
    metric = payload.nested_type.add(name="KuraMetric")
    vt = metric.enum_type.add(name="ValueType")
    for t in MetricType:
        vt.value.add(name=t.name, number=int(t))
    add(metric, "name", 1, req, fdp.TYPE_STRING)
    add(metric, "type", 2, req, fdp.TYPE_ENUM, ".kuradatatypes.KuraPayload.KuraMetric.ValueType")
    for name, number, ftype in (
        ("double_value", 3, fdp.TYPE_DOUBLE),
        ("float_value", 4, fdp.TYPE_FLOAT),
        ("long_value", 5, fdp.TYPE_INT64),
        ("int_value", 6, fdp.TYPE_INT32),
        ("bool_value", 7, fdp.TYPE_BOOL),
        ("string_value", 8, fdp.TYPE_STRING),
        ("bytes_value", 9, fdp.TYPE_BYTES),
    ):
        add(metric, name, number, opt, ftype)

    position = payload.nested_type.add(name="KuraPosition")
    add(position, "latitude", 1, req, fdp.TYPE_DOUBLE)
    add(position, "longitude", 2, req, fdp.TYPE_DOUBLE)
    for name, number, ftype in (
        ("altitude", 3, fdp.TYPE_DOUBLE),
        ("precision", 4, fdp.TYPE_DOUBLE),
        ("heading", 5, fdp.TYPE_DOUBLE),
        ("speed", 6, fdp.TYPE_DOUBLE),
        ("timestamp", 7, fdp.TYPE_INT64),
        ("satellites", 8, fdp.TYPE_INT32),
        ("status", 9, fdp.TYPE_INT32),
    ):
        add(position, name, number, opt, ftype)

    add(payload, "timestamp", 1, opt, fdp.TYPE_INT64)
    add(payload, "position", 2, opt, fdp.TYPE_MESSAGE, ".kuradatatypes.KuraPayload.KuraPosition")
    payload.extension_range.add(start=3, end=5000)  # end is exclusive: 3 to 4999
    add(payload, "metric", 5000, rep, fdp.TYPE_MESSAGE, ".kuradatatypes.KuraPayload.KuraMetric")
    add(payload, "body", 5001, opt, fdp.TYPE_BYTES)

    # a private pool, so another copy of kuradatatypes in the process cannot clash with ours
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    desc = pool.FindMessageTypeByName("kuradatatypes.KuraPayload")
    return message_factory.GetMessageClass(desc), desc


_KuraPayloadPB, KURA_PAYLOAD_DESCRIPTOR = _build_classes()


# --- encode / decode --------------------------------------------------------------------------------------


def encode_protobuf(message: KuraMessage, *, gzip: bool = True) -> bytes:
    """Serialize; with ``gzip`` the bytes are compressed only when that makes them shorter (as Kura does)."""
    pb = _KuraPayloadPB()
    if message.timestamp_ms is not None:
        pb.timestamp = message.timestamp_ms
    pos = message.position
    if pos is not None:
        pb.position.latitude = float(pos.latitude)
        pb.position.longitude = float(pos.longitude)
        for name in KuraPosition.OPTIONAL:
            v = getattr(pos, name)
            if v is not None:
                setattr(pb.position, name, v if name in ("timestamp", "satellites", "status") else float(v))
    for name, metric in message.metrics.items():
        m = pb.metric.add()
        m.name = name
        m.type = int(metric.type)
        setattr(m, _VALUE_FIELD[metric.type], metric.value)
    if message.body is not None:
        pb.body = message.body
    raw: bytes = pb.SerializeToString()
    if gzip:
        # mtime=0 keeps the output deterministic; level 6 is what java.util.zip uses by default
        compressed = _gzip(raw)
        if len(compressed) < len(raw):
            return compressed
    return raw


def _gzip(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


def check_size(data: bytes, max_bytes: int) -> None:
    if len(data) > max_bytes:
        raise PayloadTooLarge(
            f"payload of {len(data)} bytes is over the limit of {max_bytes} bytes (mqtt.max_payload_bytes)"
        )


def gunzip_bounded(data: bytes, max_bytes: int) -> bytes | None:
    """Gunzip (all members) into at most ``max_bytes``; None when it is not valid gzip (use the raw bytes).

    Raises PayloadTooLarge as soon as the output would pass the limit, before allocating more.
    """
    out = bytearray()
    rest = data
    while True:
        d = zlib.decompressobj(31)
        try:
            out += d.decompress(rest, max_bytes + 1 - len(out))
        except zlib.error:
            return None
        if len(out) > max_bytes:
            raise PayloadTooLarge(f"payload inflates to more than {max_bytes} bytes (mqtt.max_payload_bytes)")
        if not d.eof:
            return None  # truncated stream
        rest = d.unused_data
        if not rest.startswith(GZIP_MAGIC):
            # trailing bytes that are not another member are ignored, as java.util.zip.GZIPInputStream does
            return bytes(out)


def decode_protobuf(data: bytes, *, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> KuraMessage:
    """Parse KuraPayload bytes (gzip detected by magic). Raises PayloadError / PayloadTooLarge only."""
    check_size(data, max_bytes)
    if data.startswith(GZIP_MAGIC):
        inflated = gunzip_bounded(data, max_bytes)
        if inflated is not None:
            data = inflated
    try:
        pb = _KuraPayloadPB()
        pb.ParseFromString(data)
        if not pb.IsInitialized():  # proto2 'required' fields; the Python runtime does not enforce them
            missing = ", ".join(pb.FindInitializationErrors()[:3])
            raise PayloadError(f"payload is not a valid KuraPayload: required field(s) missing: {missing}")
        return _from_pb(pb)
    except PayloadError:
        raise
    except Exception as exc:  # protobuf raises DecodeError, but also RuntimeError/ValueError on odd input
        raise PayloadError(f"payload is not a KuraPayload protobuf: {_first_line(exc)}") from None


def _from_pb(pb: Any) -> KuraMessage:
    metrics: dict[str, MetricValue] = {}
    for m in pb.metric:
        try:
            mtype = MetricType(m.type)
        except ValueError:
            continue  # Kura drops metrics of unknown type
        value = getattr(m, _VALUE_FIELD[mtype])
        metrics.pop(m.name, None)  # a repeated name moves to its last position
        metrics[m.name] = MetricValue(mtype, value)
    position = None
    if pb.HasField("position"):
        p = pb.position
        position = KuraPosition(
            latitude=p.latitude,
            longitude=p.longitude,
            **{n: getattr(p, n) for n in KuraPosition.OPTIONAL if p.HasField(n)},
        )
    return KuraMessage(
        timestamp_ms=pb.timestamp if pb.HasField("timestamp") else None,
        metrics=metrics,
        body=pb.body if pb.HasField("body") else None,
        position=position,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


# --- reading a few STRING metrics without decoding everything ----------------------------------------------


class _Truncated(Exception):
    pass


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    for _ in range(10):
        if pos >= len(buf):
            raise _Truncated
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
    raise _Truncated


def _fields(buf: bytes) -> Iterable[tuple[int, int, int, int]]:
    """Yield (field number, wire type, value or start, end) for each top-level field; stops at damage."""
    pos = 0
    try:
        while pos < len(buf):
            key, pos = _varint(buf, pos)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, pos = _varint(buf, pos)
                yield number, wire, value, pos
            elif wire == 1 or wire == 5:
                pos += 8 if wire == 1 else 4
                yield number, wire, pos, pos
            elif wire == 2:
                length, pos = _varint(buf, pos)
                if pos + length > len(buf):
                    return
                yield number, wire, pos, pos + length
                pos += length
            else:
                return  # groups: not in KuraPayload
    except _Truncated:
        return


def peek_string_metrics(data: bytes, names: Iterable[str], *, max_bytes: int) -> dict[str, str]:
    """Best effort: the STRING metrics ``names`` found in the first ``max_bytes`` of a (possibly gzipped,
    possibly oversized) KuraPayload, without building the message. Used to answer "too large" to a request
    whose payload we refuse to decode. Never raises."""
    wanted = set(names)
    found: dict[str, str] = {}
    try:
        buf = data[:max_bytes]
        if data.startswith(GZIP_MAGIC):
            d = zlib.decompressobj(31)
            buf = d.decompress(data[: max_bytes * 4], max_bytes)  # metrics precede the body on the wire
        for number, wire, start, end in _fields(buf):
            if number != 5000 or wire != 2:
                continue
            name = mtype = value = None
            for n, w, s, e in _fields(buf[start:end]):
                sub = buf[start:end]
                if n == 1 and w == 2:
                    name = sub[s:e].decode("utf-8")
                elif n == 2 and w == 0:
                    mtype = s
                elif n == 8 and w == 2:
                    value = sub[s:e].decode("utf-8")
            if name in wanted and mtype == MetricType.STRING and value is not None:
                found[name] = value
    except Exception:  # damaged input simply yields fewer metrics
        pass
    return found
