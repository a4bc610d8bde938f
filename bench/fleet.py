"""The fleet console service under a fleet: 1,000 simulated devices plus 20 real agents, PostgreSQL, mosquitto.

Run: ``.venv/bin/python bench/fleet.py [--sims 1000] [--agents 20] [--rounds 3] [--json FILE]`` (root: it
starts a private dockerd for the agents and a private PostgreSQL cluster as the postgres user).

The simulated devices (tests/support/simfleet.py) speak the real protocol with the agent's own code: birth
certificates, the request dispatcher, the policy gate, acknowledgements and alerts with outbox sequence
numbers. They run ``--sim-procs`` to a process. The agents are real agent processes on one private engine.

Figures, each beside its goal or its floor from the same run:

* **Rollout**: ``POST /api/rollouts`` with waves ``1,10%,100%`` to every device, until every device has
  acknowledged (p50 over ``--rounds``). Floor: the same layer sent to every device at once by the console's
  request client alone (no database, no waves), until every reply is in.
* **Ingest**: messages stored per second (alerts with their verdicts from every simulated device as fast as
  they publish), with one replica and then two. Floor: a bare MQTT subscriber receiving the same messages
  in the same run.
* **Alert -> dashboard**: an alert published on a device until the dashboard's long poll (``/api/alerts``)
  returns it, p50. Floor: the same alert reaching a bare MQTT subscriber.
* **Overview page** with every device in the inventory: server time (``Server-Timing``) p50, goal < 100 ms.
* **Service idle** RSS and CPU over 10 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import wait
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import requests
from harness import CLK_TCK, PYTHON, REPO, private_engine, proc_cpu_ticks, proc_status
from paho.mqtt.enums import CallbackAPIVersion
from rollout import agent_config, wait_for_log

from agent.adapters.mqtt.codec import PayloadCodec
from agent.config import MqttConfig
from agent.console.client import message_data
from agent.console.requester import Requester
from tests.support.consolesvc import TOKEN, console_toml
from tests.support.fixtures.mosquitto import MosquittoBroker, free_port, shipped_queue_settings
from tests.support.fixtures.postgres import USER, PostgresCluster, _as_postgres, _bin
from tests.support.simfleet import SimDevice, start_fleet

ACCOUNT = "bench"  # bench/rollout.py's agents use this account and group
GROUP = "bench"


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- a worker process full of simulated devices ---------------------------------------------------------


def sim_worker(host: str, port: int, first: int, count: int) -> int:
    """Runs in its own process: starts devices, then obeys commands on stdin ('burst N', 'quit')."""
    devices = start_fleet(host, port, ACCOUNT, [f"sim-{i:04d}" for i in range(first, first + count)], [GROUP])
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "burst":
            for i in range(int(cmd[1])):
                for d in devices:
                    d.blocked(name=f"burst-{i}")
            print("sent", flush=True)
    for d in devices:
        d.stop()
    return 0


class Workers:
    def __init__(self, host: str, port: int, total: int, procs: int) -> None:
        per = -(-total // procs)
        self.procs = []
        for k in range(procs):
            first, count = k * per, min(per, total - k * per)
            if count <= 0:
                break
            self.procs.append(
                subprocess.Popen(
                    [PYTHON, __file__, "--sim-worker", host, str(port), str(first), str(count)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=REPO,
                )
            )
        for p in self.procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready", "a sim worker failed"

    def command(self, text: str, answer: str | None = None) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(text + "\n")
            p.stdin.flush()
        if answer:
            for p in self.procs:
                assert p.stdout is not None and p.stdout.readline().strip() == answer

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.command("quit")
            p.wait(30)


# --- the service ------------------------------------------------------------------------------------------


class Service:
    def __init__(self, work: Path, broker: MosquittoBroker, url: str, replica: str) -> None:
        self.port = free_port()
        self.dir = work / f"console-{replica}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = console_toml(
            self.dir / "console.toml",
            broker,
            state=self.dir,
            port=self.port,
            replica=replica,
            database=url,
            account=ACCOUNT,
        )
        self.log = self.dir / "serve.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "agent", "--config", str(self.config), "console", "serve"],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        wait_for_log(self.log, "serving http://", self.proc, 60)
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {TOKEN}"

    def get(self, path: str, **kw: Any) -> Any:
        r = self.http.get(self.url + path, timeout=60, **kw)
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class Counter:
    """A bare MQTT subscriber: the floor of what the broker delivers to one client."""

    def __init__(self, broker: MosquittoBroker, topic: str) -> None:
        self.count = 0
        self.codec = PayloadCodec()
        self.seen: dict[str, float] = {}
        self.lock = threading.Lock()
        host, port = broker.url.removeprefix("mqtt://").rsplit(":", 1)
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"floor-{os.getpid()}")
        self.client.on_message = self._on_message
        self.client.connect(host, int(port))
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        time.sleep(0.5)

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        at = time.monotonic()
        with self.lock:
            self.count += 1
        if "probe-device" in msg.topic:  # decoded as the console does: the floor does the same work
            data = message_data(self.codec.decode(bytes(msg.payload)))
            name = (data.get("container") or {}).get("name")
            if name:
                self.seen[str(name)] = at

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Stored:
    """Counts the service's stored messages straight from PostgreSQL (one connection pool for the run:
    the polling loop must not add connection set-up to the load it measures)."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self.sa = sa
        self.engine = sa.create_engine(url, pool_size=1)

    def count(self, *kinds: str) -> int:
        q = self.sa.text("select count(*) from messages where kind in :k").bindparams(
            self.sa.bindparam("k", expanding=True)
        )
        with self.engine.connect() as conn:
            return int(conn.execute(q, {"k": list(kinds)}).scalar_one())

    def close(self) -> None:
        self.engine.dispose()


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stopped: the finally below cleans up
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sims", type=int, default=1000)
    ap.add_argument("--agents", type=int, default=20)
    ap.add_argument("--sim-procs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--burst", type=int, default=10, help="alerts per simulated device in each ingest run")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ig-bench-fleet-"))
    results: dict[str, Any] = {"sims": args.sims, "agents": args.agents}
    total = args.sims + args.agents

    broker = MosquittoBroker(workdir=work / "mosquitto", port=free_port(), extra=shipped_queue_settings())
    pg_root = Path(tempfile.mkdtemp(prefix="ig-pg-"))
    shutil.chown(pg_root, USER, USER)
    cluster = PostgresCluster(pg_root, free_port())
    _as_postgres(_bin("initdb"), "-D", str(cluster.data), "-A", "trust", "-U", USER, "--no-sync")
    cluster.start()
    agents: list[subprocess.Popen[bytes]] = []
    services: list[Service] = []
    workers: Workers | None = None
    with private_engine() as engine:
        broker.start()
        try:
            host, port = broker.url.removeprefix("mqtt://").rsplit(":", 1)
            url = cluster.create_database()
            t0 = time.monotonic()
            for i in range(args.agents):
                device = f"agent-{i:02d}"
                cfg = agent_config(work / device, device, engine.url, broker.url, None)
                log = cfg.parent / "agent.log"
                with log.open("wb") as out:
                    agents.append(
                        subprocess.Popen(
                            [PYTHON, "-m", "agent", "--config", str(cfg), "run"],
                            cwd=REPO,
                            stdout=out,
                            stderr=subprocess.STDOUT,
                        )
                    )
                    agents[-1].log = log  # type: ignore[attr-defined]
            workers = Workers(host, int(port), args.sims, args.sim_procs)
            for proc in agents:
                wait_for_log(proc.log, "mqtt: connected", proc, 180)  # type: ignore[attr-defined]
            print(
                f"{args.sims} simulated devices and {args.agents} agents up in {time.monotonic() - t0:.1f} s"
            )

            services.append(Service(work, broker, url, "r1"))
            svc = services[0]
            t0 = time.monotonic()
            while svc.get("/api/fleet")["online"] < total:
                if time.monotonic() - t0 > 120:
                    raise RuntimeError(
                        f"only {svc.get('/api/fleet')['online']} of {total} devices discovered"
                    )
                time.sleep(0.5)
            results["discovery_s"] = round(time.monotonic() - t0, 2)
            print(
                f"discovered {total} online devices from their retained births in {results['discovery_s']} s"
            )

            # --- rollout ----------------------------------------------------------------------------
            print(f"\n{'round':>5} {'all acknowledged s':>19} {'floor s':>8}")
            mqtt = MqttConfig(url=broker.url, account=ACCOUNT)
            requester = Requester(mqtt, "bench-floor")
            requester.start()
            names = [d["device"] for d in svc.get("/api/devices")["devices"]]
            rounds, floors = [], []
            version = 0
            for rnd in range(args.rounds):
                version += 1
                doc = {"version": version, "allowlist": [{"digest": "sha256:" + f"{rnd:064x}"}]}
                start = time.monotonic()
                futs = [requester.request(n, "PUT", f"fleet/{GROUP}", doc, timeout=60) for n in names]
                wait(futs, timeout=90)
                floor = time.monotonic() - start
                bad = [f for f in futs if f.exception() is not None or f.result().code != 200]
                if bad:
                    print(f"floor round {rnd}: {len(bad)} devices did not answer 200")
                version += 1
                doc = {"version": version, "allowlist": [{"digest": "sha256:" + f"{rnd + 100:064x}"}]}
                start = time.monotonic()
                r = svc.http.post(
                    svc.url + "/api/rollouts",
                    json={"group": GROUP, "document": doc, "waves": "1,10%,100%", "wave_timeout": 60},
                    timeout=60,
                )
                r.raise_for_status()
                rid = r.json()["id"]
                while (got := svc.get(f"/api/rollouts/{rid}"))["state"] == "running":
                    time.sleep(0.05)
                took = time.monotonic() - start
                if got["state"] != "completed" or got["progress"]["holding"] != total:
                    print(f"round {rnd}: {got['state']} {got['progress']}")
                    return 1
                rounds.append(took)
                floors.append(floor)
                print(f"{rnd + 1:>5} {took:>19.2f} {floor:>8.2f}")
            results["rollout_s_p50"] = round(p50(rounds), 2)
            results["rollout_floor_s_p50"] = round(p50(floors), 2)
            print(f"rollout to {total} devices: p50 {p50(rounds):.2f} s (floor {p50(floors):.2f} s)")
            requester.stop()

            # --- ingest ------------------------------------------------------------------------------
            stored_db = Stored(url)
            for replicas in (1, 2):
                if replicas == 2:
                    services.append(Service(work, broker, url, "r2"))
                floor = Counter(broker, f"{ACCOUNT}/+/CONTAINER-AUTH-V1/+")
                before = stored_db.count("alerts", "verdicts")
                expected = args.sims * args.burst * 2
                start = time.monotonic()
                workers.command(f"burst {args.burst}", "sent")
                floor_done = None
                while True:
                    stored = stored_db.count("alerts", "verdicts") - before
                    if floor_done is None and floor.count >= expected:
                        floor_done = time.monotonic() - start
                    if stored >= expected:
                        break
                    if time.monotonic() - start > 300:
                        print(f"ingest: only {stored} of {expected} stored")
                        return 1
                    time.sleep(0.1)
                took = time.monotonic() - start
                floor.close()
                rate = expected / took
                floor_rate = expected / floor_done if floor_done else float("nan")
                results[f"ingest_{replicas}_replica_msgs_per_s"] = round(rate)
                results[f"ingest_floor_{replicas}_msgs_per_s"] = round(floor_rate)
                print(
                    f"ingest with {replicas} replica(s): {rate:,.0f} messages/s stored "
                    f"({expected} in {took:.1f} s); floor: a bare subscriber received {floor_rate:,.0f}/s"
                )

            stored_db.close()

            # --- alert -> dashboard ---------------------------------------------------------------------
            probe = SimDevice(host, int(port), ACCOUNT, "probe-device", [GROUP])
            probe.start()
            probe.connected.wait(10)
            floor = Counter(broker, f"{ACCOUNT}/probe-device/CONTAINER-AUTH-V1/alerts")
            latencies, floor_lat = [], []
            for i in range(20):
                cursor = svc.get("/api/alerts?limit=1")["cursor"]
                got: dict[str, float] = {}
                name = f"probe-{i}-{time.time_ns()}"

                def poll(cursor: float = cursor, name: str = name, got: dict[str, float] = got) -> None:
                    deadline = time.monotonic() + 20
                    c = cursor
                    while time.monotonic() < deadline:
                        doc = svc.get(f"/api/alerts?after={c}&wait=20")
                        c = doc["cursor"]
                        if any((a["data"].get("container") or {}).get("name") == name for a in doc["alerts"]):
                            got["at"] = time.monotonic()
                            return

                t = threading.Thread(target=poll)
                t.start()
                time.sleep(0.2)  # the long poll is waiting
                sent = time.monotonic()
                probe.blocked(name=name)
                t.join(25)
                if "at" in got:
                    latencies.append((got["at"] - sent) * 1000)
                if name in floor.seen:
                    floor_lat.append((floor.seen[name] - sent) * 1000)
            floor.close()
            probe.stop()
            results["alert_to_dashboard_ms_p50"] = round(p50(latencies), 1)
            results["alert_floor_ms_p50"] = round(p50(floor_lat), 1)
            print(
                f"alert -> dashboard: p50 {p50(latencies):.1f} ms, max {max(latencies):.1f} ms "
                f"({len(latencies)}/20; floor, a bare subscriber: p50 {p50(floor_lat):.1f} ms)"
            )

            # --- overview page -----------------------------------------------------------------------------
            times = []
            for _ in range(30):
                r = svc.http.get(svc.url + "/", timeout=30)
                r.raise_for_status()
                times.append(float(r.headers["Server-Timing"].split("dur=")[1]))
            devices = svc.get("/api/fleet")["devices"]
            results["overview_ms_p50"] = round(p50(times), 1)
            print(
                f"overview page with {devices} devices: server time p50 {p50(times):.1f} ms (goal < 100 ms)"
            )

            # --- idle ----------------------------------------------------------------------------------------
            time.sleep(5)
            pid = svc.proc.pid
            ticks = proc_cpu_ticks(pid)
            time.sleep(10)
            cpu = (proc_cpu_ticks(pid) - ticks) / CLK_TCK / 10 * 100
            rss = int(proc_status(pid)["VmRSS"].split()[0]) / 1024
            results["idle_rss_mb"] = round(rss, 1)
            results["idle_cpu_percent"] = round(cpu, 2)
            print(
                f"service idle with {devices} devices connected: RSS {rss:.1f} MB, CPU {cpu:.2f} % "
                "(the dashboard's own polls are not running)"
            )
        finally:
            if workers is not None:
                workers.close()
            for s in services:
                s.stop()
            for proc in agents:
                proc.terminate()
            for proc in agents:
                proc.wait(30)
            broker.stop()
            cluster.stop("immediate")
            shutil.rmtree(pg_root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    ok = results.get("overview_ms_p50", 1e9) < 100
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--sim-worker":
        sys.exit(sim_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))
    sys.exit(main())
