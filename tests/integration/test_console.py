"""``imageguard console`` against a real mosquitto and a stub device (a fake peer that answers by resource).

The round trips with the real agent are in test_console_agent.py; here the peer is scripted so that every
response code and the no-reply case can be produced on purpose.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.mqtt.codec import PayloadCodec
from agent.adapters.mqtt.kurapayload import KuraMessage, MetricValue
from agent.adapters.mqtt.requests import REQUEST_ID, REQUESTER, RESPONSE_CODE, RESPONSE_MESSAGE
from tests.support.agentproc import cli, write_config
from tests.support.fixtures.mosquitto import MosquittoBroker, MqttProbe

pytestmark = pytest.mark.integration

ACCOUNT = "acme"
CODES = {"ok": 200, "bad": 400, "forbidden": 403, "missing": 404, "boom": 500}


class StubDevice:
    """Answers requests on its control topic: the first resource level picks the response code; the reply
    body echoes what was asked. ``silent`` gets no answer."""

    def __init__(self, probe: MqttProbe, device: str, encoding: str = "kura-protobuf") -> None:
        self.probe, self.device = probe, device
        self.codec = PayloadCodec(encoding=encoding)  # type: ignore[arg-type]
        self.seen: list[tuple[str, KuraMessage]] = []
        self._stop = threading.Event()
        probe.subscribe(f"$EDC/{ACCOUNT}/{device}/CONTAINER-AUTH-V1/#")
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.probe.expect(timeout=0.2)
            except AssertionError:
                continue
            request = self.codec.decode(bytes(msg.payload))
            self.seen.append((msg.topic, request))
            method, resource = msg.topic.split("/")[4], msg.topic.split("/")[5:]
            if resource[0] == "silent":
                continue
            code = CODES[resource[0]]
            body = {
                "method": method,
                "resource": resource,
                "body": request.body.decode() if request.body else None,
            }
            metrics = {RESPONSE_CODE: MetricValue.int32(code)}
            if code != 200:
                metrics[RESPONSE_MESSAGE] = MetricValue.string(f"stub says {code}")
            reply = KuraMessage(1, metrics, json.dumps(body).encode())
            topic = f"$EDC/{ACCOUNT}/{request.string(REQUESTER)}/CONTAINER-AUTH-V1/REPLY/{request.string(REQUEST_ID)}"
            self.probe.client.publish(topic, self.codec.encode(reply), 0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def stub(mosquitto: MosquittoBroker, mqtt_probe_factory: Callable[..., MqttProbe]) -> Iterator[StubDevice]:
    device = StubDevice(mqtt_probe_factory(mosquitto, client_id="stub-dev"), "dev-9")
    yield device
    device.stop()


def console_config(tmp_path: Path, broker: MosquittoBroker, **mqtt: Any) -> Path:
    return write_config(
        tmp_path / "console.toml",
        {
            "device": {"id": "console-1"},
            "state": {"dir": str(tmp_path / "console-state")},
            "mqtt": {"url": broker.url, "account": ACCOUNT, **mqtt},
        },
    )


@pytest.mark.parametrize(
    ("resource", "exit_code"), [("ok", 0), ("bad", 2), ("forbidden", 2), ("missing", 1), ("boom", 1)]
)
def test_request_prints_the_reply_and_exits_by_response_code(
    tmp_path: Path, mosquitto: MosquittoBroker, stub: StubDevice, resource: str, exit_code: int
) -> None:
    config = console_config(tmp_path, mosquitto)
    out = cli(config, "console", "request", "dev-9", "get", f"{resource}/sub", "--json")
    assert out.returncode == exit_code, out.stderr
    reply = json.loads(out.stdout)
    assert reply["response.code"] == CODES[resource]
    assert reply["body"] == {"method": "GET", "resource": [resource, "sub"], "body": None}
    if exit_code:
        assert reply["response.exception.message"] == f"stub says {CODES[resource]}"
    topic, request = stub.seen[-1]
    assert topic == f"$EDC/{ACCOUNT}/dev-9/CONTAINER-AUTH-V1/GET/{resource}/sub"
    assert request.string(REQUESTER) == "console-1" and request.string(REQUEST_ID)


def test_request_sends_the_body_file_in_the_configured_encoding(
    tmp_path: Path, mosquitto: MosquittoBroker, stub: StubDevice
) -> None:
    config = console_config(tmp_path, mosquitto, encoding="json")
    body = tmp_path / "body.json"
    body.write_text('{"digests": ["sha256:aa"]}')
    out = cli(config, "console", "request", "dev-9", "POST", "ok", "--body", str(body))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("response.code: 200\n")
    assert json.loads(out.stdout.split("\n", 1)[1])["body"] == '{"digests": ["sha256:aa"]}'
    raw_topic, request = stub.seen[-1]
    assert raw_topic.endswith("/POST/ok") and request.body == body.read_bytes()


def test_request_without_reply_times_out_with_exit_3(
    tmp_path: Path, mosquitto: MosquittoBroker, stub: StubDevice
) -> None:
    config = console_config(tmp_path, mosquitto)
    out = cli(config, "console", "request", "dev-9", "GET", "silent", "--timeout", "0.5")
    assert out.returncode == 3  # could not check
    assert "no reply from dev-9 to GET silent within 0.5s" in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["request", "dev-9", "GET", "a/+/b"], "no + or #"),
        (["request", "dev+", "GET", "status"], "cannot be an MQTT topic level"),
        (["request", "dev-9", "GET", "status", "--body", "/nonexistent"], "cannot read"),
    ],
)
def test_bad_request_arguments_exit_2(
    tmp_path: Path, mosquitto: MosquittoBroker, args: list[str], message: str
) -> None:
    out = cli(console_config(tmp_path, mosquitto), "console", *args)
    assert out.returncode == 2 and message in out.stderr


def test_unreachable_broker_is_a_clear_error(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    url = mosquitto.url
    mosquitto.stop()
    config = write_config(
        tmp_path / "c.toml", {"device": {"id": "console-1"}, "mqtt": {"url": url, "account": ACCOUNT}}
    )
    out = cli(config, "console", "request", "dev-9", "GET", "status")
    assert out.returncode == 3 and "cannot reach the broker" in out.stderr  # could not check


def test_console_over_tls_with_a_password(
    tmp_path: Path, mosquitto_tls: MosquittoBroker, mqtt_probe_factory: Callable[..., MqttProbe]
) -> None:
    stub = StubDevice(mqtt_probe_factory(mosquitto_tls, user="dev-1", client_id="dev-1"), "dev-1")
    try:
        config = console_config(
            tmp_path,
            mosquitto_tls,
            username="console",
            password_file=str(mosquitto_tls.password_file("console")),
            ca_bundle=str(mosquitto_tls.tls.ca_cert) if mosquitto_tls.tls else "",
        )
        out = cli(config, "console", "request", "dev-1", "GET", "ok")
        assert out.returncode == 0, out.stderr
    finally:
        stub.stop()


def _telemetry(probe: MqttProbe, device: str, kind: str, doc: dict[str, Any]) -> None:
    msg = KuraMessage(1, {}, json.dumps(doc).encode())
    probe.publish(f"{ACCOUNT}/{device}/CONTAINER-AUTH-V1/{kind}", PayloadCodec().encode(msg))


def test_watch_prints_json_lines_and_filters_alerts(
    tmp_path: Path, mosquitto: MosquittoBroker, mqtt_probe_factory: Callable[..., MqttProbe]
) -> None:
    import subprocess
    import sys

    from tests.support.agentproc import REPO, wait_for

    config = console_config(tmp_path, mosquitto)
    probe = mqtt_probe_factory(mosquitto, client_id="dev-5")
    procs = {}
    errs = {}
    WATCH = [sys.executable, "-m", "agent", "--config"]
    for name, extra in (("all", []), ("alerts", ["--alerts-only"])):
        errs[name] = tmp_path / f"watch-{name}.err"
        with open(errs[name], "w") as err:
            procs[name] = subprocess.Popen(
                [
                    *WATCH,
                    str(config),
                    "console",
                    "watch",
                    "--json",
                    "--count",
                    "2",
                    "--duration",
                    "20",
                    *extra,
                ],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=REPO,
            )
    for name, path in errs.items():
        wait_for(lambda path=path: "watching" in path.read_text(), 15, what=f"watcher {name} subscribed")
    try:
        _telemetry(probe, "dev-5", "verdicts", {"verdict": "allowed", "image": "img"})
        _telemetry(probe, "dev-5", "alerts", {"verdict": "blocked", "image": "bad"})
        _telemetry(probe, "dev-5", "alerts", {"verdict": "blocked", "image": "worse"})
        outs = {name: p.communicate(timeout=20) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    every = [json.loads(line) for line in outs["all"][0].splitlines()]
    assert [(e["kind"], e["message"]["image"]) for e in every] == [("verdicts", "img"), ("alerts", "bad")]
    alerts = [json.loads(line) for line in outs["alerts"][0].splitlines()]
    assert [(e["kind"], e["device"], e["message"]["image"]) for e in alerts] == [
        ("alerts", "dev-5", "bad"),
        ("alerts", "dev-5", "worse"),
    ]
