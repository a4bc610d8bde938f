"""The console database (agent/console/fleetdb.py) on SQLite: exactly once, device order, acknowledgements.
The same code on PostgreSQL is tested in tests/integration/test_console_replicas.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.adapters.mqtt.codec import PayloadCodec
from agent.adapters.mqtt.kurapayload import KuraMessage
from agent.console.fleetdb import FleetStore, Stored
from agent.console.ingest import decode
from agent.errors import PayloadError
from agent.runtime.outbox import telemetry_message


@pytest.fixture
def store(tmp_path: Path) -> FleetStore:
    s = FleetStore(f"sqlite:///{tmp_path / 'console.db'}")
    assert s.migrate() == s.revision()
    return s


def birth(device: str, ts: int, **metrics: str) -> Stored:
    return Stored(f"h:{device}:{ts}", device, "BIRTH", ts, None, {"imageguard_groups": "g1", **metrics})


def test_a_message_is_stored_once_and_counted_once(store: FleetStore) -> None:
    alert = Stored("dev:a1", "dev", "alerts", 10, 1, {"reason": "not-allowlisted"})
    assert store.store_messages([alert], "r1") == 1
    assert store.store_messages([alert, alert], "r2") == 0
    assert store.count_messages("alerts") == 1
    assert store.device("dev")["alerts"] == 1  # type: ignore[index]


def test_inventory_keeps_the_device_order_whatever_the_arrival(store: FleetStore) -> None:
    newer = Stored("dev:v2", "dev", "verdicts", 20, 7, {"verdict": "blocked"})
    older = Stored("dev:v1", "dev", "verdicts", 20, 6, {"verdict": "allowed"})
    store.store_messages([newer], "r1")
    store.store_messages([older], "r2")
    d = store.device("dev")
    assert d is not None and d["last_decision"] == {"verdict": "blocked"} and d["decisions"] == 2
    # lifecycle: an old birth that arrives after the disconnect does not bring the device back
    store.store_messages([birth("gw", 100), Stored("h:dc", "gw", "DC", 200, None, {})], "r1")
    store.store_messages([birth("gw", 150)], "r2")
    gw = store.device("gw")
    assert gw is not None and gw["online"] is False
    store.store_messages([birth("gw", 300, imageguard_version="0.2.0")], "r1")
    gw = store.device("gw")
    assert gw is not None and gw["online"] is True and gw["agent_version"] == "0.2.0"


def test_drop_reports_raise_the_device_count(store: FleetStore) -> None:
    store.store_messages([birth("gw", 1, imageguard_outbox_dropped="3")], "r1")
    report = {"id": "x", "dropped": {"verdicts": 4}, "total": 7}
    store.store_messages([Stored("gw:x", "gw", "drops", 2, 9, report)], "r1")
    assert store.device("gw")["outbox_dropped"] == 7  # type: ignore[index]
    codec = PayloadCodec()
    m = decode(
        "acme/gw/CONTAINER-AUTH-V1/drops",
        codec.encode(telemetry_message(report)),
        account="acme",
        prefix="$EDC",
        codec=codec,
        received_ms=1,
    )
    assert m is not None and m.kind == "drops" and m.id == "gw:x"


def test_acknowledgements_answer_active_rollouts(store: FleetStore) -> None:
    row = {
        "id": "r1",
        "name": "n",
        "group_name": "g1",
        "targets": None,
        "version": 4,
        "document": {"version": 4},
        "waves": ["100%"],
        "max_rejections": 0,
        "max_alerts": 0,
        "wave_timeout": 30.0,
        "state": "running",
        "wave": 0,
        "reason": "",
        "created_by": "alice",
        "created_at": 1.0,
        "updated_at": 1.0,
        "lease_until": 0.0,
    }
    store.create_rollout(row, [("dev", 0), ("other", 0)])
    store.set_devices("r1", ["dev", "other"], state="sent")
    ack = {
        "layer": "group:g1",
        "version": 4,
        "status": "rejected",
        "reason": "policy-invalid",
        "detail": "bad",
    }
    store.store_messages([Stored("dev:p1", "dev", "policy", 5, 1, ack)], "r1")
    wrong_version = {"layer": "group:g1", "version": 3, "status": "applied"}
    store.store_messages([Stored("other:p1", "other", "policy", 5, 1, wrong_version)], "r1")
    rows = {r["device"]: r for r in store.rollout_devices("r1")}
    assert (rows["dev"]["state"], rows["dev"]["reason"]) == ("rejected", "policy-invalid: bad")
    assert rows["other"]["state"] == "sent"
    assert store.progress(["r1"]) == {"r1": {"rejected": 1, "sent": 1}}
    assert store.lease("r1", "a", 10, now=100) and not store.lease("r1", "b", 10, now=105)
    assert store.lease("r1", "b", 10, now=111)
    # what a device holds follows its applied acknowledgements, not only its last birth
    took = {"layer": "group:g1", "version": 4, "status": "applied", "policy_version": 9}
    store.store_messages([Stored("other:p2", "other", "policy", 6, 2, took)], "r1")
    other = store.device("other")
    assert other is not None and other["policy_layers"] == "group:g1=4" and other["policy_version"] == "9"
    assert store.progress(["r1"]) == {"r1": {"rejected": 1, "applied": 1}}


def test_decode_uses_the_message_id_and_sequence() -> None:
    codec = PayloadCodec()
    doc = {"id": "abc123", "time": "2026-12-01T00:00:00Z", "verdict": "blocked"}
    payload = codec.encode(telemetry_message(doc, 41))
    m = decode(
        "acme/dev/CONTAINER-AUTH-V1/verdicts",
        payload,
        account="acme",
        prefix="$EDC",
        codec=codec,
        received_ms=5,
    )
    assert m is not None and (m.id, m.device, m.kind, m.seq) == ("dev:abc123", "dev", "verdicts", 41)
    assert m.data["verdict"] == "blocked"
    # the same bytes twice are the same message; an empty birth is a will, one per arrival
    b = codec.encode(KuraMessage(timestamp_ms=9, metrics={}))
    one = decode("$EDC/acme/dev/MQTT/BIRTH", b, account="acme", prefix="$EDC", codec=codec, received_ms=1)
    two = decode("$EDC/acme/dev/MQTT/BIRTH", b, account="acme", prefix="$EDC", codec=codec, received_ms=2)
    assert one is not None and two is not None and one.id == two.id
    lwt = decode("$EDC/acme/dev/MQTT/BIRTH", b"", account="acme", prefix="$EDC", codec=codec, received_ms=3)
    assert lwt is not None and lwt.kind == "LWT"
    assert decode("other/topic", b, account="acme", prefix="$EDC", codec=codec, received_ms=1) is None
    assert (
        decode(
            "acme/dev/CONTAINER-AUTH-V1/nope", b, account="acme", prefix="$EDC", codec=codec, received_ms=1
        )
        is None
    )
    with pytest.raises(PayloadError):
        decode(
            "acme/dev/CONTAINER-AUTH-V1/alerts",
            b"\xff\x00garbage",
            account="acme",
            prefix="$EDC",
            codec=codec,
            received_ms=1,
        )


def test_an_older_database_is_migrated_with_its_data(tmp_path: Path) -> None:
    import sqlalchemy as sa

    old = FleetStore(f"sqlite:///{tmp_path / 'old.db'}")
    assert old.migrate("0001") == "0001"
    with old.engine.begin() as conn:  # a rollout written by the first schema
        conn.execute(
            sa.text(
                "insert into rollouts (id, name, group_name, version, document, waves, wave_timeout, state, wave,"
                " reason, created_by, created_at, updated_at, lease_until)"
                " values ('r1', 'n', 'g', 1, '{}', '[]', 30, 'completed', 0, '', 'alice', 1, 1, 0)"
            )
        )
    old.close()
    new = FleetStore(f"sqlite:///{tmp_path / 'old.db'}")
    assert new.migrate() == new.revision() != "0001"
    rollout = new.rollout("r1")
    assert rollout is not None and rollout["soak_seconds"] == 0 and rollout["created_by"] == "alice"
