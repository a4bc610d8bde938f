"""Choosing between the two payload encodings: KuraPayload protobuf (default) and its JSON form.

Inbound payloads are accepted in either encoding (JSON is recognised by a leading ``{``, which a KuraPayload
never starts with); outbound payloads use ``mqtt.encoding``, except that replies answer in the request's own
encoding, so whoever asked can read the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.adapters.mqtt.kurajson import decode_json, encode_json
from agent.adapters.mqtt.kurapayload import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    KuraMessage,
    decode_protobuf,
    encode_protobuf,
)
from agent.config import MqttConfig

Encoding = Literal["kura-protobuf", "json"]

#: the birth certificate's ``payload_encoding`` value for each encoding (Kura's enum names)
BIRTH_ENCODING_NAME: dict[Encoding, str] = {"kura-protobuf": "KURA_PROTOBUF", "json": "SIMPLE_JSON"}

_JSON_LEAD = b" \t\r\n"


def detect_encoding(data: bytes) -> Encoding:
    return "json" if data.lstrip(_JSON_LEAD)[:1] == b"{" else "kura-protobuf"


@dataclass(frozen=True)
class PayloadCodec:
    encoding: Encoding = "kura-protobuf"
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    #: gzip protobuf output when shorter (Kura's ``encode.gzip``, default on)
    gzip: bool = True

    @classmethod
    def from_config(cls, config: MqttConfig) -> PayloadCodec:
        return cls(encoding=config.encoding, max_payload_bytes=config.max_payload_bytes)

    def encode(self, message: KuraMessage, encoding: Encoding | None = None) -> bytes:
        if (encoding or self.encoding) == "json":
            return encode_json(message)
        return encode_protobuf(message, gzip=self.gzip)

    def decode(self, data: bytes) -> KuraMessage:
        """Raises PayloadError / PayloadTooLarge only."""
        return self.decode_detect(data)[0]

    def decode_detect(self, data: bytes) -> tuple[KuraMessage, Encoding]:
        encoding = detect_encoding(data)
        if encoding == "json":
            return decode_json(data, max_bytes=self.max_payload_bytes), encoding
        return decode_protobuf(data, max_bytes=self.max_payload_bytes), encoding

    @property
    def birth_name(self) -> str:
        return BIRTH_ENCODING_NAME[self.encoding]
