"""How fast a blocked container is gone: the agent against a floor that no agent can beat.

Run: ``.venv/bin/python bench/reaction.py [--sequential 50] [--burst 20] [--grace 1,0]`` (root: it starts a
private dockerd). Latency is measured from the moment ``start`` returns to the engine's own time stamp of
the container's ``destroy`` event, seen by the benchmark's own event subscriber.

The floor is a minimal in-process reactor with no agent running: the benchmark's event subscriber sees the
start event and at once kills and removes the container (``DELETE /containers/{id}?force=1``) from a pool of
8 threads (the agent has 8 lanes). The agent runs as a separate process (enforce mode, empty allowlist), so
every container is blocked; its test image exits at once on SIGTERM, so a stop with a grace period costs
only the engine's work.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import docker
from harness import (
    HEADER,
    TRAP_ENTRYPOINT,
    AgentProcess,
    EventWatcher,
    Summary,
    client,
    create_containers,
    leftovers,
    private_engine,
    remove_leftovers,
    row,
)

IMAGE = "imageguard-bench/blocked:1"
GOAL_RATIO = 1.5
WARMUP = 3


@dataclass
class Run:
    """Millisecond figures of one configuration (floor or agent with one grace period)."""

    label: str
    start_call: list[float] = field(default_factory=list)
    start_seen: list[float] = field(default_factory=list)
    to_die: list[float] = field(default_factory=list)
    sequential: list[float] = field(default_factory=list)
    from_event: list[float] = field(default_factory=list)
    burst: list[float] = field(default_factory=list)
    burst_removed: int = 0
    burst_size: int = 0
    leftovers: int = 0
    timeouts: int = 0
    remove_call: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _ms(ns: int) -> float:
    return ns / 1e6


def sequential(api: docker.APIClient, watcher: EventWatcher, run: Run, count: int, prefix: str) -> None:
    """Start one container at a time and wait until it is destroyed; the first WARMUP are not counted."""
    for i in range(WARMUP + count):
        (cid,) = create_containers(api, IMAGE, 1, f"{prefix}-{i}")
        t0 = time.time_ns()
        try:
            api.start(cid)
        except docker.errors.APIError as exc:  # the container may already be gone when start answers
            run.errors.append(f"start {cid[:12]}: {exc}")
        returned = time.time_ns()
        if not watcher.wait_for([cid], "destroy", timeout=30):
            run.timeouts += 1
            continue
        if i < WARMUP:
            continue
        run.start_call.append(_ms(returned - t0))
        gone = watcher.event_ns(cid, "destroy")
        assert gone is not None
        run.sequential.append(_ms(gone - returned))
        if (started := watcher.event_ns(cid, "start")) is not None:
            run.from_event.append(_ms(gone - started))
        if (seen := watcher.received_ns(cid, "start")) is not None:
            run.start_seen.append(_ms(seen - returned))
        if (died := watcher.event_ns(cid, "die")) is not None:
            run.to_die.append(_ms(died - returned))


def burst(
    d_url: str, api: docker.APIClient, watcher: EventWatcher, run: Run, count: int, prefix: str
) -> None:
    """Start ``count`` containers at the same moment, each from its own thread and connection."""
    ids = create_containers(api, IMAGE, count, prefix)
    clients = [docker.APIClient(base_url=d_url, version=api.api_version, timeout=60) for _ in ids]
    for c in clients:
        c.ping()  # open each connection before the clock starts
    gate = threading.Barrier(count)
    returned: dict[str, int] = {}

    def go(c: docker.APIClient, cid: str) -> None:
        gate.wait()
        try:
            c.start(cid)
        except docker.errors.APIError as exc:
            run.errors.append(f"start {cid[:12]}: {exc}")
        returned[cid] = time.time_ns()

    threads = [threading.Thread(target=go, args=(c, cid)) for c, cid in zip(clients, ids, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    watcher.wait_for(ids, "destroy", timeout=60)
    run.burst_size = count
    for cid in ids:
        if (gone := watcher.event_ns(cid, "destroy")) is not None:
            run.burst_removed += 1
            run.burst.append(_ms(gone - returned[cid]))
    for c in clients:
        c.close()


def measure_floor(d_url: str, api: docker.APIClient, args: argparse.Namespace) -> Run:
    run = Run("floor: own subscriber + direct kill & remove (no agent)")
    local = threading.local()
    pool = ThreadPoolExecutor(8)

    def react(cid: str) -> None:
        c = getattr(local, "api", None)
        if c is None:
            c = local.api = docker.APIClient(base_url=d_url, version=api.api_version, timeout=60)
        t0 = time.time_ns()
        try:
            c.remove_container(cid, force=True)
        except docker.errors.APIError as exc:
            run.errors.append(f"remove {cid[:12]}: {exc}")
        run.remove_call.append(_ms(time.time_ns() - t0))

    with EventWatcher(d_url, on_start=lambda cid: pool.submit(react, cid)) as watcher:
        sequential(api, watcher, run, args.sequential, "floor-seq")
        run.remove_call = run.remove_call[WARMUP:]
        burst(d_url, api, watcher, run, args.burst, "floor-burst")
    pool.shutdown(wait=True)
    run.leftovers = len(leftovers(api))
    remove_leftovers(api)
    return run


def measure_agent(d_url: str, api: docker.APIClient, args: argparse.Namespace, grace: int, work: Path) -> Run:
    run = Run(f"agent, stop_grace_seconds={grace}")
    agent = AgentProcess(d_url, work / f"agent-grace{grace}", grace=grace)
    agent.launch()
    try:
        agent.wait_log("scan done", timeout=30)
        with EventWatcher(d_url) as watcher:
            sequential(api, watcher, run, args.sequential, f"agent{grace}-seq")
            burst(d_url, api, watcher, run, args.burst, f"agent{grace}-burst")
            time.sleep(0.5)
    finally:
        code = agent.stop()
    if code != 0:
        run.errors.append(f"agent exited with status {code}; see {agent.workdir / 'agent.log'}")
    run.leftovers = len(leftovers(api))
    remove_leftovers(api)
    return run


def report(runs: list[Run]) -> bool:
    floor = runs[0]
    floor_p50 = Summary.of(floor.sequential).p50
    print(
        f"\nReaction to a blocked start: from `start` returned to the engine's destroy event (warm-up {WARMUP})"
    )
    print(HEADER)
    ok = True
    for run in runs:
        print(f"{run.label}")
        print(row("start call (request -> response)", Summary.of(run.start_call)))
        print(row("start returned -> start event received", Summary.of(run.start_seen)))
        if run.remove_call:
            print(row("kill+remove call (DELETE ?force=1), all", Summary.of(run.remove_call)))
        print(row("start returned -> die (container stopped)", Summary.of(run.to_die)))
        seq = Summary.of(run.sequential)
        ratio = seq.p50 / floor_p50 if floor_p50 > 0 else float("nan")
        extra = "" if run is floor else f"p50 = {ratio:.2f} x floor (goal <= {GOAL_RATIO})"
        print(row("sequential: start returned -> destroyed", seq, extra))
        ev = Summary.of(run.from_event)
        ev_floor = Summary.of(floor.from_event).p50
        extra = "" if run is floor else f"p50 = {ev.p50 / ev_floor:.2f} x floor"
        print(row("sequential: start event -> destroyed", ev, extra))
        b = Summary.of(run.burst)
        extra = "" if run is floor else f"p50 = {b.p50 / Summary.of(floor.burst).p50:.2f} x floor"
        print(row(f"burst of {run.burst_size}: start returned -> destroyed", b, extra))
        removed_ok = run.burst_removed == run.burst_size and run.leftovers == 0 and run.timeouts == 0
        print(
            f"  burst removed {run.burst_removed}/{run.burst_size}, leftovers {run.leftovers}, "
            f"sequential timeouts {run.timeouts}" + ("" if removed_ok else "  <-- MISS")
        )
        for e in run.errors[:5]:
            print(f"  note: {e}")
        if run is not floor:
            ok = ok and removed_ok and ratio <= GOAL_RATIO
            verdict = "meets" if ratio <= GOAL_RATIO else "MISSES"
            print(
                f"  => {verdict} the goal: p50 {seq.p50:.1f} ms vs floor {floor_p50:.1f} ms x {GOAL_RATIO}"
                f" = {floor_p50 * GOAL_RATIO:.1f} ms"
            )
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sequential", type=int, default=50, help="sequential blocked starts (default 50)")
    p.add_argument("--burst", type=int, default=20, help="concurrent blocked starts (default 20)")
    p.add_argument("--grace", default="1,0", help="agent stop_grace_seconds values to run (default 1,0)")
    p.add_argument("--json", metavar="FILE", help="also write the raw figures (ms) to FILE")
    args = p.parse_args()
    graces = [int(g) for g in args.grace.split(",") if g.strip()]
    with tempfile.TemporaryDirectory(prefix="ig-bench-") as tmp, private_engine() as d:
        d.build_image(IMAGE, "blocked", entrypoint=TRAP_ENTRYPOINT)
        api = client(d)
        runs = [measure_floor(d.url, api, args)]
        for g in graces:
            runs.append(measure_agent(d.url, api, args, g, Path(tmp)))
        api.close()
    ok = report(runs)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in runs], indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
