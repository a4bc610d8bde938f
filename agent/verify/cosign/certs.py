"""X.509 for cosign's CA mode: path validation to configured roots and identity (SAN / issuer) checks.

Path building is ``cryptography.x509.verification`` with a code-signing profile: CA certificates need
basicConstraints cA (pathLen honoured), every certificate in the path must be valid at the signing time,
and a leaf that carries extendedKeyUsage must list code signing (a leaf without the extension is accepted,
as Go's x509 does). Only configured roots are trust anchors; certificates carried by a signature are
untrusted intermediates at most.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store
from cryptography.x509.verification import VerificationError as X509VerificationError

from agent.core.anchors import Identity
from agent.errors import Code, VerificationError
from agent.verify.cosign.encoding import DecodeError, der_utf8string, pem_blocks

OID_ISSUER_V1 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.1")  # raw bytes (deprecated, still issued)
OID_ISSUER_V2 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.8")  # DER UTF8String
MAX_CHAIN_CERTS = 10


class CertificateFormatError(ValueError):
    """Bytes that should be certificates are not; callers decide whose fault that is."""


def parse_pem_certificates(data: str | bytes) -> list[x509.Certificate]:
    """Every CERTIFICATE block of ``data``; anything else in PEM form is an error."""
    try:
        blocks = pem_blocks(data)
    except DecodeError as exc:
        raise CertificateFormatError(f"malformed PEM: {exc}") from None
    certs = []
    for block in blocks:
        if block.type != "CERTIFICATE":
            raise CertificateFormatError(f"expected CERTIFICATE PEM blocks, found {block.type!r}")
        certs.append(parse_der_certificate(block.body))
    return certs


def parse_der_certificate(der: bytes) -> x509.Certificate:
    try:
        cert = x509.load_der_x509_certificate(der)
        # force lazy parsing now, so a broken certificate fails here and not in the middle of a check
        cert.extensions  # noqa: B018
        cert.public_key()
    except Exception as exc:  # cryptography raises ValueError, UnsupportedAlgorithm or Rust parse errors
        raise CertificateFormatError(f"not a valid X.509 certificate: {exc}") from None
    return cert


def _code_signing_eku(_policy: object, _cert: x509.Certificate, ext: object) -> None:
    if isinstance(ext, x509.ExtendedKeyUsage) and ExtendedKeyUsageOID.CODE_SIGNING not in ext:
        raise ValueError("leaf extendedKeyUsage does not include code signing")


def _iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def verify_path(
    leaf: x509.Certificate,
    untrusted: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    at: dt.datetime,
) -> list[x509.Certificate]:
    """Validate ``leaf`` to one of ``roots`` at time ``at``; returns the path leaf first.

    Raises VerificationError with code certificate-expired, certificate-eku or certificate-untrusted.
    """
    if not roots:
        raise VerificationError("the trust anchor holds no root certificate", code=Code.CERTIFICATE_UNTRUSTED)
    if len(untrusted) > MAX_CHAIN_CERTS:
        raise VerificationError(
            f"{len(untrusted)} intermediate certificates given; at most {MAX_CHAIN_CERTS} are considered",
            code=Code.CERTIFICATE_UNTRUSTED,
        )
    at = _utc(at)
    # Clear reasons for the two most common failures, before the generic path builder runs.
    if not leaf.not_valid_before_utc <= at <= leaf.not_valid_after_utc:
        raise VerificationError(
            f"certificate {leaf.subject.rfc4514_string()!r} is valid {_iso(leaf.not_valid_before_utc)} to "
            f"{_iso(leaf.not_valid_after_utc)}, not at the signing time {_iso(at)}",
            code=Code.CERTIFICATE_EXPIRED,
        )
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and ExtendedKeyUsageOID.CODE_SIGNING not in eku:
        raise VerificationError(
            "certificate extendedKeyUsage does not include code signing (1.3.6.1.5.5.7.3.3)",
            code=Code.CERTIFICATE_EKU,
        )
    ca_policy = ExtensionPolicy.permit_all().require_present(
        x509.BasicConstraints, Criticality.AGNOSTIC, None
    )
    ee_policy = ExtensionPolicy.permit_all().may_be_present(
        x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _code_signing_eku
    )
    try:
        verifier = (
            PolicyBuilder()
            .store(Store(list(roots)))
            .time(at)
            .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
            .build_client_verifier()
        )
        chain = list(verifier.verify(leaf, list(untrusted)).chain)
    except X509VerificationError as exc:
        # the library's path rules include path length; say which rule a path that exists broke
        if (path := _naive_path(leaf, untrusted, roots)) is not None:
            check_ca_rules(path)
        # judged from the certificates' validity periods, not from the library's message text
        expired = any(not (c.not_valid_before_utc <= at <= c.not_valid_after_utc) for c in (leaf, *untrusted))
        code = Code.CERTIFICATE_EXPIRED if expired else Code.CERTIFICATE_UNTRUSTED
        raise VerificationError(
            f"certificate {leaf.subject.rfc4514_string()!r} does not chain to the trust anchor's roots at "
            f"{at:%Y-%m-%dT%H:%M:%SZ}: {exc}",
            code=code,
        ) from None
    except (ValueError, x509.UnsupportedGeneralNameType) as exc:  # e.g. odd names or keys deep in the path
        raise VerificationError(
            f"certificate path cannot be validated: {exc}", code=Code.CERTIFICATE_UNTRUSTED
        ) from None
    check_ca_rules(chain)
    return chain


def _naive_path(
    leaf: x509.Certificate, untrusted: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]
) -> list[x509.Certificate] | None:
    """After a failed verification: the path from ``leaf`` to one of ``roots`` by signatures alone (no
    other rule), so that :func:`check_ca_rules` can name the rule it breaks. None if there is no such path."""
    path, current = [leaf], leaf
    candidates = [*untrusted, *roots]
    for _ in range(8):
        if any(current == r for r in roots):
            return path
        for issuer in candidates:
            if issuer in path or issuer.subject != current.issuer:
                continue
            try:
                current.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature):
                continue
            path.append(issuer)
            current = issuer
            break
        else:
            return None
    return None


def check_ca_rules(chain: Sequence[x509.Certificate]) -> None:
    """The rules cosign (through Go's x509) applies to every CA in a built path ``[leaf, ..., root]``,
    checked on the path itself so that each failure has its own reason:

    - basic constraints present with ``ca`` true, and a key usage that allows certificate signing;
    - extended key usage nesting: a CA that restricts its EKUs must allow code signing;
    - path length: a CA's ``pathLenConstraint`` bounds the CAs below it.
    """
    for depth, ca in enumerate(chain[1:], start=1):
        name = ca.subject.rfc4514_string()
        try:
            bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise VerificationError(
                f"certificate {name!r} issues certificates but is not a CA (basicConstraints cA is not set)",
                code=Code.CERTIFICATE_CA_INVALID,
            )
        try:
            ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            ku = None
        if ku is None or not ku.key_cert_sign:
            raise VerificationError(
                f"CA certificate {name!r} is not allowed to sign certificates (keyUsage keyCertSign is "
                + ("missing" if ku is not None else "absent: no keyUsage extension")
                + ")",
                code=Code.CERTIFICATE_CA_INVALID,
            )
        try:
            eku = ca.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = None
        if eku is not None and not {
            ExtendedKeyUsageOID.CODE_SIGNING,
            ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
        } & set(eku):
            raise VerificationError(
                f"CA certificate {name!r} restricts its extended key usage to "
                f"{', '.join(o.dotted_string for o in eku)}, which does not include code signing",
                code=Code.CERTIFICATE_EKU,
            )
        below = depth - 1  # CA certificates between this one and the leaf
        if bc.path_length is not None and below > bc.path_length:
            raise VerificationError(
                f"CA certificate {name!r} allows {bc.path_length} CA certificates below it "
                f"(pathLenConstraint), the path has {below}",
                code=Code.CERTIFICATE_PATH_LENGTH,
            )


def subject_alt_names(cert: x509.Certificate) -> list[str]:
    """SAN values as strings: email, URI, DNS, IP, and OtherName holding a DER UTF8String."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out: list[str] = []
    for name in san:
        if isinstance(name, x509.RFC822Name | x509.UniformResourceIdentifier | x509.DNSName):
            out.append(name.value)
        elif isinstance(name, x509.IPAddress):
            out.append(str(name.value))
        elif isinstance(name, x509.OtherName):
            try:
                out.append(der_utf8string(name.value))
            except DecodeError:
                continue
    return out


def _extension_bytes(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_oid(oid).value
    except x509.ExtensionNotFound:
        return None
    return ext.value if isinstance(ext, x509.UnrecognizedExtension) else None


def certificate_issuer(cert: x509.Certificate) -> str | None:
    """The OIDC issuer Fulcio recorded: OID .1.8 (DER UTF8String) preferred, .1.1 (raw) legacy.

    Both present and different -> VerificationError (containers/image does the same).
    """
    v2_raw, v1_raw = _extension_bytes(cert, OID_ISSUER_V2), _extension_bytes(cert, OID_ISSUER_V1)
    v2 = v1 = None
    try:
        if v2_raw is not None:
            v2 = der_utf8string(v2_raw)
        if v1_raw is not None:
            v1 = v1_raw.decode("utf-8")
    except (DecodeError, UnicodeDecodeError):
        raise VerificationError(
            "certificate issuer extension is malformed", code=Code.IDENTITY_MISMATCH
        ) from None
    if v1 is not None and v2 is not None and v1 != v2:
        raise VerificationError(
            f"certificate issuer extensions disagree: {v2!r} (1.3.6.1.4.1.57264.1.8) vs {v1!r} (.1.1)",
            code=Code.IDENTITY_MISMATCH,
        )
    return v2 if v2 is not None else v1


def _matches(value: str | None, exact: str | None, pattern: str | None) -> bool:
    if exact is not None and value != exact:
        return False
    return not (pattern is not None and (value is None or re.fullmatch(pattern, value) is None))


def _identity_matches(identity: Identity, sans: Sequence[str], issuer: str | None) -> bool:
    wants_subject = identity.subject is not None or identity.subject_regexp is not None
    if wants_subject and not any(_matches(s, identity.subject, identity.subject_regexp) for s in sans):
        return False
    if identity.issuer is not None or identity.issuer_regexp is not None:
        return _matches(issuer, identity.issuer, identity.issuer_regexp)
    return True


def check_identities(cert: x509.Certificate, identities: Sequence[Identity]) -> str:
    """Any one identity entry must match (all its given fields). No entries: any identity is accepted.

    Returns a description of the certificate's identity for reports; raises VerificationError.
    """
    sans = subject_alt_names(cert)
    issuer = certificate_issuer(cert)
    described = f"subject {', '.join(sans) or cert.subject.rfc4514_string()!r}, issuer {issuer!r}"
    if not identities or any(_identity_matches(i, sans, issuer) for i in identities):
        return described
    wanted = "; ".join(", ".join(f"{k} {v!r}" for k, v in i.to_dict().items()) for i in identities)
    raise VerificationError(
        f"certificate identity ({described}) matches none of: {wanted}", code=Code.IDENTITY_MISMATCH
    )
