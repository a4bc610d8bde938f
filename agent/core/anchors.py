"""Trust anchors: a public key or a root CA that vouches for the images in its scope."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from agent.core.imageref import ImageRef, scope_matches
from agent.errors import PolicyError


@dataclass(frozen=True, slots=True)
class Identity:
    subject: str | None = None
    subject_regexp: str | None = None
    issuer: str | None = None
    issuer_regexp: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            k: v for k in ("subject", "subject_regexp", "issuer", "issuer_regexp") if (v := getattr(self, k))
        }


@dataclass(frozen=True, slots=True)
class TrustAnchor:
    """Something that can vouch for images in its scope: a public key or a root CA."""

    name: str
    kind: Literal["key", "ca"]
    pem: str
    scheme: str = "cosign"
    scope: tuple[str, ...] = ("*",)
    intermediates: str | None = None
    identities: tuple[Identity, ...] = ()
    rekor_public_key: str | None = None
    require_tlog: bool = False
    strict_identity: bool = False

    def covers(self, ref: ImageRef) -> bool:
        return any(scope_matches(p, ref) for p in self.scope)

    @property
    def fingerprint(self) -> str:
        """Changes whenever anything that affects verification changes: digests it verified are revoked."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "scheme": self.scheme, "kind": self.kind, "pem": self.pem}
        out["scope"] = list(self.scope)
        if self.intermediates:
            out["intermediates"] = self.intermediates
        if self.identities:
            out["identities"] = [i.to_dict() for i in self.identities]
        if self.rekor_public_key:
            out["rekor_public_key"] = self.rekor_public_key
        out["require_tlog"] = self.require_tlog
        out["strict_identity"] = self.strict_identity
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> TrustAnchor:
        for ident in d.get("identities", ()):
            for key in ("subject_regexp", "issuer_regexp"):
                if key in ident:
                    try:
                        re.compile(ident[key])
                    except re.error as exc:
                        raise PolicyError(
                            f"{where}: {key} is not a valid regular expression: {exc}"
                        ) from None
        if d["kind"] == "key" and d.get("intermediates"):
            raise PolicyError(f"{where}: intermediates only apply to kind 'ca'")
        if d["kind"] == "key" and d.get("identities"):
            # a key vouches for whoever holds it; certificate identities would silently constrain nothing
            raise PolicyError(f"{where}: identities only apply to kind 'ca'")
        return cls(
            name=d["name"],
            kind=d["kind"],
            pem=d["pem"],
            scheme=d.get("scheme", "cosign"),
            scope=tuple(d.get("scope") or ("*",)),
            intermediates=d.get("intermediates"),
            identities=tuple(Identity(**i) for i in d.get("identities", ())),
            rekor_public_key=d.get("rekor_public_key"),
            require_tlog=bool(d.get("require_tlog", False)),
            strict_identity=bool(d.get("strict_identity", False)),
        )
