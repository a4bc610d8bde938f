"""How policy changes arriving over MQTT must look on this device (light: no crypto unless a key is set).

The signature check itself lives in :mod:`agent.verify.policy_signature`, imported only when a policy-signing key is
provisioned, so devices without one do not load the crypto stack (bench/control.py: about 8 MB of RSS).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.config import Config
from agent.core.envelope import ENVELOPE_SCHEMA, is_envelope, target_for_layer
from agent.core.policy import DEVICE_LAYER, PolicyLayer
from agent.core.schemas import validate
from agent.errors import Code, InputError, PolicyError, PolicySignatureError

if TYPE_CHECKING:
    from agent.verify.policy_signature import PolicyVerifier


@dataclass(frozen=True)
class PolicyGate:
    """What a policy change arriving over MQTT must look like on this device.

    With a verifier, only whole, signed, correctly targeted documents pass. Without one, every policy change
    is refused, unless the configuration says ``allow_unsigned_policy = true``: then bare documents and
    envelopes are both accepted (an envelope is unwrapped unverified: no key is provisioned, so it is as
    trusted as a bare document), and a ``target``, when named, must be ours.
    """

    device_id: str
    verifier: PolicyVerifier | None = None
    allow_unsigned: bool = False

    @classmethod
    def from_config(cls, config: Config) -> PolicyGate:
        path = config.mqtt.policy_signing_key if config.mqtt else None
        if path is None:
            unsigned = config.mqtt is not None and config.mqtt.allow_unsigned_policy
            return cls(config.device.id, None, allow_unsigned=unsigned)
        from agent.verify.policy_signature import PolicyVerifier

        return cls(config.device.id, PolicyVerifier.from_file(path))

    @property
    def signing_required(self) -> bool:
        return not self.allow_unsigned

    def _refuse_unsigned(self, what: str) -> None:
        if self.verifier is None and not self.allow_unsigned:
            raise PolicySignatureError(
                f"{what}: this device takes policy over MQTT only signed, and no policy-signing key is "
                "provisioned (set [mqtt] policy_signing_key, or allow_unsigned_policy = true to accept "
                "unsigned changes from anyone who can publish on its topics)",
                code=Code.SIGNED_DOCUMENT_REQUIRED,
            )

    def require_whole_document(self, what: str) -> None:
        """Refuse a piecemeal change (allowlist entry, anchor, enforcement) while signing is on."""
        self._refuse_unsigned(what)
        if self.verifier is not None:
            raise PolicySignatureError(
                f"{what}: a signed whole layer document is required (this device accepts policy changes only "
                "as a signed document: PUT policy with a signed envelope)",
                code=Code.SIGNED_DOCUMENT_REQUIRED,
            )

    def open(self, body: Any, layer: str = DEVICE_LAYER) -> dict[str, Any]:
        """The layer document carried by ``body`` after the signature and target checks."""
        what = f"policy for layer {layer!r}"
        self._refuse_unsigned(what)
        if self.verifier is not None:
            document = self.verifier.verify(body, what)
        elif is_envelope(body):
            validate(body, ENVELOPE_SCHEMA, what)
            document = dict(body["document"])
        elif isinstance(body, Mapping):
            document = dict(body)
        else:
            raise InputError(f"{what}: expected a JSON object")
        self._check_target(document, layer, what)
        return document

    def accept(self, body: Any, layer: str = DEVICE_LAYER) -> PolicyLayer:
        """:meth:`open`, then parse the document as ``layer``. Version checks are the policy service's."""
        return PolicyLayer.from_document(self.open(body, layer), layer, what=f"policy for layer {layer!r}")

    def _check_target(self, document: Mapping[str, Any], layer: str, what: str) -> None:
        expected = target_for_layer(layer, self.device_id)
        target = document.get("target")
        if target is None:
            if self.verifier is not None:
                raise PolicySignatureError(
                    f"{what}: the signed document names no target; it must name {expected}",
                    code=Code.POLICY_WRONG_TARGET,
                )
            return
        if target != expected:
            message = f"{what}: at /target: the document is for {target}, not for {expected}"
            if self.verifier is None:  # a misdirected document, not a signature matter: 400
                raise PolicyError(message, code=Code.WRONG_TARGET)
            raise PolicySignatureError(message, code=Code.POLICY_WRONG_TARGET)  # a replay: 403
