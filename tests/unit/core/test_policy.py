"""Policy layers: schema and meaning checks, version monotony, round trip, and the effective union."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from agent.core.anchors import Identity, TrustAnchor
from agent.core.digest import Digest
from agent.core.imageref import ImageRef
from agent.core.policy import (
    DEVICE_LAYER,
    AllowlistEntry,
    EffectivePolicy,
    Enforcement,
    PolicyLayer,
    group_layer,
)
from agent.errors import InputError, PolicyError, RollbackError, SchemaError

D1, D2, D3 = (Digest.of(bytes([i])) for i in range(3))
PEM_A = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
PEM_B = "-----BEGIN PUBLIC KEY-----\nBBBB\n-----END PUBLIC KEY-----\n"


def anchor_doc(name: str = "acme", **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": "key", "pem": PEM_A, **extra}


def full_doc() -> dict[str, Any]:
    return {
        "version": 7,
        "target": {"device": "edge-1"},
        "enforcement": {"enabled": True, "mode": "audit"},
        "allowlist": [{"digest": str(D1), "comment": "base image"}, {"digest": str(D2)}],
        "trust_anchors": [
            anchor_doc("acme", scope=["registry.example:5000/acme/*"], require_tlog=True),
            {
                "name": "fleet-ca",
                "kind": "ca",
                "pem": "-----BEGIN CERTIFICATE-----\nCCCC\n-----END CERTIFICATE-----\n",
                "intermediates": "-----BEGIN CERTIFICATE-----\nDDDD\n-----END CERTIFICATE-----\n",
                "identities": [
                    {"subject": "ci@example.com", "issuer": "https://issuer.example"},
                    {"subject_regexp": "^https://github.com/acme/.*$"},
                ],
                "rekor_public_key": PEM_B,
                "strict_identity": True,
            },
        ],
    }


# -- schema and meaning ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "pointer"),
    [
        ([], "/"),
        ({}, "/version"),
        ({"version": -1}, "/version"),
        ({"version": "3"}, "/version"),
        ({"version": True}, "/version"),
        ({"version": 1.5}, "/version"),
        ({"version": 1, "extra": 1}, "/extra"),
        ({"version": 1, "enforcement": {"mode": "block"}}, "/enforcement/mode"),
        ({"version": 1, "enforcement": {"enabled": "yes"}}, "/enforcement/enabled"),
        ({"version": 1, "allowlist": [{"digest": str(D1)}, {}]}, "/allowlist/1/digest"),
        ({"version": 1, "allowlist": [{"digest": 5}]}, "/allowlist/0/digest"),
        ({"version": 1, "allowlist": [{"digest": str(D1), "note": "x"}]}, "/allowlist/0/note"),
        ({"version": 1, "trust_anchors": [{"name": "a", "kind": "key"}]}, "/trust_anchors/0/pem"),
        ({"version": 1, "trust_anchors": [anchor_doc(kind="gpg")]}, "/trust_anchors/0/kind"),
        ({"version": 1, "trust_anchors": [anchor_doc(name="bad name")]}, "/trust_anchors/0/name"),
        ({"version": 1, "trust_anchors": [anchor_doc(scheme="notary")]}, "/trust_anchors/0/scheme"),
        ({"version": 1, "trust_anchors": [anchor_doc(scope=[""])]}, "/trust_anchors/0/scope/0"),
        ({"version": 1, "trust_anchors": [anchor_doc(identities=[{}])]}, "/trust_anchors/0/identities/0"),
        ({"version": 1, "target": {}}, "/target"),
        ({"version": 1, "target": {"device": "a", "group": "b"}}, "/target"),
    ],
)
def test_schema_violations_name_the_field(doc: Any, pointer: str) -> None:
    with pytest.raises(SchemaError) as exc:
        PolicyLayer.from_document(doc, what="policy file p.json")
    assert (exc.value.pointer or "/") == pointer
    assert f"at {pointer}:" in str(exc.value)
    assert str(exc.value).startswith("policy file p.json")
    assert isinstance(exc.value, InputError)


@pytest.mark.parametrize(
    ("doc", "where", "fragment"),
    [
        (
            {"version": 1, "allowlist": [{"digest": str(D1)}, {"digest": "sha256:abc"}]},
            "/allowlist/1/digest",
            "64",
        ),
        ({"version": 1, "allowlist": [{"digest": f"sha512:{'a' * 128}"}]}, "/allowlist/0/digest", "sha256"),
        ({"version": 1, "allowlist": [{"digest": ""}]}, "/allowlist/0/digest", "invalid digest"),
        (
            {"version": 1, "trust_anchors": [anchor_doc("a"), anchor_doc("b"), anchor_doc("a")]},
            "/trust_anchors/2/name",
            "defined twice",
        ),
        (
            {"version": 1, "trust_anchors": [anchor_doc(identities=[{"subject_regexp": "(unclosed"}])]},
            "/trust_anchors/0",
            "not a valid regular expression",
        ),
        ({"version": 1, "trust_anchors": [anchor_doc(intermediates=PEM_B)]}, "/trust_anchors/0", "kind 'ca'"),
    ],
)
def test_meaning_errors_name_the_field(doc: dict[str, Any], where: str, fragment: str) -> None:
    with pytest.raises(PolicyError) as exc:
        PolicyLayer.from_document(doc)
    assert f"at {where}" in str(exc.value)
    assert fragment in str(exc.value)


def test_enforcement_only_in_the_device_layer() -> None:
    doc = {"version": 1, "enforcement": {"enabled": False}}
    assert PolicyLayer.from_document(doc).enforcement == Enforcement(enabled=False, mode="enforce")
    with pytest.raises(PolicyError, match="/enforcement: enforcement can only be set in the device layer"):
        PolicyLayer.from_document(doc, group_layer("plant-a"))
    layer = PolicyLayer.from_document({"version": 1}, group_layer("plant-a"))
    assert layer.enforcement is None
    assert layer.name == "group:plant-a"


def test_digests_are_normalised_and_deduplicated() -> None:
    doc = {
        "version": 1,
        "allowlist": [
            {"digest": f"  {str(D1).upper()} ", "comment": "first"},
            {"digest": str(D1), "comment": "second"},
            {"digest": str(D2)},
        ],
    }
    layer = PolicyLayer.from_document(doc)
    assert layer.allowlist == (AllowlistEntry(D1, "first"), AllowlistEntry(D2))


def test_defaults_of_a_minimal_document() -> None:
    layer = PolicyLayer.from_document({"version": 0, "trust_anchors": [anchor_doc()]})
    assert layer.name == DEVICE_LAYER
    assert layer.enforcement is None
    assert layer.allowlist == ()
    (a,) = layer.trust_anchors
    assert a.scope == ("*",)
    assert a.scheme == "cosign"
    assert (a.require_tlog, a.strict_identity, a.intermediates, a.identities) == (False, False, None, ())


def test_integral_float_version_becomes_an_int() -> None:
    layer = PolicyLayer.from_document({"version": 3.0})
    assert layer.version == 3
    assert type(layer.version) is int


def test_from_document_does_not_change_its_input() -> None:
    doc = full_doc()
    before = copy.deepcopy(doc)
    PolicyLayer.from_document(doc)
    assert doc == before


# -- round trip --------------------------------------------------------------------------------------


def test_round_trip() -> None:
    layer = PolicyLayer.from_document(full_doc())
    assert layer.version == 7
    assert layer.enforcement == Enforcement(True, "audit")
    assert layer.trust_anchors[1].identities == (
        Identity(subject="ci@example.com", issuer="https://issuer.example"),
        Identity(subject_regexp="^https://github.com/acme/.*$"),
    )
    doc = layer.to_document()
    again = PolicyLayer.from_document(doc)
    assert again == layer
    assert again.to_document() == doc
    # the exported document is the input with defaults filled in
    expected = full_doc()
    expected["trust_anchors"][0].update(scheme="cosign", strict_identity=False)
    expected["trust_anchors"][1].update(scheme="cosign", scope=["*"], require_tlog=False)
    assert doc == expected


def test_empty_layer_round_trip() -> None:
    layer = PolicyLayer()
    assert layer.to_document() == {"version": 0, "allowlist": [], "trust_anchors": []}
    assert PolicyLayer.from_document(layer.to_document()) == layer


# -- versions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("held", "new", "replaces"), [(0, 1, True), (5, 6, True), (5, 1000, True), (5, 5, False)]
)
def test_check_successor(held: int, new: int, replaces: bool) -> None:
    assert PolicyLayer(version=held).check_successor(PolicyLayer(version=new)) is replaces


@pytest.mark.parametrize(("held", "new"), [(1, 0), (5, 4), (9007199254740991, 1)])
def test_older_version_is_a_rollback(held: int, new: int) -> None:
    with pytest.raises(RollbackError) as exc:
        PolicyLayer(version=held).check_successor(PolicyLayer(version=new))
    assert exc.value.code == "policy-rollback"
    assert f"version {new} is older than the held version {held}" in str(exc.value)
    assert isinstance(exc.value, PolicyError)


def test_bumped() -> None:
    layer = PolicyLayer.from_document(full_doc())
    edited = layer.bumped(allowlist=(AllowlistEntry(D3),))
    assert edited.version == layer.version + 1
    assert edited.allowlist == (AllowlistEntry(D3),)
    assert (edited.trust_anchors, edited.enforcement, edited.target) == (
        layer.trust_anchors,
        layer.enforcement,
        layer.target,
    )
    assert layer.check_successor(edited)


# -- trust anchors -----------------------------------------------------------------------------------


def test_fingerprint_changes_with_anything_that_affects_verification() -> None:
    base = TrustAnchor.from_dict(anchor_doc(scope=["registry.example:5000/acme/*"]), "t")
    same = TrustAnchor.from_dict(anchor_doc(scope=["registry.example:5000/acme/*"]), "t")
    assert base.fingerprint == same.fingerprint
    variants = [
        anchor_doc(pem=PEM_B, scope=["registry.example:5000/acme/*"]),
        anchor_doc(scope=["*"]),
        anchor_doc(scope=["registry.example:5000/acme/*"], require_tlog=True),
        anchor_doc(scope=["registry.example:5000/acme/*"], strict_identity=True),
        anchor_doc(scope=["registry.example:5000/acme/*"], rekor_public_key=PEM_B),
        {**anchor_doc(scope=["registry.example:5000/acme/*"]), "kind": "ca", "any_identity": True},
        {**anchor_doc(scope=["registry.example:5000/acme/*"], identities=[{"subject": "x"}]), "kind": "ca"},
    ]
    fingerprints = {TrustAnchor.from_dict(v, "t").fingerprint for v in variants}
    assert len(fingerprints) == len(variants)
    assert base.fingerprint not in fingerprints


def test_a_ca_anchor_says_whom_it_trusts() -> None:
    ca = {**anchor_doc(scope=["registry.example/acme/*"]), "kind": "ca"}
    with pytest.raises(PolicyError, match=r"needs at least one identity.*any_identity = true"):
        TrustAnchor.from_dict(ca, "t")
    assert TrustAnchor.from_dict({**ca, "any_identity": True}, "t").any_identity
    with pytest.raises(PolicyError, match="contradict"):
        TrustAnchor.from_dict({**ca, "any_identity": True, "identities": [{"subject": "x"}]}, "t")
    issuer_only = TrustAnchor.from_dict({**ca, "identities": [{"issuer": "https://idp"}]}, "t")
    assert issuer_only.issuer_only_identities == issuer_only.identities


@pytest.mark.parametrize(
    ("scope", "words"),
    [
        ([], "an empty scope covers no image"),
        (["*.example.com/*"], "host must be spelled out"),
        (["registry.example/acme/*", "*/app"], "host must be spelled out"),
    ],
)
def test_anchor_scopes_mean_what_they_say(scope: list[str], words: str) -> None:
    with pytest.raises(PolicyError, match=words):
        TrustAnchor.from_dict(anchor_doc(scope=scope), "t")


def test_identities_only_apply_to_ca_anchors() -> None:
    with pytest.raises(PolicyError, match="identities only apply to kind 'ca'"):
        TrustAnchor.from_dict(anchor_doc(identities=[{"subject": "x"}]), "t")


def test_anchor_covers() -> None:
    a = TrustAnchor.from_dict(anchor_doc(scope=["registry.example:5000/acme/*", "busybox"]), "t")
    assert a.covers(ImageRef.parse("registry.example:5000/acme/app:1"))
    assert a.covers(ImageRef.parse("docker.io/library/busybox"))
    assert not a.covers(ImageRef.parse("registry.example:5000/other/app"))


# -- effective policy --------------------------------------------------------------------------------


def key_anchor(name: str, pem: str = PEM_A, scope: tuple[str, ...] = ("*",)) -> TrustAnchor:
    return TrustAnchor(name=name, kind="key", pem=pem, scope=scope)


DEFAULT = Enforcement(enabled=True, mode="enforce")


def test_compose_is_the_union_of_layers() -> None:
    device = PolicyLayer(
        DEVICE_LAYER, 4, None, (AllowlistEntry(D1),), (key_anchor("dev"), key_anchor("shared"))
    )
    group_a = PolicyLayer(group_layer("a"), 9, None, (AllowlistEntry(D2),), (key_anchor("ga"),))
    group_b = PolicyLayer(
        group_layer("b"), 2, None, (AllowlistEntry(D1), AllowlistEntry(D3)), (key_anchor("shared", PEM_B),)
    )
    eff = EffectivePolicy.compose([group_a, device, group_b], DEFAULT, frozenset({D3}))
    assert eff.allowlist == frozenset({D1, D2, D3})
    assert {a.name for a in eff.trust_anchors} == {"dev", "shared", "ga"}
    shared = eff.anchor("shared")
    assert shared is not None and shared.pem == PEM_A  # the device layer's anchor of a name wins
    assert eff.versions == {"device": 4, "group:a": 9, "group:b": 2}
    assert eff.version == 4
    assert eff.instance_digests == frozenset({D3})
    assert eff.enforcement == DEFAULT


@pytest.mark.parametrize(
    ("device_enforcement", "default", "expected"),
    [
        (None, Enforcement(True, "enforce"), Enforcement(True, "enforce")),
        (None, Enforcement(False, "audit"), Enforcement(False, "audit")),
        (Enforcement(False, "enforce"), Enforcement(True, "enforce"), Enforcement(False, "enforce")),
        (Enforcement(True, "audit"), Enforcement(False, "enforce"), Enforcement(True, "audit")),
    ],
)
def test_compose_enforcement(
    device_enforcement: Enforcement | None, default: Enforcement, expected: Enforcement
) -> None:
    layers = [PolicyLayer(DEVICE_LAYER, 1, device_enforcement), PolicyLayer(group_layer("g"), 1)]
    assert EffectivePolicy.compose(layers, default).enforcement == expected


def test_group_enforcement_is_ignored_by_compose() -> None:
    # from_document refuses it; a layer built in code still cannot switch enforcement
    group = PolicyLayer(group_layer("g"), 1, Enforcement(False, "audit"))
    assert EffectivePolicy.compose([group], DEFAULT).enforcement == DEFAULT


def test_compose_of_nothing() -> None:
    eff = EffectivePolicy.compose([], DEFAULT)
    assert (eff.allowlist, eff.trust_anchors, eff.version, dict(eff.versions)) == (frozenset(), (), 0, {})


def test_anchors_for() -> None:
    acme = key_anchor("acme", scope=("registry.example:5000/acme/*",))
    every = key_anchor("every")
    eff = EffectivePolicy.compose([PolicyLayer(trust_anchors=(acme, every))], DEFAULT)
    assert eff.anchors_for(ImageRef.parse("registry.example:5000/acme/app")) == (acme, every)
    assert eff.anchors_for(ImageRef.parse("busybox")) == (every,)
    assert eff.anchors_for(None) == ()
    assert eff.anchor("missing") is None
