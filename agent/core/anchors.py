"""Trust anchors: a public key or a root CA that vouches for the images in its scope."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from agent.core.imageref import ImageRef, scope_matches, scope_problem
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
    #: a CA anchor without identities accepts any certificate under its root only when this says so
    any_identity: bool = False

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
        if self.any_identity:  # only when set: anchors stored before it existed keep their fingerprint
            out["any_identity"] = True
        return out

    @property
    def issuer_only_identities(self) -> tuple[Identity, ...]:
        """Identities that name an issuer but no subject: anyone that issuer certifies matches them."""
        return tuple(i for i in self.identities if i.subject is None and i.subject_regexp is None)

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
        if d["kind"] == "key" and d.get("any_identity"):
            raise PolicyError(f"{where}: any_identity only applies to kind 'ca'")
        if d["kind"] == "ca" and not d.get("identities") and not d.get("any_identity"):
            raise PolicyError(
                f"{where}: a CA anchor needs at least one identity (subject and issuer the certificates "
                "must carry); to accept every certificate its root issues, say any_identity = true"
            )
        if d["kind"] == "ca" and d.get("identities") and d.get("any_identity"):
            raise PolicyError(f"{where}: any_identity and identities contradict each other; keep one")
        if "scope" in d and not d["scope"]:
            raise PolicyError(
                f"{where}: an empty scope covers no image; list the images it vouches for "
                "(e.g. registry.example/acme/**), or '**' for every image"
            )
        for pattern in d.get("scope") or ():
            if (problem := scope_problem(pattern)) is not None:
                raise PolicyError(f"{where}: scope {problem}")
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
            any_identity=bool(d.get("any_identity", False)),
        )
