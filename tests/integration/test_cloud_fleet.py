"""Fleet policy layers on a real broker: a retained group layer reaches an agent that starts later, and every
outcome (applied, unchanged, rollback, malformed, wrongly targeted) is acknowledged on .../policy."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from agent.core.schemas import validate
from tests.support.agentproc import AgentProcess
from tests.support.cloud import (
    ACCOUNT,
    APP,
    DEVICE,
    Console,
    Decoded,
    agent_config,
    decode_payload,
    encode_request,
    make_broker,
    publish,
    sub_argv,
)
from tests.support.dockerd import Dockerd
from tests.support.fixtures.docker import OTHER
from tests.support.fixtures.mosquitto import MosquittoBroker

pytestmark = pytest.mark.integration

POLICY_ACKS = f"{ACCOUNT}/{DEVICE}/{APP}/policy"
FLEET = f"$EDC/{ACCOUNT}/fleet/g1/{APP}/policy"


class Stream:
    """A long-running mosquitto_sub whose messages are read one at a time."""

    def __init__(self, broker: MosquittoBroker, topic: str) -> None:
        self.proc = subprocess.Popen(sub_argv(broker, topic, "PAYLOAD %x"), stdout=subprocess.PIPE)
        self.lines: queue.Queue[str] = queue.Queue()
        subscribed = threading.Event()

        def pump() -> None:
            assert self.proc.stdout is not None
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                if "SUBACK" in line:
                    subscribed.set()
                elif line.startswith("PAYLOAD "):
                    self.lines.put(line[len("PAYLOAD ") :])

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        assert subscribed.wait(10), "mosquitto_sub did not subscribe"

    def next(self, timeout: float = 20) -> Decoded:
        return decode_payload(bytes.fromhex(self.lines.get(timeout=timeout)))

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._pump.join(10)  # it reads until EOF
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def layer_payload(doc: Any) -> bytes:
    """A fleet layer as the JSON KuraPayload a console publishes (body = the layer document)."""
    return json.dumps({"metrics": {}, "body_json": doc}).encode()


def expect_ack(stream: Stream, version: int, status: str, reason: str | None = None) -> dict[str, Any]:
    ack = stream.next().body
    validate(ack, "policy-event", "policy acknowledgement")
    assert (ack["layer"], ack["version"], ack["status"]) == ("group:g1", version, status), ack
    assert ack.get("reason") == reason, ack
    return ack  # type: ignore[no-any-return]


def test_retained_group_layer_and_every_outcome_acknowledged(
    tmp_path: Path, engine: Dockerd, busybox_images: dict[str, str]
) -> None:
    broker = make_broker(tmp_path / "broker")
    other_id = busybox_images[OTHER]
    layer = {"version": 2, "target": {"group": "g1"}, "allowlist": [{"digest": other_id, "comment": "fleet"}]}
    publish(broker, FLEET, layer_payload(layer), "-r")  # retained, before the device exists
    acks = Stream(broker, POLICY_ACKS)
    lifecycle = Stream(broker, f"$EDC/{ACCOUNT}/{DEVICE}/MQTT/+")
    config = agent_config(tmp_path, engine, broker, device={"id": DEVICE, "groups": ["g1"]})
    agent = AgentProcess(config, tmp_path / "agent.log")
    try:
        agent.start()
        birth = lifecycle.next().metrics
        assert birth["application_ids"] == APP and birth["imageguard_groups"] == "g1"
        assert birth["imageguard_outbox_dropped"] == "0" and "imageguard_policy_version" in birth
        applied = expect_ack(acks, 2, "applied")
        assert applied["source"] == "fleet:g1"
        # the retained birth is published again with the new versions, so a console starting later sees them
        assert "group:g1=2" in lifecycle.next().metrics["imageguard_policy_layers"]
        engine.docker("run", "-d", "--name", "fleet-allowed", OTHER)  # allowed by the group layer only
        agent.wait_log("allowed container fleet-allowed")

        publish(broker, FLEET, layer_payload({**layer, "version": 1}))
        expect_ack(acks, 1, "rejected", "policy-rollback")
        # protobuf works too (built by protoc, not by our encoder)
        publish(broker, FLEET, encode_request(None, {**layer, "version": 2}, "kura-protobuf"))
        expect_ack(acks, 2, "unchanged")
        publish(broker, FLEET, b"\x0a\xff\xff garbage")
        expect_ack(acks, -1, "rejected", "invalid-payload")
        publish(broker, FLEET, layer_payload({**layer, "version": 3, "enforcement": {"mode": "audit"}}))
        expect_ack(acks, 3, "rejected", "invalid-policy")
        publish(broker, FLEET, layer_payload({**layer, "version": 4, "target": {"group": "g2"}}))
        expect_ack(acks, 4, "rejected", "wrong-target")

        c = Console(broker, "json")
        held = c.ok("get-policy.reply", "GET", "policy", body={"layer": "group:g1"})
        assert held["version"] == 2 and held["allowlist"] == [{"digest": other_id, "comment": "fleet"}]
        status = c.ok("get-status.reply", "GET", "status")
        assert status["counters"]["fleet_rejected"] == 3  # malformed, enforcement, wrong target
        assert status["policy"]["layers"] == {"group:g1": 2}
        assert engine.docker("inspect", "fleet-allowed", check=False).returncode == 0
        assert agent.stop() == 0
        assert set(lifecycle.next().metrics) == {"uptime", "display_name"}  # MQTT/DC on a clean stop
    finally:
        lifecycle.close()
        acks.close()
        if agent.proc is not None:
            agent.stop()
        broker.stop()
