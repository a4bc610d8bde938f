"""One error hierarchy for the whole agent.

Every error carries a stable ``code`` (what telemetry carries and the console counts) and a message for a
person that says what to do. Errors never read configuration themselves: callers pass what they know.
"""

from __future__ import annotations


class ImageGuardError(Exception):
    """Base of every error the agent raises on purpose."""

    code = "error"
    #: process exit code when this error ends a CLI command
    exit_code = 2

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class InputError(ImageGuardError):
    """Something a user or peer gave us is malformed. Nothing was changed."""

    code = "invalid-input"


class SchemaError(InputError):
    """A document failed its JSON Schema; ``pointer`` is the JSON pointer of the first error."""

    code = "schema-violation"

    def __init__(self, what: str, pointer: str, detail: str) -> None:
        where = pointer or "/"
        super().__init__(f"{what}: at {where}: {detail}")
        self.what = what
        self.pointer = pointer
        self.detail = detail


class ConfigError(InputError):
    code = "invalid-config"


class PolicyError(InputError):
    code = "invalid-policy"


class NotFound(PolicyError):
    """The policy holds no such entry (allowlist digest, trust anchor, instance): nothing was changed."""

    code = "not-found"
    exit_code = 1


class DigestError(InputError):
    code = "invalid-digest"


class ImageRefError(InputError):
    code = "invalid-image-reference"


class RollbackError(PolicyError):
    """A versioned document is older than the one held (an equal version is 'nothing new', not this)."""

    code = "policy-rollback"


class StateError(ImageGuardError):
    """The durable state cannot be used as it is (corrupt, newer schema, locked by another agent)."""

    code = "state-error"


class EngineError(ImageGuardError):
    """The container engine did not answer or refused an action."""

    code = "engine-unavailable"


class KeyMaterialError(InputError):
    """A key, certificate or PEM block cannot be used."""

    code = "invalid-key"


class RegistryError(ImageGuardError):
    """The registry answered, but not with something we can use."""

    code = "registry-error"


class RegistryUnreachable(RegistryError):
    """No answer from the registry (network down, DNS, TLS handshake, timeout)."""

    code = "registry-unreachable"


class VerificationError(ImageGuardError):
    """A signature check failed. ``reasons`` lists every reason, one per signature tried."""

    code = "signature-invalid"
    exit_code = 1

    def __init__(self, message: str, *, code: str | None = None, reasons: list[str] | None = None) -> None:
        super().__init__(message, code=code)
        self.reasons = list(reasons or [message])


class ControlError(ImageGuardError):
    """A control request cannot be served; ``status`` is the Kura response code to answer with."""

    code = "control-error"

    def __init__(self, status: int, message: str, *, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status


class PayloadError(InputError):
    """An MQTT payload cannot be decoded as a KuraPayload (protobuf or its JSON form)."""

    code = "invalid-payload"


class PayloadTooLarge(PayloadError):
    """An MQTT payload is over ``mqtt.max_payload_bytes`` (before or after gunzip)."""

    code = "payload-too-large"


class BrokerError(ImageGuardError):
    """The MQTT broker connection cannot do what was asked (not started, stopped, refused)."""

    code = "broker-error"


class PublishWindowFull(BrokerError):
    """Too many publishes await the broker's acknowledgement; retry after some complete."""

    code = "publish-window-full"


class UnsupportedSchemeError(PolicyError):
    """A trust anchor names a signature scheme that no validator implements."""

    code = "unsupported-scheme"


class PolicySignatureError(ControlError):
    """A policy change over MQTT is unsigned, mis-signed or signed for another target (answered with 403).

    Codes: ``policy-unsigned``, ``policy-signature-invalid``, ``policy-unknown-key``, ``policy-wrong-target``,
    ``signed-document-required`` (a piecemeal change while signing is on).
    """

    code = "policy-signature-invalid"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(403, message, code=code)


class ReplyTimeout(BrokerError):
    """No reply to a console request within the timeout (the device may be offline or not subscribed)."""

    code = "reply-timeout"
    exit_code = 1
