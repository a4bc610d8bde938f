"""Certificate paths checked as strictly as cosign does: crafted chains, each refused for its own reason."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.core.anchors import TrustAnchor
from tests.support.cosign import EMAIL, issuer_extensions, make_cert, pem
from tests.unit.verify.cosign.test_ca_and_rekor import ca_sig, code_of

SIGN_ONLY = x509.KeyUsage(True, False, False, False, False, False, False, False, False)


def _key() -> Any:
    return ec.generate_private_key(ec.SECP256R1())


def _verdict(
    *, root_kw: dict[str, Any] | None = None, inter_kw: dict[str, Any] | None = None, extra_ca: bool = False
) -> str:
    """Root -> intermediate (-> second intermediate) -> leaf, the chain carried in the signature."""
    root_key, inter_key, leaf_key = _key(), _key(), _key()
    root = make_cert("Root", root_key, "Root", root_key, ca=True, **(root_kw or {}))
    inter = make_cert("Inter", inter_key, "Root", root_key, ca=True, **(inter_kw or {}))
    chain, issuer, issuer_key = [inter, root], "Inter", inter_key
    if extra_ca:
        second_key = _key()
        second = make_cert("Inter 2", second_key, "Inter", inter_key, ca=True)
        chain, issuer, issuer_key = [second, inter, root], "Inter 2", second_key
    leaf = make_cert(
        "", leaf_key, issuer, issuer_key, ca=False,
        eku=[ExtendedKeyUsageOID.CODE_SIGNING], sans=[x509.RFC822Name(EMAIL)], extra=issuer_extensions(),
    )  # fmt: skip
    anchor = TrustAnchor(name="ca", kind="ca", pem=pem(root), any_identity=True)
    return code_of(ca_sig(leaf_key, leaf, chain), anchor)


def test_a_sound_chain_verifies() -> None:
    assert _verdict() == "verified"
    assert _verdict(inter_kw={"eku": [ExtendedKeyUsageOID.CODE_SIGNING]}) == "verified"
    assert _verdict(root_kw={"path_length": 2}, extra_ca=True) == "verified"


@pytest.mark.parametrize(
    ("case", "kwargs", "code"),
    [
        (
            "intermediate EKU without code signing",
            {"inter_kw": {"eku": [ExtendedKeyUsageOID.SERVER_AUTH]}},
            "certificate-eku",
        ),
        (
            "intermediate without keyCertSign",
            {"inter_kw": {"key_usage": SIGN_ONLY}},
            "certificate-ca-invalid",
        ),
        ("intermediate without keyUsage", {"inter_kw": {"key_usage": None}}, "certificate-ca-invalid"),
        ("root without keyCertSign", {"root_kw": {"key_usage": SIGN_ONLY}}, "certificate-ca-invalid"),
        (
            "root path length 0 over an intermediate",
            {"root_kw": {"path_length": 0}},
            "certificate-path-length",
        ),
        (
            "path length 0 over a second intermediate",
            {"inter_kw": {"path_length": 0}, "extra_ca": True},
            "certificate-path-length",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_crafted_chains_are_refused_each_for_its_own_reason(
    case: str, kwargs: dict[str, Any], code: str
) -> None:
    assert _verdict(**kwargs) == code, case


def test_an_intermediate_that_is_not_a_ca_is_refused() -> None:
    root_key, inter_key, leaf_key = _key(), _key(), _key()
    root = make_cert("Root", root_key, "Root", root_key, ca=True)
    not_ca = make_cert("Inter", inter_key, "Root", root_key, ca=False)
    leaf = make_cert("", leaf_key, "Inter", inter_key, ca=False, eku=[ExtendedKeyUsageOID.CODE_SIGNING])
    anchor = TrustAnchor(name="ca", kind="ca", pem=pem(root), any_identity=True)
    assert code_of(ca_sig(leaf_key, leaf, [not_ca, root]), anchor) in (
        "certificate-untrusted",
        "certificate-ca-invalid",
    )
