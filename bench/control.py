"""The MQTT control plane and telemetry: request latency, outbox drain rate, idle RSS with the connection up.

Run: ``.venv/bin/python bench/control.py [--requests 500] [--messages 10000]`` (root: it starts a private
dockerd, and a mosquitto on a free 127.0.0.1 port).

* latency: a paho console sends ``GET enforcement`` (and ``GET status``) one at a time over loopback and
  times publish -> reply, KuraPayload protobuf both ways; p50 / p99 (goal p50 < 10 ms);
* drain rate: with the broker stopped, ``--messages`` alerts are queued in the agent's outbox; the broker
  is started and a subscriber counts them; rate over the time from the agent's reconnect to the last
  message, and from the broker's start (goal >= 2,000/s);
* idle RSS of the agent with the connection up, after the drain (goal <= 45 MB);
* end-to-end delivery: the broker runs with the queue limits of deploy/mosquitto/mosquitto.conf, and its
  ``$SYS/broker/publish/messages/dropped`` counter is read before and after; any message dropped at the
  broker, or any alert that did not arrive, fails the benchmark (exit 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from harness import REPO, percentile, private_engine, proc_status  # harness puts REPO on sys.path
from paho.mqtt.enums import CallbackAPIVersion

from agent.adapters.mqtt.kurapayload import KuraMessage, MetricValue, decode_protobuf, encode_protobuf
from agent.adapters.store import Store
from agent.core.records import PRIORITY_ALERT, OutboxMessage
from tests.support.agentproc import AgentProcess, write_config
from tests.support.fixtures.mosquitto import HOST, MosquittoBroker, free_port, shipped_queue_settings

assert REPO.is_dir()

ACCOUNT, DEVICE, APP = "bench", "bench-dev", "CONTAINER-AUTH-V1"
GOAL_P50_MS = 10.0
GOAL_RATE = 2000.0
GOAL_RSS_MB = 45.0


class Console:
    def __init__(self, port: int) -> None:
        self.replies: dict[str, float] = {}
        self.cond = threading.Condition()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-console")
        self.c.on_message = self._on_message
        self.c.connect(HOST, port)
        self.c.loop_start()
        self.c.subscribe(f"$EDC/{ACCOUNT}/bench-console/{APP}/REPLY/#", 0)
        time.sleep(0.3)

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        code = decode_protobuf(msg.payload).integer("response.code")
        assert code == 200, code
        with self.cond:
            self.replies[msg.topic.rsplit("/", 1)[1]] = time.perf_counter()
            self.cond.notify_all()

    def request(self, rid: str, resource: str) -> float:
        payload = encode_protobuf(
            KuraMessage(
                timestamp_ms=int(time.time() * 1000),
                metrics={
                    "request.id": MetricValue.string(rid),
                    "requester.client.id": MetricValue.string("bench-console"),
                },
            )
        )
        start = time.perf_counter()
        self.c.publish(f"$EDC/{ACCOUNT}/{DEVICE}/{APP}/GET/{resource}", payload, qos=0)
        with self.cond:
            if not self.cond.wait_for(lambda: rid in self.replies, timeout=10):
                raise RuntimeError(f"no reply to {rid}")
            return (self.replies.pop(rid) - start) * 1000

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class SysCounter:
    """The broker's own count of messages it dropped (``$SYS``, published every second here)."""

    TOPIC = "$SYS/broker/publish/messages/dropped"

    def __init__(self, port: int) -> None:
        self.value: int | None = None
        self.updates = 0
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-sys")
        self.c.on_message = self._on_message
        self.c.connect(HOST, port)
        self.c.loop_start()
        self.c.subscribe(self.TOPIC, 0)

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        self.value = int(msg.payload)
        self.updates += 1

    def read(self, timeout: float = 5.0) -> int:
        """The value of the next update (a fresh one, not the retained value from before)."""
        seen = self.updates
        deadline = time.monotonic() + timeout
        while self.updates <= seen and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.value is None:
            raise RuntimeError(f"the broker published nothing on {self.TOPIC}")
        return self.value

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class Counter:
    """A persistent-session subscriber: it exists before the outage, so the broker keeps its subscription
    and nothing the agent publishes right after the restart is missed."""

    def __init__(self, port: int, topic: str, client_id: str = "bench-counter", delay: float = 0.0) -> None:
        #: seconds spent on each message: a consumer slower than the device's drain
        self.delay = delay
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.ids: set[str] = set()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.c.on_message = self._on_message
        self.subscribed = threading.Event()
        self.c.on_subscribe = lambda *_a: self.subscribed.set()
        self.c.reconnect_delay_set(1, 1)
        self.c.connect(HOST, port)
        self.c.loop_start()
        self.c.subscribe(topic, 1)
        if not self.subscribed.wait(10):
            raise RuntimeError("counter could not subscribe")

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        if not self.count:
            self.first = time.perf_counter()
        self.count += 1
        self.ids.add(json.loads(decode_protobuf(msg.payload).body or b"{}")["id"])
        self.last = time.perf_counter()
        if self.delay:
            time.sleep(self.delay)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--messages", type=int, default=10_000)
    args = ap.parse_args()
    with private_engine() as engine, tempfile.TemporaryDirectory(prefix="ig-bench-control-") as tmp_name:
        tmp = Path(tmp_name)
        broker = MosquittoBroker(
            workdir=tmp / "broker", port=free_port(), extra=[*shipped_queue_settings(), "sys_interval 1"]
        )
        broker.start()
        config = write_config(
            tmp / "config.toml",
            {
                "device": {"id": DEVICE},
                "engine": {"url": engine.url},
                "state": {"dir": str(tmp / "state")},
                "mqtt": {
                    "url": broker.url,
                    "account": ACCOUNT,
                    "outbox_limit": max(20_000, args.messages * 2),
                    "reconnect_min_seconds": 0.2,
                    "reconnect_max_seconds": 0.5,
                },
            },
        )
        agent = AgentProcess(config, tmp / "agent.log")
        try:
            agent.start()
            agent.wait_log("mqtt: connected")
            console = Console(broker.port)
            results = {}
            for resource in ("enforcement", "status"):
                for i in range(20):  # warm-up
                    console.request(f"w{resource}{i}", resource)
                lat = [console.request(f"{resource}{i}", resource) for i in range(args.requests)]
                results[resource] = lat
            console.close()

            # drain: the broker goes away, the outbox fills, the broker comes back
            counter = Counter(broker.port, f"{ACCOUNT}/{DEVICE}/{APP}/alerts")
            # a second consumer that reads slower than the agent drains: what it has not read yet waits at
            # the broker, which must keep all of it (the shipped queue limits)
            slow = Counter(
                broker.port, f"{ACCOUNT}/{DEVICE}/{APP}/alerts", client_id="bench-slow", delay=0.0005
            )
            broker.stop()
            agent.wait_log("mqtt: connection lost")
            assert agent.stop() == 0
            store = Store(tmp / "state", outbox_limit=max(20_000, args.messages * 2))
            now = "2024-01-01T00:00:00.000Z"
            batch = [
                OutboxMessage(
                    "alerts",
                    {
                        "id": f"bench-{i}",
                        "time": now,
                        "device": DEVICE,
                        "container": {"id": f"{i:064x}", "name": f"c{i}"},
                        "verdict": "blocked",
                        "reason": "not-allowlisted",
                        "policy_version": 1,
                        "alert": "container-blocked",
                    },
                    PRIORITY_ALERT,
                )
                for i in range(args.messages)
            ]
            store.outbox_add(batch, now)
            store.close()
            agent.start()
            broker.start()
            broker_up = time.perf_counter()
            sys_counter = SysCounter(broker.port)
            agent.wait_log("mqtt: connected", count=1)
            deadline = time.monotonic() + 180
            while len(counter.ids) < args.messages and time.monotonic() < deadline:
                time.sleep(0.01)
            received, unique, first, last = counter.count, len(counter.ids), counter.first, counter.last
            while len(slow.ids) < args.messages and time.monotonic() < deadline:
                time.sleep(0.01)
            slow_unique = len(slow.ids)
            slow.close()
            dropped_at_broker = sys_counter.read()
            sys_counter.close()
            time.sleep(3)
            idle_rss_kb = int(proc_status(agent.proc.pid)["VmRSS"].split()[0])  # type: ignore[union-attr]
            counter.close()
        finally:
            if agent.proc is not None:
                agent.stop()
            broker.stop()

    print("MQTT control plane and telemetry (loopback, KuraPayload protobuf)")
    for resource, lat in results.items():
        p50, p99 = statistics.median(lat), percentile(sorted(lat), 99)
        goal = f"(goal p50 < {GOAL_P50_MS:.0f} ms: {'met' if p50 < GOAL_P50_MS else 'NOT met'})"
        print(
            f"  GET {resource:<12} n={len(lat)}  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  max {max(lat):6.2f} ms  {goal}"
        )
    from_conn = unique / max(1e-9, last - first)
    from_broker = unique / max(1e-9, last - broker_up)
    print(
        f"  drain: {unique} of {args.messages} alerts ({received - unique} duplicates) in "
        f"{last - first:.2f} s from the first to the last = {from_conn:,.0f}/s; "
        f"{last - broker_up:.2f} s after the broker start = {from_broker:,.0f}/s "
        f"(goal >= {GOAL_RATE:,.0f}/s: {'met' if from_conn >= GOAL_RATE else 'NOT met'})"
    )
    rss = idle_rss_kb / 1024
    print(
        f"  idle RSS with the connection up: {rss:.1f} MB (goal <= {GOAL_RSS_MB:.0f} MB: "
        f"{'met' if rss <= GOAL_RSS_MB else 'NOT met'})"
    )
    lost = (args.messages - unique) + (args.messages - slow_unique)
    print(
        f"  delivery: broker dropped {dropped_at_broker} messages ($SYS/broker/publish/messages/dropped); "
        f"missing: {args.messages - unique} at the fast consumer, {args.messages - slow_unique} at the slow one "
        f"(floor 0: {'met' if not lost and not dropped_at_broker else 'LOSS'})"
    )
    return 1 if lost or dropped_at_broker else 0


if __name__ == "__main__":
    sys.exit(main())
