"""``imageguard sign``: a legacy ``.sig`` layer byte-compatible with what ``cosign sign --key`` uploads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.core.digest import Digest
from agent.errors import InputError
from agent.verify.cosign.artifacts import ANN_SIGNATURE, SIMPLE_SIGNING_MEDIA_TYPE, LegacySignature
from agent.verify.cosign.encoding import b64encode
from agent.verify.cosign.keys import PrivateKey, sign
from agent.verify.cosign.payload import build_payload


def sign_image(
    digest: Digest,
    docker_reference: str,
    private_key: PrivateKey,
    *,
    optional: Mapping[str, Any] | None = None,
) -> LegacySignature:
    """Sign ``digest`` as cosign does; ``docker_reference`` is the repository (see ``docker_reference_for``).

    The caller uploads ``payload`` as a layer blob of mediaType ``media_type`` with ``annotations``.
    """
    if not docker_reference or any(c.isspace() for c in docker_reference):
        raise InputError(f"invalid docker reference {docker_reference!r}: expected registry/repository")
    payload = build_payload(docker_reference, digest, optional)
    signature = sign(payload, private_key)
    return LegacySignature(
        media_type=SIMPLE_SIGNING_MEDIA_TYPE,
        payload=payload,
        annotations={ANN_SIGNATURE: b64encode(signature)},
        origin=f"signed locally for {docker_reference}@{digest}",
    )
