"""One error hierarchy for the whole agent.

Every error carries a stable ``code`` (what telemetry carries and the console counts) and a message for a
person that says what to do. Errors never read configuration themselves: callers pass what they know.
"""

from __future__ import annotations

from enum import StrEnum


class Code(StrEnum):
    """Every stable code the agent emits: decision reasons, instance failures, error codes.

    Telemetry carries them and the console counts them, so a value never changes once released.
    """

    ALLOWLISTED = "allowlisted"
    ANCHOR_INVALID = "anchor-invalid"
    ANCHOR_MISSING = "anchor-missing"
    ANCHOR_SCOPE = "anchor-scope"
    BROKER_ERROR = "broker-error"
    BUNDLE_INVALID = "bundle-invalid"
    CERTIFICATE_CA_INVALID = "certificate-ca-invalid"
    CERTIFICATE_PATH_LENGTH = "certificate-path-length"
    CERTIFICATE_EKU = "certificate-eku"
    CERTIFICATE_EXPIRED = "certificate-expired"
    CERTIFICATE_UNTRUSTED = "certificate-untrusted"
    CONTROL_ERROR = "control-error"
    CREDENTIALS_MISSING = "credentials-missing"
    DIGEST_MISMATCH = "digest-mismatch"
    DISABLED = "disabled"
    ENFORCEMENT_DISABLED = "enforcement-disabled"
    ENGINE_ERROR = "engine-error"
    ENGINE_UNAVAILABLE = "engine-unavailable"
    ERROR = "error"
    IDENTITY_MISMATCH = "identity-mismatch"
    IMAGE_UNAVAILABLE_OFFLINE = "image-unavailable-offline"
    INSTANCE_DIGEST = "instance-digest"
    INVALID_CONFIG = "invalid-config"
    INVALID_DIGEST = "invalid-digest"
    INVALID_IMAGE_REFERENCE = "invalid-image-reference"
    INVALID_INPUT = "invalid-input"
    INVALID_KEY = "invalid-key"
    INVALID_PAYLOAD = "invalid-payload"
    INVALID_POLICY = "invalid-policy"
    MALFORMED_SIGNATURE = "malformed-signature"
    NO_ANCHOR = "no-anchor"
    NO_DIGEST = "no-digest"
    NO_SIGNATURES = "no-signatures"
    NOT_ALLOWLISTED = "not-allowlisted"
    NOT_FOUND = "not-found"
    NOT_RUNNING = "not-running"
    NOT_TRIED = "not-tried"
    PAYLOAD_INVALID = "payload-invalid"
    PAYLOAD_TOO_LARGE = "payload-too-large"
    POLICY_CONFLICT = "policy-conflict"
    POLICY_ROLLBACK = "policy-rollback"
    POLICY_VERSION_JUMP = "policy-version-jump"
    POLICY_SIGNATURE_INVALID = "policy-signature-invalid"
    POLICY_UNKNOWN_KEY = "policy-unknown-key"
    POLICY_EXPIRED = "policy-expired"
    POLICY_UNSIGNED = "policy-unsigned"
    POLICY_WRONG_TARGET = "policy-wrong-target"
    PUBLISH_WINDOW_FULL = "publish-window-full"
    PULL_FAILED = "pull-failed"
    REGISTRY_AUTH_FAILED = "registry-auth-failed"
    REMOTE_SPEC_NOT_PERMITTED = "remote-spec-not-permitted"
    REGISTRY_DIGEST_MISMATCH = "registry-digest-mismatch"
    REGISTRY_ERROR = "registry-error"
    REGISTRY_NOT_FOUND = "registry-not-found"
    REGISTRY_RESPONSE_TOO_LARGE = "registry-response-too-large"
    REGISTRY_TLS_ERROR = "registry-tls-error"
    REGISTRY_UNREACHABLE = "registry-unreachable"
    REPLY_TIMEOUT = "reply-timeout"
    RUNTIME_CONSTRAINT = "runtime-constraint"
    SCHEMA_VIOLATION = "schema-violation"
    SIGNATURE_INVALID = "signature-invalid"
    SIGNATURE_MISMATCH = "signature-mismatch"
    SIGNATURE_VERIFIED = "signature-verified"
    SIGNED_DOCUMENT_REQUIRED = "signed-document-required"
    STATE_ERROR = "state-error"
    TLOG_INVALID = "tlog-invalid"
    TLOG_REQUIRED = "tlog-required"
    UNSUPPORTED_KEY = "unsupported-key"
    UNSUPPORTED_SCHEME = "unsupported-scheme"
    UPDATE_REJECTED = "update-rejected"
    VERIFICATION_ERROR = "verification-error"
    VERIFICATION_TIMEOUT = "verification-timeout"
    VERIFIED = "verified"
    VANISHED = "vanished-before-inspection"
    VERIFIED_BEFORE = "verified-before"
    WRONG_TARGET = "wrong-target"


class ImageGuardError(Exception):
    """Base of every error the agent raises on purpose."""

    code = Code.ERROR
    #: process exit code when this error ends a CLI command
    exit_code = 2

    def __init__(self, message: str, *, code: Code | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class InputError(ImageGuardError):
    """Something a user or peer gave us is malformed. Nothing was changed."""

    code = Code.INVALID_INPUT


class SchemaError(InputError):
    """A document failed its JSON Schema; ``pointer`` is the JSON pointer of the first error."""

    code = Code.SCHEMA_VIOLATION

    def __init__(self, what: str, pointer: str, detail: str) -> None:
        where = pointer or "/"
        super().__init__(f"{what}: at {where}: {detail}")
        self.what = what
        self.pointer = pointer
        self.detail = detail


class ConfigError(InputError):
    code = Code.INVALID_CONFIG


class PolicyError(InputError):
    code = Code.INVALID_POLICY


class NotFound(PolicyError):
    """The policy holds no such entry (allowlist digest, trust anchor, instance): nothing was changed."""

    code = Code.NOT_FOUND
    exit_code = 1


class DigestError(InputError):
    code = Code.INVALID_DIGEST


class ImageRefError(InputError):
    code = Code.INVALID_IMAGE_REFERENCE


class RollbackError(PolicyError):
    """A versioned document is older than the one held (an equal version is 'nothing new', not this)."""

    code = Code.POLICY_ROLLBACK


class PolicyConflict(PolicyError):
    """The same version with different content: one of the two documents must get a new version."""

    code = Code.POLICY_CONFLICT
    exit_code = 1


class StateError(ImageGuardError):
    """The durable state cannot be used as it is (corrupt, newer schema, locked by another agent)."""

    code = Code.STATE_ERROR


class EngineError(ImageGuardError):
    """The container engine did not answer or refused an action."""

    code = Code.ENGINE_UNAVAILABLE
    exit_code = 3  # could not check


class KeyMaterialError(InputError):
    """A key, certificate or PEM block cannot be used."""

    code = Code.INVALID_KEY


class RegistryError(ImageGuardError):
    """The registry answered, but not with something we can use."""

    code = Code.REGISTRY_ERROR


class RegistryUnreachable(RegistryError):
    """No answer from the registry (network down, DNS, TLS handshake, timeout)."""

    code = Code.REGISTRY_UNREACHABLE
    exit_code = 3  # could not check


class VerificationError(ImageGuardError):
    """A signature check failed. ``reasons`` lists every reason, one per signature tried."""

    code = Code.SIGNATURE_INVALID
    exit_code = 1

    def __init__(self, message: str, *, code: Code | None = None, reasons: list[str] | None = None) -> None:
        super().__init__(message, code=code)
        self.reasons = list(reasons or [message])


class ControlError(ImageGuardError):
    """A control request cannot be served; ``status`` is the Kura response code to answer with."""

    code = Code.CONTROL_ERROR

    def __init__(self, status: int, message: str, *, code: Code | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status


class PayloadError(InputError):
    """An MQTT payload cannot be decoded as a KuraPayload (protobuf or its JSON form)."""

    code = Code.INVALID_PAYLOAD


class PayloadTooLarge(PayloadError):
    """An MQTT payload is over ``mqtt.max_payload_bytes`` (before or after gunzip)."""

    code = Code.PAYLOAD_TOO_LARGE


class BrokerError(ImageGuardError):
    """The MQTT broker connection cannot do what was asked (not started, stopped, refused)."""

    code = Code.BROKER_ERROR
    exit_code = 3  # could not check


class PublishWindowFull(BrokerError):
    """Too many publishes await the broker's acknowledgement; retry after some complete."""

    code = Code.PUBLISH_WINDOW_FULL


class UnsupportedSchemeError(PolicyError):
    """A trust anchor names a signature scheme that no validator implements."""

    code = Code.UNSUPPORTED_SCHEME


class PolicySignatureError(ControlError):
    """A policy change over MQTT is unsigned, mis-signed or signed for another target (answered with 403).

    Codes: ``policy-unsigned``, ``policy-signature-invalid``, ``policy-unknown-key``, ``policy-wrong-target``,
    ``signed-document-required`` (a piecemeal change while signing is on).
    """

    code = Code.POLICY_SIGNATURE_INVALID

    def __init__(self, message: str, *, code: Code | None = None) -> None:
        super().__init__(403, message, code=code)


class ReplyTimeout(BrokerError):
    """No reply to a console request within the timeout (the device may be offline or not subscribed)."""

    code = Code.REPLY_TIMEOUT
    exit_code = 3  # could not check: the device did not answer
