"""Content digests: the only identity of an image that enforcement trusts."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from agent.errors import DigestError

_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, order=True, slots=True)
class Digest:
    """A ``sha256:<64 lowercase hex>`` digest. Cannot exist in any other form."""

    value: str

    def __post_init__(self) -> None:
        if not isinstance(self.value, str):
            raise DigestError(
                f"invalid digest {_shown(self.value)}: expected a string like 'sha256:<64 hex>'"
            )
        algo, _, hexpart = self.value.partition(":")
        if algo != "sha256" or not _HEX64.fullmatch(hexpart):
            raise DigestError(
                f"invalid digest {_shown(self.value)}: "
                "expected 'sha256:' followed by 64 lowercase hex characters"
            )

    @classmethod
    def parse(cls, text: object) -> Digest:
        """Parse user or peer input, normalising case and surrounding/inner whitespace."""
        if not isinstance(text, str):
            raise DigestError(f"invalid digest {_shown(text)}: expected a string like 'sha256:<64 hex>'")
        cleaned = "".join(text.split()).lower()
        if not cleaned:
            raise DigestError("invalid digest '': expected 'sha256:' followed by 64 hex characters")
        return cls(cleaned)

    @classmethod
    def of(cls, data: bytes) -> Digest:
        return cls("sha256:" + hashlib.sha256(data).hexdigest())

    @property
    def hex(self) -> str:
        return self.value.partition(":")[2]

    @property
    def short(self) -> str:
        return self.value[7:19]

    def matches(self, data: bytes) -> bool:
        return hashlib.sha256(data).hexdigest() == self.hex

    def __str__(self) -> str:
        return self.value


def _shown(value: object) -> str:
    # peer input can be huge: an error message quotes only its start
    text = repr(value)
    return text if len(text) <= 90 else text[:80] + "...(" + str(len(text)) + " characters)"
