"""The validator registry keyed by TrustAnchor.scheme."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.errors import KeyMaterialError, PolicyError, UnsupportedSchemeError, VerificationError
from agent.verify.schemes import VALIDATORS, validator_for
from tests.support.cosign import key_anchor, load_case, now_ts, pub


def test_cosign_is_registered_by_scheme() -> None:
    anchor = key_anchor(pub("cosign.pub"))
    validator = validator_for(anchor)
    assert validator is VALIDATORS["cosign"] and validator.scheme == "cosign"
    digest, sigs = load_case("dir-img-cosign-valid")
    assert digest is not None
    assert validator.verify(digest, sigs, anchor, now_ts()).anchor == anchor.name
    assert validator.report(digest, sigs, anchor, now_ts()).verified is not None
    validator.check_anchor(anchor)
    with pytest.raises(VerificationError):
        validator.verify(digest, sigs, key_anchor(pub("cosign2.pub")), now_ts())


def test_unknown_scheme_is_a_named_error() -> None:
    with pytest.raises(UnsupportedSchemeError, match=r"'notation'.*cosign") as err:
        validator_for(replace(key_anchor(pub("cosign.pub")), scheme="notation"))
    assert err.value.code == "unsupported-scheme"


def test_cosign_validator_refuses_other_schemes_and_bad_material() -> None:
    validator = VALIDATORS["cosign"]
    with pytest.raises(PolicyError):
        validator.check_anchor(replace(key_anchor(pub("cosign.pub")), scheme="notation"))
    with pytest.raises(KeyMaterialError):
        validator.check_anchor(key_anchor("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"))
