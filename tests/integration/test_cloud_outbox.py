"""Store-and-forward: alerts survive a broker outage and an agent restart, and arrive once each, in order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.agentproc import AgentProcess, cli, wait_for
from tests.support.cloud import ACCOUNT, APP, DEVICE, Subscriber, agent_config, decode_payload, make_broker
from tests.support.dockerd import Dockerd
from tests.support.fixtures.docker import OTHER

pytestmark = pytest.mark.integration

ALERTS = f"{ACCOUNT}/{DEVICE}/{APP}/alerts"
PROBE = ["-c", "-i", "alerts-probe", "-q", "1"]  # a persistent session: the broker queues for it


def run_unlisted(engine: Dockerd, agent: AgentProcess, names: list[str]) -> None:
    for name in names:
        engine.run_untrusted("-d", "--name", name, OTHER)
        agent.wait_log(f"blocked container {name}")
        wait_for(lambda n=name: engine.docker("inspect", n, check=False).returncode != 0, 15)  # type: ignore[misc]


def test_alerts_survive_broker_outage_and_agent_restart(
    tmp_path: Path, engine: Dockerd, busybox_images: dict[str, str]
) -> None:
    broker = make_broker(tmp_path / "broker")
    config = agent_config(tmp_path, engine, broker, encoding="kura-protobuf")
    agent = AgentProcess(config, tmp_path / "agent.log")
    try:
        # the probe's session and subscription exist before the outage; it is offline from here on
        Subscriber(broker, ALERTS, *PROBE, "-E").messages()
        agent.start()
        agent.wait_log("mqtt: connected")
        broker.stop()
        agent.wait_log("mqtt: connection lost")

        names = [f"unlisted-{i}" for i in range(10)]
        run_unlisted(engine, agent, names[:5])
        assert agent.stop() == 0
        queued = json.loads(cli(config, "status", "--json").stdout)["outbox"]["queued"]
        assert queued >= 5 * 2  # a verdict and an alert each, kept across the restart
        agent.start()
        run_unlisted(engine, agent, names[5:])

        broker.start()
        got = Subscriber(broker, ALERTS, *PROBE, "-C", "10", "-W", "30").messages(timeout=60)
        alerts = [decode_payload(payload) for _, payload in got]
        assert [a.body["container"]["name"] for a in alerts] == names
        assert len({a.body["id"] for a in alerts}) == 10
        for a in alerts:
            assert a.body["alert"] == "container-blocked" and a.body["device"] == DEVICE
            assert a.metrics["container.name"] == a.body["container"]["name"]  # metrics carry the key fields
        wait_for(lambda: json.loads(cli(config, "status", "--json").stdout)["outbox"]["queued"] == 0, 20)
        # nothing more is coming: no duplicates
        extra = Subscriber(broker, ALERTS, *PROBE, "-W", "2").messages(timeout=20)
        assert extra == []
    finally:
        if agent.proc is not None:
            agent.stop()
        broker.stop()
