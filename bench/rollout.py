"""Fleet rollout: time from publishing a retained group layer until every agent acknowledged it.

Run: ``.venv/bin/python bench/rollout.py [--agents 20] [--rounds 5] [--signed] [--json FILE]`` (root: it
starts a private dockerd). One private dockerd, one mosquitto on a free 127.0.0.1 port, ``--agents`` agent
processes (audit mode, own state directories, all in group ``bench``). Each round publishes version N of the
layer through the console library (:meth:`agent.console.client.Console.rollout`, what ``imageguard console
rollout`` runs) and waits for N ``applied`` acknowledgements on the agents' ``.../policy`` telemetry.

Printed per round: time to the first and to the last acknowledgement; then p50 / max over the rounds, and
how long the agents took to start and connect.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import PYTHON, REPO, private_engine

from agent.config import from_dict
from agent.console.client import Console, ConsoleClient, Event, RolloutTracker
from agent.core.digest import Digest
from agent.verify.policy_signature import sign_policy
from tests.support.fixtures.mosquitto import MosquittoBroker, free_port

GROUP = "bench"
ACCOUNT = "bench"


def agent_config(
    directory: Path, device: str, engine_url: str, broker_url: str, signing_key: Path | None
) -> Path:
    directory.mkdir(parents=True)
    mqtt = f'url = "{broker_url}"\naccount = "{ACCOUNT}"\nreconnect_min_seconds = 0.5\n'
    if signing_key is not None:
        mqtt += f'policy_signing_key = "{signing_key}"\n'
    else:  # the unsigned run measures the rollout itself, so it opts out of the signed-policy default
        mqtt += "allow_unsigned_policy = true\n"
    path = directory / "config.toml"
    path.write_text(
        f'[device]\nid = "{device}"\ngroups = ["{GROUP}"]\n\n[engine]\nurl = "{engine_url}"\n\n'
        f'[state]\ndir = "{directory / "state"}"\n\n[enforcement]\nmode = "audit"\n\n[mqtt]\n{mqtt}'
    )
    return path


def wait_for_log(path: Path, needle: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited with {proc.returncode}; see {path}")
        time.sleep(0.05)
    raise RuntimeError(f"agent did not log {needle!r} within {timeout}s; see {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--signed", action="store_true", help="agents require signed layers (ECDSA P-256)")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ig-bench-rollout-"))
    key = None
    key_path = None
    if args.signed:
        from cryptography.hazmat.primitives.asymmetric import ec

        from agent.verify.cosign.keys import public_key_pem

        key = ec.generate_private_key(ec.SECP256R1())
        key_path = work / "policy.pub"
        key_path.write_bytes(public_key_pem(key.public_key()))

    broker = MosquittoBroker(workdir=work / "mosquitto", port=free_port())
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    results: dict[str, Any] = {"agents": args.agents, "signed": args.signed, "rounds": []}
    with private_engine() as engine:
        broker.start()
        try:
            t0 = time.monotonic()
            for i in range(args.agents):
                device = f"roll-{i:02d}"
                cfg = agent_config(work / device, device, engine.url, broker.url, key_path)
                log = cfg.parent / "agent.log"
                with log.open("wb") as out:
                    proc = subprocess.Popen(
                        [PYTHON, "-m", "agent", "--config", str(cfg), "run"],
                        cwd=REPO,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                procs.append((proc, log))
            for proc, log in procs:
                wait_for_log(log, "mqtt: connected", proc, 120)
            results["start_all_connected_s"] = round(time.monotonic() - t0, 2)
            print(f"{args.agents} agents started and connected in {results['start_all_connected_s']:.2f} s")

            config = from_dict(
                {"device": {"id": "bench-console"}, "mqtt": {"url": broker.url, "account": ACCOUNT}}, "bench"
            )
            assert config.mqtt is not None
            client = ConsoleClient(config.mqtt, "bench-console")
            client.connect()
            console = Console(config, client)
            digest = str(Digest.of(b"bench rollout"))
            print(f"{'round':>5} {'first ack ms':>13} {'all acked ms':>13}")
            for version in range(1, args.rounds + 1):
                doc: dict[str, Any] = {
                    "version": version,
                    "target": {"group": GROUP},
                    "allowlist": [{"digest": digest, "comment": f"round {version}"}],
                }
                body = sign_policy(doc, key) if key is not None else doc
                tracker = RolloutTracker(GROUP, version, expect_count=args.agents, settle=0)
                first: list[float] = []
                start = time.monotonic()

                def progress(_t: RolloutTracker, _e: Event | None, first: list[float] = first) -> None:
                    if not first:
                        first.append(time.monotonic())

                console.rollout(tracker, body, timeout=args.timeout, on_progress=progress)
                done = time.monotonic()
                applied = sum(r.status == "applied" for r in tracker.rows.values())
                if applied != args.agents:
                    print(f"round {version}: only {applied}/{args.agents} applied: {tracker.table()}")
                    return 1
                first_ms = (first[0] - start) * 1000
                all_ms = (done - start) * 1000
                results["rounds"].append({"version": version, "first_ms": first_ms, "all_ms": all_ms})
                print(f"{version:>5} {first_ms:>13.1f} {all_ms:>13.1f}")
            client.close()
        finally:
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc, _ in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            broker.stop()
    all_ms = [r["all_ms"] for r in results["rounds"]]
    results["all_acked_ms_p50"] = statistics.median(all_ms)
    results["all_acked_ms_max"] = max(all_ms)
    print(
        f"rollout to {args.agents} agents{' (signed)' if args.signed else ''}: all acknowledged in "
        f"p50 {results['all_acked_ms_p50']:.1f} ms, max {results['all_acked_ms_max']:.1f} ms "
        f"over {len(all_ms)} rounds"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
