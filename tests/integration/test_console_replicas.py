"""Two console replicas, one PostgreSQL, one broker (with the shipped queue settings: a per-client queue
limit, mosquitto's default of 1000, drops what a stopped replica's session holds): telemetry shared through an MQTT shared subscription,
every message stored exactly once, a replica killed with SIGKILL mid-stream loses nothing (the broker
redelivers what it never acknowledged), and each device's inventory follows the device's own order."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support.agentproc import wait_for
from tests.support.cloud import ACCOUNT
from tests.support.consolesvc import ConsoleService
from tests.support.fixtures.mosquitto import MosquittoBroker
from tests.support.fixtures.postgres import PostgresCluster
from tests.support.simfleet import SimDevice, start_fleet

pytestmark = pytest.mark.integration

DEVICES, PER_DEVICE = 10, 150


@pytest.fixture
def replicas(
    tmp_path: Path, mosquitto_shipped: MosquittoBroker, postgres_url: str
) -> Iterator[list[ConsoleService]]:
    made = [
        ConsoleService(tmp_path, mosquitto_shipped, replica=f"r{i}", database=postgres_url) for i in (1, 2)
    ]
    try:
        yield made
    finally:
        for svc in made:
            svc.stop()


@pytest.fixture
def devices(mosquitto_shipped: MosquittoBroker) -> Iterator[list[SimDevice]]:
    host, port = mosquitto_shipped.url.removeprefix("mqtt://").rsplit(":", 1)
    fleet = start_fleet(host, int(port), ACCOUNT, [f"sim-{i:02}" for i in range(DEVICES)], ["edge"])
    try:
        yield fleet
    finally:
        for d in fleet:
            d.stop()


def test_two_replicas_store_everything_exactly_once_and_survive_a_kill(
    replicas: list[ConsoleService], devices: list[SimDevice], postgres_url: str
) -> None:
    r1, r2 = replicas
    r1.start()
    r2.start()
    db = sa.create_engine(postgres_url)

    def count(q: str) -> int:
        with db.connect() as conn:
            return int(conn.execute(sa.text(q)).scalar_one())

    wait_for(lambda: count("select count(*) from devices where online") == DEVICES, 30, 0.2)
    for i in range(PER_DEVICE):
        for d in devices:
            d.blocked(name=f"c-{i}")
        if i == PER_DEVICE // 3:
            r1.kill9()  # mid-stream: whatever it held unacknowledged comes back when it does
        if i == PER_DEVICE // 2:
            r1.start()
        if i % 10 == 0:
            time.sleep(0.05)
    expected_alerts = DEVICES * PER_DEVICE
    alerts = "select count(*) from messages where kind = 'alerts'"
    try:
        wait_for(lambda: count(alerts) == expected_alerts, 90, 0.5, what="every alert stored")
    except AssertionError:
        raise AssertionError(
            f"{count(alerts)} of {expected_alerts} alerts stored\nr1: {r1.log()[-3000:]}\nr2: {r2.log()[-3000:]}"
        ) from None
    assert count("select count(*) from messages where kind = 'verdicts'") == expected_alerts
    # each alert is counted once in the inventory, however often it arrived
    assert count("select sum(alerts) from devices") == expected_alerts
    # both replicas did some of the work: the broker shared the subscription
    assert count("select count(distinct replica) from messages where kind = 'alerts'") == 2
    # the inventory holds each device's newest decision by its own order, whatever replica stored it
    with db.connect() as conn:
        rows = conn.execute(
            sa.text("select device, last_decision from devices where device like 'sim-%'")
        ).all()
        newest = dict(
            conn.execute(
                sa.text("select device, max(seq) from messages where kind = 'verdicts' group by device")
            ).all()
        )
    for device, text in rows:
        decision = json.loads(text)
        assert decision["container"]["name"] == f"c-{PER_DEVICE - 1}", (device, decision)
        assert newest[device] >= PER_DEVICE * 2 - 1
    db.dispose()


def test_redelivered_messages_are_stored_once(
    replicas: list[ConsoleService], devices: list[SimDevice], postgres_url: str
) -> None:
    from agent.runtime.outbox import telemetry_message

    r1, _ = replicas
    r1.start()
    d = devices[0]
    alert_id = d.blocked()
    wait_for(lambda: any(a["data"]["id"] == alert_id for a in r1.get("/api/alerts?after=0")["alerts"]), 20)
    msg = next(a for a in r1.get("/api/alerts?after=0")["alerts"] if a["data"]["id"] == alert_id)
    # the same message again, as an agent re-sends it after a crash before it saw the PUBACK
    for _ in range(5):
        d.client.publish(
            d.topics.data("alerts"), d.codec.encode(telemetry_message(msg["data"], msg["seq"])), qos=1
        )
    time.sleep(2)
    assert [a["data"]["id"] for a in r1.get("/api/alerts?after=0&limit=500")["alerts"]].count(alert_id) == 1
    assert r1.get(f"/api/devices/{d.device}")["alerts"] == 1
    assert r1.get("/healthz")["ingest"]["duplicates"] >= 5


def test_a_database_outage_loses_nothing(
    replicas: list[ConsoleService], devices: list[SimDevice], postgres_cluster: PostgresCluster
) -> None:
    r1, _ = replicas
    r1.start()
    d = devices[0]

    def online() -> bool:
        r = r1.api("GET", f"/api/devices/{d.device}")
        return r.status_code == 200 and bool(r.json()["online"])

    wait_for(online, 20, 0.2, what="the device discovered")
    postgres_cluster.stop()
    try:
        sent = {d.blocked(name=f"during-outage-{i}") for i in range(50)}
        # the service says what is wrong and keeps answering; nothing is acknowledged to the broker
        wait_for(lambda: r1.api("GET", "/healthz").json()["ingest"]["db_errors"] > 0, 30, 0.2)
        r = r1.api("GET", "/api/fleet")
        assert r.status_code == 503 and "database" in r.json()["error"]
    finally:
        postgres_cluster.start()
    wait_for(
        lambda: sent <= {a["data"]["id"] for a in r1.get("/api/alerts?after=0&limit=500")["alerts"]},
        60,
        0.5,
        what="every alert sent during the outage stored",
    )
    assert r1.get(f"/api/devices/{d.device}")["alerts"] == 50
    assert "retrying (nothing is acknowledged meanwhile)" in r1.log()
    assert "the database answers again" in r1.log()
