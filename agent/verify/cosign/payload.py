"""cosign's simple-signing payload: build it byte-for-byte, parse it and check its claims.

Verification always works on the stored bytes; nothing here re-serialises a received payload.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.core.digest import Digest
from agent.core.imageref import DEFAULT_REGISTRY, ImageRef
from agent.errors import Code, ImageRefError, VerificationError
from agent.verify.cosign.encoding import DecodeError, parse_json

SIMPLE_SIGNING_TYPE = "cosign container image signature"
#: Go's encoding/json escapes these even inside strings (HTML safety), json.dumps does not
_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _go_string(value: str) -> str:
    out = json.dumps(value, ensure_ascii=False)
    for char, escaped in _GO_ESCAPES.items():
        out = out.replace(char, escaped)
    return out


def _go_value(value: Any) -> str:
    """JSON the way Go's json.Marshal writes map[string]interface{} values: sorted keys, no spaces."""
    if isinstance(value, str):
        return _go_string(value)
    if isinstance(value, Mapping):
        items = sorted(value.items(), key=lambda kv: kv[0].encode("utf-8"))
        return "{" + ",".join(f"{_go_string(k)}:{_go_value(v)}" for k, v in items) + "}"
    if value is None or isinstance(value, bool | int):
        return json.dumps(value)
    raise TypeError(
        f"optional values must be strings, booleans, integers or objects, not {type(value).__name__}"
    )


def build_payload(docker_reference: str, digest: Digest, optional: Mapping[str, Any] | None = None) -> bytes:
    """The exact bytes ``cosign sign`` signs (sigstore ``payload.Cosign`` marshalled by Go)."""
    critical = (
        '{"identity":{"docker-reference":' + _go_string(docker_reference) + "},"
        '"image":{"docker-manifest-digest":' + _go_string(str(digest)) + "},"
        '"type":' + _go_string(SIMPLE_SIGNING_TYPE) + "}"
    )
    opt = "null" if optional is None else _go_value(optional)
    return ('{"critical":' + critical + ',"optional":' + opt + "}").encode("utf-8")


def docker_reference_for(ref: ImageRef) -> str:
    """The repository cosign writes into ``docker-reference``: go-containerregistry's canonical name."""
    registry = "index.docker.io" if ref.registry == DEFAULT_REGISTRY else ref.registry
    return f"{registry}/{ref.repository}"


@dataclass(frozen=True)
class Claims:
    docker_reference: str | None
    digest: str
    optional: Any


def check_claims(
    payload: bytes, expected: Digest, *, repository: str | None = None, strict_identity: bool = False
) -> Claims:
    """Check a payload as cosign's SimpleClaimVerifier does; raises VerificationError.

    With ``strict_identity`` the docker-reference must name ``repository`` (tag and digest ignored), as
    containers/image's matchRepository does; cosign itself ignores docker-reference.
    """
    try:
        doc = parse_json(payload)
    except DecodeError as exc:
        raise VerificationError(f"payload is not JSON ({exc})", code=Code.PAYLOAD_INVALID) from None
    critical = doc.get("critical") if isinstance(doc, dict) else None
    image = critical.get("image") if isinstance(critical, dict) else None
    found = image.get("docker-manifest-digest") if isinstance(image, dict) else None
    if found is None:
        raise VerificationError(
            f"payload has no critical.image.docker-manifest-digest; expected {expected}",
            code=Code.PAYLOAD_INVALID,
        )
    if found != str(expected):
        raise VerificationError(
            f"payload signs digest {str(found)[:80]!r}, expected {expected}", code=Code.DIGEST_MISMATCH
        )
    identity = critical.get("identity") if isinstance(critical, dict) else None
    ref = identity.get("docker-reference") if isinstance(identity, dict) else None
    ref = ref if isinstance(ref, str) else None
    if strict_identity:
        check_repository(ref, repository)
    return Claims(docker_reference=ref, digest=found, optional=doc.get("optional"))


def check_repository(signed: str | None, repository: str | None) -> None:
    """Does the signed reference name ``repository`` (``registry/repository``)? Raises VerificationError."""
    if repository is None:
        raise VerificationError(
            "the trust anchor requires a matching docker-reference, but the image's repository is unknown",
            code=Code.IDENTITY_MISMATCH,
        )
    if signed is None:
        raise VerificationError(
            f"the trust anchor requires the signature to name repository {repository}, but it names none",
            code=Code.IDENTITY_MISMATCH,
        )
    try:
        signed_name = ImageRef.parse(signed).name
        wanted = ImageRef.parse(repository).name
    except ImageRefError as exc:
        raise VerificationError(f"cannot compare repositories: {exc}", code=Code.IDENTITY_MISMATCH) from None
    if signed_name != wanted:
        raise VerificationError(
            f"signature names repository {signed_name}, expected {wanted}", code=Code.IDENTITY_MISMATCH
        )
