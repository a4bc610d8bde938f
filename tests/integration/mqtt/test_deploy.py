"""deploy/mosquitto: the shipped broker config starts, and the generated ACL confines each device."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.adapters.mqtt.connection import MqttConnection, device_subscriptions
from agent.adapters.mqtt.kurapayload import KuraMessage
from agent.adapters.mqtt.topics import Topics
from agent.config import MqttConfig
from tests.support.fixtures.mosquitto import HOST, MOSQUITTO, MosquittoBroker, MqttProbe, TlsFiles
from tests.support.ports import free_port

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[3] / "deploy" / "mosquitto"


def test_shipped_config_starts(tmp_path: Path, mqtt_tls_files: TlsFiles) -> None:
    port = free_port()
    (tmp_path / "passwd").write_text("")
    (tmp_path / "acl").write_text(
        subprocess.run(
            [sys.executable, str(DEPLOY / "gen-acl.py"), str(DEPLOY / "inventory.example")],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    for f in ("passwd", "acl"):
        (tmp_path / f).chmod(0o600)
    replacements = {
        "listener": f"listener {port} {HOST}",
        "cafile": f"cafile {mqtt_tls_files.ca_cert}",
        "certfile": f"certfile {mqtt_tls_files.server_cert}",
        "keyfile": f"keyfile {mqtt_tls_files.server_key}",
        "password_file": f"password_file {tmp_path / 'passwd'}",
        "acl_file": f"acl_file {tmp_path / 'acl'}",
        "persistence_location": f"persistence_location {tmp_path}/",
    }
    lines = []
    for line in (DEPLOY / "mosquitto.conf").read_text().splitlines():
        key = line.split(" ", 1)[0]
        lines.append(replacements.get(key, line))
    lines += ["user root", f"log_dest file {tmp_path / 'log'}"]
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                socket.create_connection((HOST, port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "shipped mosquitto.conf did not start"
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


def test_generated_acl_confines_devices(
    tmp_path: Path,
    mosquitto_factory: Callable[..., MosquittoBroker],
    mqtt_probe_factory: Callable[..., MqttProbe],
) -> None:
    inventory = tmp_path / "inventory"
    inventory.write_text("dev-1 line-a\ndev-2 line-b\n")
    acl = subprocess.run(
        [
            sys.executable,
            str(DEPLOY / "gen-acl.py"),
            "--account",
            "acme",
            "--console",
            "console",
            str(inventory),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    users = {"dev-1": "p1", "dev-2": "p2", "console": "pc"}
    broker = mosquitto_factory(tls=True, users=users, acl=acl)
    t1 = Topics(account="acme", device_id="dev-1")
    received: list[str] = []
    assert broker.tls is not None
    conn = MqttConnection(
        MqttConfig(
            url=broker.url,
            account="acme",
            username="dev-1",
            password_file=broker.password_file("dev-1"),
            ca_bundle=broker.tls.ca_cert,
        ),
        t1,
        subscriptions=device_subscriptions(
            t1, ["line-a"], lambda t, p: received.append(t), lambda g, t, p: received.append(t)
        ),
        birth=KuraMessage,
        disconnect=KuraMessage,
    )
    console = mqtt_probe_factory(broker, "console", "console")
    console.subscribe("$EDC/acme/#")
    console.subscribe("acme/#")
    conn.start()
    try:
        assert conn.wait_connected(10)
        console.expect(t1.lifecycle("BIRTH"))  # allowed: own lifecycle
        assert conn.publish(t1.data("verdicts"), b"mine").wait(5)
        assert console.expect(t1.data("verdicts")).payload == b"mine"
        # writing another device's telemetry is refused (MQTT 3.1.1: silently dropped by the broker)
        conn.publish("acme/dev-2/CONTAINER-AUTH-V1/verdicts", b"forged").wait(5)
        assert console.nothing_on("acme/dev-2/CONTAINER-AUTH-V1/verdicts", 0.5)
        # replies to a console are allowed
        conn.publish(t1.reply("console", "9"), b"r", qos=0)
        console.expect(t1.reply("console", "9"))
        # the console reaches the device's control topic and its group's fleet topic, not another group's
        dev2 = mqtt_probe_factory(broker, "dev-2", "dev-2")
        dev2.subscribe(t1.control_filter)  # SUBACK arrives, but the ACL denies every message
        console.publish(t1.request("GET", "x"), b"req")
        console.publish(t1.fleet_policy("line-a"), b"a")
        console.publish(t1.fleet_policy("line-b"), b"b")
        deadline = time.monotonic() + 5
        while len(received) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert sorted(received) == sorted([t1.request("GET", "x"), t1.fleet_policy("line-a")])
        assert dev2.nothing_on(t1.request("GET", "x"), 0.3)
    finally:
        conn.stop(timeout=2)
