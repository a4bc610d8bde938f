"""The MQTT adapter against a real mosquitto: TLS + password, lifecycle certificates, LWT, reconnect,
request/response round trips (JSON via mosquitto_pub, protobuf via paho), PUBACK-driven publish handles."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.mqtt.birth import AgentInfo, DeviceFacts, birth_message, disconnect_message
from agent.adapters.mqtt.codec import PayloadCodec
from agent.adapters.mqtt.connection import MqttConnection, device_subscriptions
from agent.adapters.mqtt.kurapayload import KuraMessage, MetricType, MetricValue, encode_protobuf
from agent.adapters.mqtt.requests import Dispatcher, Request, Response
from agent.adapters.mqtt.topics import Topics
from agent.config import MqttConfig
from tests.support.fixtures.mosquitto import MosquittoBroker, MqttProbe

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
PROTO = REPO / "agent" / "adapters" / "mqtt" / "kurapayload.proto"
TOPICS = Topics(account="acme", device_id="dev-1")
AGENT = AgentInfo(display_name="Device One", groups=("line-a",), policy_version="3")

ProbeFactory = Callable[..., MqttProbe]


def _config(broker: MosquittoBroker, **overrides: object) -> MqttConfig:
    cfg = MqttConfig(
        url=broker.url,
        account="acme",
        reconnect_min_seconds=0.2,
        reconnect_max_seconds=1.0,
        keepalive_seconds=10,
    )
    if broker.tls:
        cfg = replace(
            cfg, username="dev-1", password_file=broker.password_file("dev-1"), ca_bundle=broker.tls.ca_cert
        )
    return replace(cfg, **overrides)  # type: ignore[arg-type]


def _echo(request: Request) -> Response:
    return Response.of_json(
        {"resource": list(request.resource), "params": dict(request.params), "body": request.json}
    )


ROUTES = {("GET", ("things", "{name}")): _echo, ("PUT", ("things", "{name}")): _echo}


class Agent:
    """What the composition root will do: connection + dispatcher + lifecycle certificates."""

    def __init__(self, config: MqttConfig) -> None:
        self.fleet: list[tuple[str, bytes]] = []
        codec = PayloadCodec.from_config(config)
        self.conn: MqttConnection
        self.dispatcher = Dispatcher(TOPICS, ROUTES, lambda t, p: self.conn.publish(t, p, qos=0), codec=codec)
        self.conn = MqttConnection(
            config,
            TOPICS,
            subscriptions=device_subscriptions(
                TOPICS, AGENT.groups, self.dispatcher.handle, lambda g, t, p: self.fleet.append((g, p))
            ),
            birth=lambda: birth_message(
                DeviceFacts(os="Linux"),
                replace(AGENT, payload_encoding=codec.birth_name),
                uptime_ms=1,
                now_ms=2,
            ),
            disconnect=lambda: disconnect_message(AGENT, uptime_ms=3, now_ms=4),
            codec=codec,
        )


@pytest.fixture
def make_agent() -> Iterator[Callable[[MqttConfig], Agent]]:
    agents: list[Agent] = []

    def make(config: MqttConfig) -> Agent:
        agent = Agent(config)
        agents.append(agent)
        agent.conn.start()
        assert agent.conn.wait_connected(10), "agent did not connect"
        return agent

    yield make
    for agent in agents:
        agent.conn.stop(timeout=2)


def _gunzip(data: bytes) -> bytes:
    return zlib.decompress(data, 31) if data.startswith(b"\x1f\x8b") else data


def _protoc_decode(data: bytes) -> str:
    out = subprocess.run(
        ["protoc", f"--proto_path={PROTO.parent}", "--decode", "kuradatatypes.KuraPayload", PROTO.name],
        input=_gunzip(data),
        capture_output=True,
        check=True,
    )
    return out.stdout.decode()


def _sub(broker: MosquittoBroker, user: str | None, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["mosquitto_sub", *broker.cli(user), *args], capture_output=True, timeout=30, check=True
    )


def test_tls_password_birth_decoded_by_protoc_and_dc_on_stop(
    mosquitto_tls: MosquittoBroker,
    make_agent: Callable[[MqttConfig], Agent],
    mqtt_probe_factory: ProbeFactory,
) -> None:
    birth, dc = TOPICS.lifecycle("BIRTH"), TOPICS.lifecycle("DC")
    # a persistent console session registered before the device connects: nothing can race past it
    session = ["-c", "-i", "console-birth", "-q", "1"]
    _sub(mosquitto_tls, "console", *session, "-t", birth, "-t", dc, "-E")
    agent = make_agent(_config(mosquitto_tls))
    raw = _sub(mosquitto_tls, "console", *session, "-t", birth, "-t", dc, "-C", "1", "-N", "-W", "10").stdout
    text = _protoc_decode(raw)
    assert 'name: "application_ids"\n  type: STRING\n  string_value: "CONTAINER-AUTH-V1"' in text
    assert 'name: "display_name"' in text and 'string_value: "Device One"' in text
    assert 'name: "payload_encoding"' in text and 'string_value: "KURA_PROTOBUF"' in text
    assert 'name: "imageguard_groups"' in text and 'string_value: "line-a"' in text

    probe = mqtt_probe_factory(mosquitto_tls, "console", "console-live")
    probe.subscribe(dc)  # DC is QoS 0: only a connected subscriber gets it
    agent.conn.stop()
    text = _protoc_decode(probe.expect(dc).payload)
    assert 'name: "uptime"' in text and 'name: "display_name"' in text and 'name: "os"' not in text


def test_wrong_password_never_connects(mosquitto_tls: MosquittoBroker, tmp_path: Path) -> None:
    bad = tmp_path / "bad.secret"
    bad.write_text("wrong\n")
    conn = MqttConnection(
        _config(mosquitto_tls, password_file=bad),
        TOPICS,
        subscriptions=[],
        birth=KuraMessage,
        disconnect=KuraMessage,
    )
    conn.start()
    try:
        assert not conn.wait_connected(2)
    finally:
        conn.stop(timeout=1)
    assert (
        "not authorised" in mosquitto_tls.log() or "bad user name or password" in mosquitto_tls.log().lower()
    )


_CHILD = """
import sys, time
from pathlib import Path
from agent.config import MqttConfig
from agent.adapters.mqtt.connection import MqttConnection
from agent.adapters.mqtt.kurapayload import KuraMessage
from agent.adapters.mqtt.topics import Topics
conn = MqttConnection(MqttConfig(url=sys.argv[1], account="acme"), Topics(account="acme", device_id="dev-1"),
                      subscriptions=[], birth=lambda: KuraMessage(body=b"up"), disconnect=KuraMessage)
conn.start()
assert conn.wait_connected(10)
print("connected", flush=True)
time.sleep(60)
"""


def test_the_broker_clears_the_retained_birth_when_the_agent_dies(
    mosquitto: MosquittoBroker, mqtt_probe_factory: ProbeFactory
) -> None:
    probe = mqtt_probe_factory(mosquitto)
    probe.subscribe("$EDC/acme/dev-1/MQTT/#")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, mosquitto.url], cwd=REPO, stdout=subprocess.PIPE, env={**os.environ}
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"connected\n"
        while not probe.expect(TOPICS.lifecycle("BIRTH")).payload:
            pass  # an earlier test's device of the same id said goodbye: this child's birth follows
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        gone = probe.expect(TOPICS.lifecycle("BIRTH"))  # the will: an empty retained birth
        assert gone.payload == b""
        assert probe.nothing_on(TOPICS.lifecycle("DC"), 0.3)
        # and a subscriber that comes later finds no birth: the device is not online
        later = mqtt_probe_factory(mosquitto, client_id="probe-later")
        later.subscribe(TOPICS.lifecycle("BIRTH"))
        assert later.nothing_on(TOPICS.lifecycle("BIRTH"), 1.0)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)
        if child.stdout:
            child.stdout.close()


def test_clean_stop_sends_dc_and_no_lwt(
    mosquitto: MosquittoBroker, make_agent: Callable[[MqttConfig], Agent], mqtt_probe_factory: ProbeFactory
) -> None:
    probe = mqtt_probe_factory(mosquitto)
    probe.subscribe("$EDC/acme/dev-1/MQTT/#")
    agent = make_agent(_config(mosquitto))
    probe.expect(TOPICS.lifecycle("BIRTH"))
    later = mqtt_probe_factory(mosquitto, client_id="probe-later")
    later.subscribe(TOPICS.lifecycle("BIRTH"))
    assert later.expect(TOPICS.lifecycle("BIRTH")).payload, "a console that starts later finds it online"
    agent.conn.stop()
    dc = PayloadCodec().decode(probe.expect(TOPICS.lifecycle("DC")).payload)
    assert set(dc.metrics) == {"uptime", "display_name"}
    assert probe.expect(TOPICS.lifecycle("BIRTH")).payload == b""  # no longer online
    assert probe.nothing_on(TOPICS.lifecycle("LWT"), 1.0)


def _json_request(broker: MosquittoBroker, probe: MqttProbe, path: str, request_id: str, body: object) -> Any:
    """Send a JSON request with mosquitto_pub (an independent client); the reply is parsed with json."""
    doc = {"metrics": {"request.id": request_id, "requester.client.id": "tool"}, "body_json": body}
    topic = f"{TOPICS.control_base}/{path}"
    subprocess.run(
        ["mosquitto_pub", *broker.cli(), "-t", topic, "-q", "1", "-m", json.dumps(doc)],
        check=True,
        timeout=10,
    )
    return json.loads(probe.expect(TOPICS.reply("tool", request_id)).payload)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_json_round_trip_with_mosquitto_pub(
    mosquitto: MosquittoBroker,
    make_agent: Callable[[MqttConfig], Agent],
    mqtt_probe_factory: ProbeFactory,
    protocol: str,
) -> None:
    make_agent(_config(mosquitto, encoding="json", protocol=protocol))
    probe = mqtt_probe_factory(mosquitto, client_id="tool")
    probe.subscribe(TOPICS.reply_filter("tool"))
    reply = _json_request(mosquitto, probe, "PUT/things/t1", "r-1", {"a": 1})
    assert reply["metrics"]["response.code"] == {"type": "INT32", "value": 200}
    body = json.loads(base64.b64decode(str(reply["body"])))
    assert body == {"resource": ["things", "t1"], "params": {"name": "t1"}, "body": {"a": 1}}
    missing = _json_request(mosquitto, probe, "GET/nothing", "r-2", None)
    assert missing["metrics"]["response.code"] == {"type": "INT32", "value": 404}
    assert missing["metrics"]["response.exception.message"] == "no resource 'nothing'"


def test_protobuf_round_trip(
    mosquitto: MosquittoBroker, make_agent: Callable[[MqttConfig], Agent], mqtt_probe_factory: ProbeFactory
) -> None:
    agent = make_agent(_config(mosquitto))
    probe = mqtt_probe_factory(mosquitto, client_id="console")
    probe.subscribe(TOPICS.reply_filter("console"))
    ids = {"request.id": MetricValue.string("-123"), "requester.client.id": MetricValue.string("console")}
    probe.publish(TOPICS.request("GET", "things", "x"), encode_protobuf(KuraMessage(metrics=ids)))
    msg = probe.expect(TOPICS.reply("console", "-123"))
    assert msg.qos == 0 and not msg.retain
    reply = PayloadCodec().decode(msg.payload)
    code = reply.metrics["response.code"]
    assert (code.type, code.value) == (MetricType.INT32, 200)
    assert json.loads(reply.body or b"")["params"] == {"name": "x"}
    # a request without ids is dropped and counted, not answered
    probe.publish(TOPICS.request("GET", "things", "x"), encode_protobuf(KuraMessage()))
    deadline = time.monotonic() + 5
    while agent.dispatcher.stats.dropped == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.dispatcher.stats.dropped == 1
    # fleet policy topics of the device's groups reach the fleet handler
    probe.publish(TOPICS.fleet_policy("line-a"), b"layer")
    probe.publish(TOPICS.fleet_policy("line-b"), b"not ours")
    deadline = time.monotonic() + 5
    while not agent.fleet and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    assert agent.fleet == [("line-a", b"layer")]


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_reconnect_after_broker_restart(
    mosquitto: MosquittoBroker,
    make_agent: Callable[[MqttConfig], Agent],
    mqtt_probe_factory: ProbeFactory,
    protocol: str,
) -> None:
    agent = make_agent(_config(mosquitto, protocol=protocol))
    assert agent.conn.connect_count == 1
    mosquitto.stop()
    deadline = time.monotonic() + 5
    while agent.conn.is_connected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not agent.conn.is_connected
    mosquitto.start()
    assert agent.conn.wait_connected(10)
    assert agent.conn.connect_count == 2
    probe = mqtt_probe_factory(mosquitto, client_id="console")
    probe.subscribe(TOPICS.reply_filter("console"))
    ids = {"request.id": MetricValue.string("after"), "requester.client.id": MetricValue.string("console")}
    probe.publish(TOPICS.request("GET", "things", "y"), encode_protobuf(KuraMessage(metrics=ids)))
    reply = PayloadCodec().decode(probe.expect(TOPICS.reply("console", "after")).payload)
    assert reply.integer("response.code") == 200


def test_publish_handle_completes_only_after_broker_ack(
    mosquitto: MosquittoBroker, make_agent: Callable[[MqttConfig], Agent]
) -> None:
    topic = TOPICS.data("verdicts")
    session = ["-c", "-i", "console-data", "-q", "1", "-t", topic]
    _sub(mosquitto, None, *session, "-E")  # persistent subscriber, survives the broker restart
    agent = make_agent(_config(mosquitto))
    fired: list[bool] = []
    first = agent.conn.publish(topic, b"v1")
    assert first.wait(5) and first.error is None

    mosquitto.stop()
    deadline = time.monotonic() + 5
    while agent.conn.is_connected and time.monotonic() < deadline:
        time.sleep(0.05)
    handle = agent.conn.publish(topic, b"v2")
    handle.add_done_callback(lambda h: fired.append(h.acked))
    assert not handle.wait(1.0) and not handle.done() and fired == []
    assert agent.conn.in_flight == 1

    mosquitto.start()
    assert handle.wait(10) and fired == [True] and agent.conn.in_flight == 0
    got = _sub(mosquitto, None, *session, "-C", "2", "-W", "10").stdout.split()
    assert got == [b"v1", b"v2"]


def test_publish_window_is_bounded(
    mosquitto: MosquittoBroker, make_agent: Callable[[MqttConfig], Agent]
) -> None:
    from agent.errors import PublishWindowFull

    agent = make_agent(_config(mosquitto))
    agent.conn._max_in_flight = 3  # small window for the test
    mosquitto.stop()
    while agent.conn.is_connected:
        time.sleep(0.05)
    handles = [agent.conn.publish(TOPICS.data("alerts"), b"x") for _ in range(3)]
    with pytest.raises(PublishWindowFull):
        agent.conn.publish(TOPICS.data("alerts"), b"x")
    agent.conn.publish(TOPICS.data("alerts"), b"qos0", qos=0)  # QoS 0 is not counted (and is lost offline)
    mosquitto.start()
    assert all(h.wait(10) for h in handles)
    agent.conn.publish(TOPICS.data("alerts"), b"x").wait(5)
