"""Signed policy envelopes, the light half: their shape and the target a layer must name (no crypto)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.core.policy import DEVICE_LAYER
from agent.errors import InputError

ENVELOPE_SCHEMA = "signed-policy"


def target_for_layer(layer: str, device_id: str) -> dict[str, str]:
    """The ``target`` a document for ``layer`` must name: ``{"device": id}`` or ``{"group": name}``."""
    if layer == DEVICE_LAYER:
        return {"device": device_id}
    if layer.startswith("group:") and len(layer) > len("group:"):
        return {"group": layer[len("group:") :]}
    raise InputError(f"unknown policy layer {layer!r}: expected 'device' or 'group:NAME'")


def is_envelope(body: Any) -> bool:
    """True if ``body`` is shaped as a signed envelope (rather than a bare layer document)."""
    return isinstance(body, Mapping) and "document" in body and "signature" in body


def claimed_version(body: Any) -> int | None:
    """The version a body claims (bare or enveloped), for rejection reports; None if unreadable."""
    doc = body.get("document") if is_envelope(body) else body
    version = doc.get("version") if isinstance(doc, Mapping) else None
    return version if isinstance(version, int) and not isinstance(version, bool) else None
