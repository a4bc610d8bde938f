"""KuraPayload: Kura's message model and its protobuf wire form (proto2, package ``kuradatatypes``).

The wire codec is written out for this one fixed schema (``kurapayload.proto``); why: docs/adr/0001. Gzip
follows Kura: receivers detect it by the
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


# --- the proto2 wire format of KuraPayload -----------------------------------------------------------------

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_U64 = 1 << 64

#: KuraMetric value field numbers and wire types, by metric type
_VALUE_WIRE = {
    MetricType.DOUBLE: (3, _FIXED64),
    MetricType.FLOAT: (4, _FIXED32),
    MetricType.INT64: (5, _VARINT),
    MetricType.INT32: (6, _VARINT),
    MetricType.BOOL: (7, _VARINT),
    MetricType.STRING: (8, _LENGTH),
    MetricType.BYTES: (9, _LENGTH),
}
_TYPE_BY_FIELD = {number: t for t, (number, _) in _VALUE_WIRE.items()}
#: KuraPosition fields 3-9 (1 and 2 are latitude and longitude)
_POSITION_FIELDS = {
    3: "altitude",
    4: "precision",
    5: "heading",
    6: "speed",
    7: "timestamp",
    8: "satellites",
    9: "status",
}
_POSITION_INTS = {"timestamp", "satellites", "status"}


def _put_varint(out: bytearray, value: int) -> None:
    value &= _U64 - 1  # negative int32/int64 go out as 64-bit two's complement (10 bytes), as protobuf does
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _put_key(out: bytearray, number: int, wire: int) -> None:
    _put_varint(out, (number << 3) | wire)


def _put_bytes(out: bytearray, number: int, data: bytes) -> None:
    _put_key(out, number, _LENGTH)
    _put_varint(out, len(data))
    out += data


def _put_double(out: bytearray, number: int, value: float) -> None:
    _put_key(out, number, _FIXED64)
    out += struct.pack("<d", value)


def _metric_bytes(name: str, metric: MetricValue) -> bytes:
    out = bytearray()
    _put_bytes(out, 1, name.encode("utf-8"))
    _put_key(out, 2, _VARINT)
    _put_varint(out, int(metric.type))
    number, wire = _VALUE_WIRE[metric.type]
    v = metric.value
    if wire == _FIXED64:
        _put_double(out, number, float(v))
    elif wire == _FIXED32:
        _put_key(out, number, _FIXED32)
        out += struct.pack("<f", v)
    elif wire == _VARINT:
        _put_key(out, number, _VARINT)
        _put_varint(out, int(v))
    else:
        _put_bytes(out, number, v.encode("utf-8") if isinstance(v, str) else bytes(v))  # type: ignore[arg-type]
    return bytes(out)


def _position_bytes(pos: KuraPosition) -> bytes:
    out = bytearray()
    _put_double(out, 1, float(pos.latitude))
    _put_double(out, 2, float(pos.longitude))
    for number, name in _POSITION_FIELDS.items():
        v = getattr(pos, name)
        if v is None:
            continue
        if name in _POSITION_INTS:
            _put_key(out, number, _VARINT)
            _put_varint(out, v)
        else:
            _put_double(out, number, float(v))
    return bytes(out)


def encode_protobuf(message: KuraMessage, *, gzip: bool = True) -> bytes:
    """Serialize; with ``gzip`` the bytes are compressed only when that makes them shorter (as Kura does)."""
    out = bytearray()  # fields in number order, as protobuf serializers write them
    if message.timestamp_ms is not None:
        _put_key(out, 1, _VARINT)
        _put_varint(out, message.timestamp_ms)
    if message.position is not None:
        _put_bytes(out, 2, _position_bytes(message.position))
    for name, metric in message.metrics.items():
        _put_bytes(out, 5000, _metric_bytes(name, metric))
    if message.body is not None:
        _put_bytes(out, 5001, message.body)
    raw = bytes(out)
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
        return _parse_payload(data)
    except PayloadError:
        raise
    except (_Truncated, UnicodeDecodeError, struct.error, ValueError) as exc:
        raise PayloadError(f"payload is not a KuraPayload protobuf: {_first_line(exc)}") from None


def _signed(value: int, bits: int) -> int:
    """A varint read as a two's complement integer of ``bits`` (int32 keeps the low 32 bits, as protobuf)."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _strict_fields(buf: bytes) -> Iterable[tuple[int, int, Any]]:
    """(field number, wire type, value) for each field: ints for varints, bytes for the others."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise PayloadError("payload is not a KuraPayload protobuf: field number 0")
        value: Any
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire in (_FIXED64, _FIXED32):
            size = 8 if wire == _FIXED64 else 4
            if pos + size > end:
                raise _Truncated("truncated fixed-size field")
            value, pos = buf[pos : pos + size], pos + size
        elif wire == _LENGTH:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise _Truncated("truncated length-delimited field")
            value, pos = buf[pos : pos + length], pos + length
        else:  # groups (3, 4) are not part of KuraPayload, and 6, 7 do not exist
            raise PayloadError(f"payload is not a KuraPayload protobuf: unsupported wire type {wire}")
        yield number, wire, value


def _parse_payload(buf: bytes) -> KuraMessage:
    timestamp: int | None = None
    position: dict[str, Any] | None = None
    metrics: dict[str, MetricValue] = {}
    body: bytes | None = None
    # a field with an unexpected wire type is an unknown field to protobuf: skipped the same way here
    for number, wire, value in _strict_fields(buf):
        if number == 1 and wire == _VARINT:
            timestamp = _signed(value, 64)
        elif number == 2 and wire == _LENGTH:
            position = {**(position or {}), **_parse_position(value)}  # repeated sub-messages merge
        elif number == 5000 and wire == _LENGTH:
            parsed = _parse_metric(value)
            if parsed is not None:
                metrics.pop(parsed[0], None)  # a repeated name moves to its last position
                metrics[parsed[0]] = parsed[1]
        elif number == 5001 and wire == _LENGTH:
            body = bytes(value)
    pos = None
    if position is not None:
        missing = [n for n in ("latitude", "longitude") if n not in position]
        if missing:
            raise PayloadError(
                f"payload is not a valid KuraPayload: required field(s) missing: position.{missing[0]}"
            )
        pos = KuraPosition(**position)
    return KuraMessage(timestamp_ms=timestamp, metrics=metrics, body=body, position=pos)


def _parse_metric(buf: bytes) -> tuple[str, MetricValue] | None:
    name: str | None = None
    type_number: int | None = None
    values: dict[int, tuple[int, Any]] = {}
    for number, wire, value in _strict_fields(buf):
        if number == 1 and wire == _LENGTH:
            name = value.decode("utf-8")
        elif number == 2 and wire == _VARINT:
            type_number = _signed(value, 32)
        elif number in _TYPE_BY_FIELD:
            values[number] = (wire, value)
    if name is None or type_number is None:
        field = "name" if name is None else "type"
        raise PayloadError(f"payload is not a valid KuraPayload: required field(s) missing: metric.{field}")
    try:
        mtype = MetricType(type_number)
    except ValueError:
        return None  # Kura drops metrics of unknown type
    number, wire = _VALUE_WIRE[mtype]
    got = values.get(number)
    if got is None or got[0] != wire:
        raw: Any = None  # the value field is unset: protobuf reads its default
    else:
        raw = got[1]
    return name, MetricValue(mtype, _metric_value(mtype, raw))


def _metric_value(mtype: MetricType, raw: Any) -> Scalar:
    if mtype is MetricType.DOUBLE:
        return float(struct.unpack("<d", raw)[0]) if raw is not None else 0.0
    if mtype is MetricType.FLOAT:
        return float(struct.unpack("<f", raw)[0]) if raw is not None else 0.0
    if mtype is MetricType.INT64:
        return _signed(raw, 64) if raw is not None else 0
    if mtype is MetricType.INT32:
        return _signed(raw, 32) if raw is not None else 0
    if mtype is MetricType.BOOL:
        return bool(raw) if raw is not None else False
    if mtype is MetricType.STRING:
        return raw.decode("utf-8") if raw is not None else ""
    return bytes(raw) if raw is not None else b""


def _parse_position(buf: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for number, wire, value in _strict_fields(buf):
        name = {1: "latitude", 2: "longitude"}.get(number) or _POSITION_FIELDS.get(number)
        if name is None:
            continue
        if name in _POSITION_INTS:
            if wire == _VARINT:
                out[name] = _signed(value, 64 if name == "timestamp" else 32)
        elif wire == _FIXED64:
            out[name] = float(struct.unpack("<d", value)[0])
    return out


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
            raise _Truncated("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
    raise _Truncated("varint longer than 10 bytes")


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
