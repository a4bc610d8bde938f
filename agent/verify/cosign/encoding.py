"""Byte-level decoding shared by the cosign modules: Go-compatible base64, PEM blocks and small DER values."""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]{1,64})-----\r?\n(.*?)-----END ([A-Z0-9 ]{1,64})-----",
    re.DOTALL,
)
_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


class DecodeError(ValueError):
    """Input bytes are not in the expected encoding; callers turn this into their own error."""


def b64decode_strict(text: str) -> bytes:
    """Standard base64 the way Go's ``encoding/base64`` reads it: CR/LF skipped, strict about padding."""
    if not isinstance(text, str):
        raise DecodeError(f"expected a base64 string, found {type(text).__name__}")
    cleaned = text.replace("\r", "").replace("\n", "")
    # Python tolerates stray padding ("YWJj="); Go does not: demand whole quanta, '=' only at the end
    if len(cleaned) % 4 or not _B64.fullmatch(cleaned):
        raise DecodeError("invalid base64: expected standard base64 with correct padding")
    try:
        return base64.b64decode(cleaned.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise DecodeError(f"invalid base64: {exc}") from None


def parse_json(data: str | bytes) -> Any:
    """``json.loads`` that fails only with DecodeError (also for absurd nesting and bad UTF-8)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise DecodeError(f"not valid JSON: {exc}") from None


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class PemBlock:
    type: str
    body: bytes


def pem_blocks(data: str | bytes) -> list[PemBlock]:
    """Every PEM block in ``data``, in order. PEM headers are rejected (cosign writes none)."""
    raw = data.encode("utf-8", "replace") if isinstance(data, str) else data
    blocks = []
    for m in _PEM_BLOCK.finditer(raw):
        begin, body, end = m.group(1).decode(), m.group(2), m.group(3).decode()
        if begin != end:
            raise DecodeError(f"PEM block 'BEGIN {begin}' ends with 'END {end}'")
        if b":" in body:
            raise DecodeError(f"PEM block {begin!r} has headers, which are not supported")
        text = b"".join(body.split())
        try:
            blocks.append(PemBlock(begin, base64.b64decode(text, validate=True)))
        except binascii.Error as exc:
            raise DecodeError(f"PEM block {begin!r} is not valid base64: {exc}") from None
    return blocks


def pem_encode(block_type: str, der: bytes) -> bytes:
    """PEM as Go's ``pem.Encode`` writes it: 64-column lines, final newline."""
    b64 = base64.b64encode(der).decode("ascii")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return (
        f"-----BEGIN {block_type}-----\n"
        + "".join(f"{line}\n" for line in lines)
        + f"-----END {block_type}-----\n"
    ).encode()


def der_utf8string(der: bytes) -> str:
    """Decode one DER UTF8String (tag 0x0C) that spans all of ``der``."""
    if len(der) < 2 or der[0] != 0x0C:
        raise DecodeError("not a DER UTF8String")
    length, offset = der[1], 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or len(der) < 2 + n:
            raise DecodeError("bad DER length")
        length, offset = int.from_bytes(der[2 : 2 + n], "big"), 2 + n
    if offset + length != len(der):
        raise DecodeError("DER UTF8String length does not match its content")
    try:
        return der[offset:].decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("DER UTF8String is not valid UTF-8") from None
