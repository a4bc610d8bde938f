"""The policy service: versioned changes, revocation, local edits and policy telemetry."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.store import Store
from agent.config import Config, from_dict
from agent.control.service import ApplyResult, Service
from agent.core.anchors import TrustAnchor
from agent.core.decision import VerifiedDigest
from agent.core.digest import Digest
from agent.core.policy import AllowlistEntry, Enforcement, PolicyLayer, group_layer
from agent.errors import InputError, PolicyConflict, PolicyError, RollbackError, SchemaError
from tests.support.keys import public_pem

D1, D2, D3 = (Digest.of(bytes([i])) for i in range(3))
PEM_A, PEM_A2, PEM_O = public_pem(), public_pem(), public_pem()
ACME = TrustAnchor("acme", "key", PEM_A, scope=("registry.example:5000/acme/*",))
OTHER = TrustAnchor("other", "key", PEM_O)


def make_config(tmp_path: Path, **enforcement: Any) -> Config:
    data: dict[str, Any] = {
        "device": {"id": "edge-1", "groups": ["plant-a"]},
        "state": {"dir": str(tmp_path / "state")},
    }
    if enforcement:
        data["enforcement"] = enforcement
    return from_dict(data, "test")


class Harness:
    def __init__(self, tmp_path: Path, telemetry: bool, **enforcement: Any) -> None:
        self.config = make_config(tmp_path, **enforcement)
        self.store = Store(self.config.state_dir)
        self.changes = 0
        self.service = Service(self.config, self.store, telemetry=telemetry, on_change=self._changed)

    def _changed(self) -> None:
        self.changes += 1

    def policy_messages(self) -> list[dict[str, Any]]:
        return [q.message for q in self.store.outbox_peek(limit=1000) if q.kind == "policy"]

    def verify(self, digest: Digest, anchor: TrustAnchor) -> None:
        self.store.add_verified(VerifiedDigest(digest, anchor.name, anchor.fingerprint, "repo", "sig", "t"))


@pytest.fixture(params=[True, False], ids=["telemetry", "no-telemetry"])
def h(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path, telemetry=request.param)
    yield harness
    harness.store.close()


@pytest.fixture
def ht(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path, telemetry=True)
    yield harness
    harness.store.close()


def layer(version: int, *digests: Digest, anchors: tuple[TrustAnchor, ...] = (), **kw: Any) -> PolicyLayer:
    return PolicyLayer(
        version=version, allowlist=tuple(AllowlistEntry(d) for d in digests), trust_anchors=anchors, **kw
    )


# -- apply_layer ---------------------------------------------------------------------------------------


def test_apply_unchanged_rollback(h: Harness) -> None:
    assert h.service.apply_layer(layer(3, D1), source="cli") == ApplyResult("device", 3, "applied", 0)
    assert h.changes == 1
    # the same document again is "nothing new"; the same version with other content is a conflict
    assert h.service.apply_layer(layer(3, D1), source="cli") == ApplyResult("device", 3, "unchanged", 0)
    with pytest.raises(PolicyConflict, match=r"allowlist \+1.*allowlist -1"):
        h.service.apply_layer(layer(3, D2), source="cli")
    assert h.changes == 1
    assert h.service.effective().allowlist == frozenset({D1})
    with pytest.raises(RollbackError, match="version 2 is older than the held version 3"):
        h.service.apply_layer(layer(2, D3), source="mqtt")
    assert h.changes == 1
    assert h.service.layer() == layer(3, D1)
    assert h.service.apply_layer(layer(10, D2), source="cli").status == "applied"
    assert h.service.effective().allowlist == frozenset({D2})
    assert h.service.effective().version == 10
    messages = h.policy_messages()
    if not h.service.telemetry:
        assert messages == []
        return
    assert [(m["status"], m["version"], m["source"]) for m in messages] == [
        ("applied", 3, "cli"),
        ("unchanged", 3, "cli"),
        ("rejected", 3, "cli"),
        ("rejected", 2, "mqtt"),
        ("applied", 10, "cli"),
    ]
    assert messages[2]["reason"] == "policy-conflict"
    rejected = messages[3]
    assert rejected["reason"] == "policy-rollback"
    assert "older" in rejected["detail"]
    assert rejected["policy_version"] == 3
    assert all(m["device"] == "edge-1" and m["layer"] == "device" for m in messages)


def test_group_layers(h: Harness) -> None:
    h.service.apply_layer(layer(1, D1), source="cli")
    h.service.apply_layer(
        PolicyLayer(name=group_layer("plant-a"), version=5, allowlist=(AllowlistEntry(D2),)), source="mqtt"
    )
    # a layer for a group the device is not in is stored but does not apply
    h.service.apply_layer(
        PolicyLayer(name=group_layer("plant-b"), version=7, allowlist=(AllowlistEntry(D3),)), source="mqtt"
    )
    eff = h.service.effective()
    assert eff.allowlist == frozenset({D1, D2})
    assert dict(eff.versions) == {"device": 1, "group:plant-a": 5}
    with pytest.raises(RollbackError):
        h.service.apply_layer(PolicyLayer(name=group_layer("plant-a"), version=4), source="mqtt")
    # each layer has its own version line
    assert (
        h.service.apply_layer(PolicyLayer(name=group_layer("plant-a"), version=6), source="mqtt").status
        == "applied"
    )


@pytest.mark.parametrize(
    ("new_anchors", "revoked", "kept"),
    [
        ((ACME, OTHER), 0, {"acme", "other"}),
        ((replace(ACME, pem=PEM_A2), OTHER), 2, {"other"}),
        ((replace(ACME, scope=("*",)), OTHER), 2, {"other"}),
        ((replace(ACME, require_tlog=True), OTHER), 2, {"other"}),
        ((OTHER,), 2, {"other"}),
        ((), 3, set()),
    ],
    ids=["same", "new-key", "new-scope", "tlog-required", "removed", "all-removed"],
)
def test_changed_or_removed_anchor_revokes_what_it_verified(
    ht: Harness, new_anchors: tuple[TrustAnchor, ...], revoked: int, kept: set[str]
) -> None:
    ht.service.apply_layer(layer(1, anchors=(ACME, OTHER)), source="cli")
    ht.verify(D1, ACME)
    ht.verify(D2, ACME)
    ht.verify(D2, OTHER)
    result = ht.service.apply_layer(layer(2, anchors=new_anchors), source="cli")
    assert result == ApplyResult("device", 2, "applied", revoked)
    assert {v.anchor for vs in ht.store.verified().values() for v in vs} == kept


def test_anchor_from_a_group_layer_keeps_its_digests(ht: Harness) -> None:
    group = PolicyLayer(name=group_layer("plant-a"), version=1, trust_anchors=(OTHER,))
    ht.service.apply_layer(group, source="mqtt")
    ht.verify(D1, OTHER)
    # a device-layer change does not revoke what a group anchor verified
    assert ht.service.apply_layer(layer(1, D2), source="cli").revoked == 0
    assert D1 in ht.store.verified()
    # withdrawing the group's anchor does
    assert ht.service.apply_layer(replace(group, version=2, trust_anchors=()), source="mqtt").revoked == 1
    assert ht.store.verified() == {}


def test_put_and_delete_anchor(ht: Harness) -> None:
    ht.service.put_anchor(ACME)
    ht.verify(D1, ACME)
    assert ht.service.put_anchor(OTHER).revoked == 0
    assert ht.service.put_anchor(replace(ACME, pem=PEM_A2)).revoked == 1
    assert {a.name for a in ht.service.effective().trust_anchors} == {"acme", "other"}
    assert ht.service.delete_anchor("other").version == 4
    with pytest.raises(PolicyError) as exc:
        ht.service.delete_anchor("other")
    assert exc.value.code == "not-found"
    assert ht.service.layer().version == 4


# -- local edits ---------------------------------------------------------------------------------------


def test_allowlist_add_and_remove(h: Harness) -> None:
    r = h.service.allowlist_add([D1, D2], "base images")
    assert (r.status, r.version) == ("applied", 1)
    assert h.service.allowlist_add([D1]) == ApplyResult("device", 1, "unchanged")
    assert h.service.allowlist_add([D1], "base images").status == "unchanged"
    assert h.service.allowlist_add([D1], "new comment").version == 2
    assert h.service.layer().allowlist == (
        AllowlistEntry(D1, "new comment"),
        AllowlistEntry(D2, "base images"),
    )
    assert h.service.allowlist_add([D2, D3]).version == 3
    assert h.service.effective().allowlist == frozenset({D1, D2, D3})
    r = h.service.allowlist_remove(D2)
    assert (r.status, r.version) == ("applied", 4)
    assert h.service.effective().allowlist == frozenset({D1, D3})
    with pytest.raises(PolicyError) as exc:
        h.service.allowlist_remove(D2)
    assert exc.value.code == "not-found"
    assert str(D2) in str(exc.value)
    assert h.service.layer().version == 4
    assert h.changes == 4
    # the refused removal is answered to the caller; it changed no layer, so it is not policy telemetry
    statuses = [m["status"] for m in h.policy_messages()]
    assert statuses == (["applied"] * 4 if h.service.telemetry else [])


def test_local_edits_keep_the_rest_of_the_layer(ht: Harness) -> None:
    ht.service.apply_layer(
        layer(7, D1, anchors=(ACME,), enforcement=Enforcement(True, "audit")), source="mqtt"
    )
    ht.service.allowlist_add([D2])
    held = ht.service.layer()
    assert held.version == 8
    assert held.trust_anchors == (ACME,)
    assert held.enforcement == Enforcement(True, "audit")


def test_set_enforcement(h: Harness) -> None:
    # no policy ever set and no mode configured: a first run audits, it does not remove anything
    assert h.service.effective().enforcement == Enforcement(True, "audit")
    assert h.service.set_enforcement(mode="audit").version == 1
    assert h.service.effective().enforcement == Enforcement(True, "audit")
    h.service.set_enforcement(enabled=False)
    assert h.service.effective().enforcement == Enforcement(False, "audit")
    h.service.set_enforcement(enabled=True, mode="enforce")
    assert h.service.effective().enforcement == Enforcement(True, "enforce")
    assert h.service.layer().version == 3
    with pytest.raises(PolicyError, match="unknown enforcement mode 'block'"):
        h.service.set_enforcement(mode="block")
    assert h.service.layer().version == 3


def test_default_enforcement_comes_from_the_config(tmp_path: Path) -> None:
    harness = Harness(tmp_path, telemetry=False, enabled=False, mode="audit")
    try:
        svc = harness.service
        assert svc.effective().enforcement == Enforcement(False, "audit")
        assert svc.export_policy()["enforcement"] == {"enabled": False, "mode": "audit"}
        svc.allowlist_add([D1])  # an edit that does not touch enforcement keeps the default
        assert svc.layer().enforcement is None
        assert svc.effective().enforcement == Enforcement(False, "audit")
        svc.set_enforcement(enabled=True)
        assert svc.layer().enforcement == Enforcement(True, "audit")
    finally:
        harness.store.close()


# -- documents -----------------------------------------------------------------------------------------


def test_import_and_export(h: Harness) -> None:
    doc = {
        "version": 5,
        "enforcement": {"enabled": True, "mode": "audit"},
        "allowlist": [{"digest": str(D1).upper(), "comment": "c"}],
        "trust_anchors": [{"name": "acme", "kind": "key", "pem": PEM_A}],
    }
    assert h.service.import_policy(doc).status == "applied"
    exported = h.service.export_policy()
    assert exported["allowlist"] == [{"digest": str(D1), "comment": "c"}]
    assert exported["version"] == 5
    assert h.service.import_policy(exported).status == "unchanged"
    assert h.service.export_policy("group:none") == {"version": 0, "allowlist": [], "trust_anchors": []}


@pytest.mark.parametrize(
    ("doc", "error", "version"),
    [
        ({"version": 9, "allowlist": [{"digest": "sha256:short"}]}, PolicyError, 9),
        ({"version": 9, "bogus": True}, SchemaError, 9),
        ({"version": "9"}, SchemaError, -1),
        (["not", "an", "object"], SchemaError, -1),
        ({"version": 1}, RollbackError, 1),
    ],
    ids=["bad-digest", "unknown-key", "string-version", "not-object", "rollback"],
)
def test_rejected_documents_change_nothing_and_are_recorded(
    ht: Harness, doc: Any, error: type[InputError], version: int
) -> None:
    ht.service.import_policy({"version": 2, "allowlist": [{"digest": str(D1)}]})
    before = ht.service.export_policy()
    changes = ht.changes
    with pytest.raises(error):
        ht.service.import_policy(doc, source="file p.json")
    assert ht.service.export_policy() == before
    assert ht.changes == changes
    rejected = ht.policy_messages()[-1]
    assert (rejected["status"], rejected["version"], rejected["source"]) == (
        "rejected",
        version,
        "file p.json",
    )
    assert rejected["reason"] == error.code
    assert rejected["policy_version"] == 2


def test_queue_telemetry_only_with_telemetry(h: Harness) -> None:
    from agent.core.records import OutboxMessage

    h.service.queue_telemetry([OutboxMessage("instances", {"x": 1}, 1)])
    assert h.store.outbox_size() == (1 if h.service.telemetry else 0)


@pytest.mark.parametrize(
    ("anchor", "fragment"),
    [
        ({"name": "bad", "kind": "key", "pem": "not a key"}, "at /trust_anchors/0"),
        (
            {
                "name": "bad",
                "kind": "key",
                "pem": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
            },
            "at /trust_anchors/0",
        ),
    ],
    ids=["no-pem", "garbage-pem"],
)
def test_unusable_anchor_is_refused(ht: Harness, anchor: dict[str, Any], fragment: str) -> None:
    ht.service.import_policy({"version": 1})
    before = ht.service.export_policy()
    with pytest.raises(InputError) as exc:
        ht.service.import_policy({"version": 2, "trust_anchors": [anchor]})
    assert fragment in str(exc.value)
    assert ht.service.export_policy() == before
    assert ht.policy_messages()[-1]["status"] == "rejected"


# -- versions that cannot be weaponised ------------------------------------------------------------------


def test_a_remote_document_may_not_use_up_the_version_space(tmp_path: Path) -> None:
    config = from_dict(
        {
            "device": {"id": "edge-1"},
            "state": {"dir": str(tmp_path / "state")},
            "mqtt": {"url": "mqtt://127.0.0.1:1"},
        },
        "test",
    )
    store = Store(config.state_dir)
    try:
        service = Service(config, store)
        service.apply_layer(layer(3, D1), source="cli")
        with pytest.raises(PolicyError, match="jumps by") as err:
            service.apply_layer(layer(2**53 - 1, D1, enforcement=Enforcement(False)), source="mqtt:console")
        assert err.value.code == "policy-version-jump"
        assert service.layer() == layer(3, D1)  # nothing changed
        assert service.apply_layer(layer(2**53 - 1, D2), source="cli").status == "applied"  # locally, yes
        with pytest.raises(PolicyError, match="command line only"):
            service.apply_layer(layer(1, D3), source="mqtt:console", force=True)
        # a local reset recovers an exhausted version and keeps the content, the verified set and the rest
        result = service.reset_version(1)
        assert (result.version, result.status) == (1, "applied")
        assert service.layer().allowlist == layer(1, D2).allowlist
        assert service.import_policy({"version": 2, "allowlist": [{"digest": str(D3)}]}).status == "applied"
        assert service.import_policy({"version": 1}, force=True).status == "applied"  # --force: any version
        assert service.layer().version == 1
    finally:
        store.close()


def test_a_first_run_audits_until_enforcing_is_switched_on(h: Harness) -> None:
    assert h.service.first_run and h.service.effective().enforcement.mode == "audit"
    h.service.allowlist_add([D1])  # building the first policy entry by entry keeps audit mode
    assert not h.service.first_run
    assert h.service.effective().enforcement == Enforcement(True, "audit")
    h.service.set_enforcement(mode="enforce")  # the explicit step
    assert h.service.effective().enforcement == Enforcement(True, "enforce")


def test_a_configured_mode_applies_from_the_first_run(tmp_path: Path) -> None:
    harness = Harness(tmp_path, telemetry=False, mode="enforce")
    try:
        assert harness.service.effective().enforcement == Enforcement(True, "enforce")
    finally:
        harness.store.close()
