"""How far untrusted code gets before it is stopped: the agent against a floor that no agent can beat.

Run: ``.venv/bin/python bench/reaction.py [--sequential 30] [--burst 100] [--allowed 20] [--json FILE]``
(root: it starts a private dockerd).

The workload is what users really run: the blocked image's PID 1 **ignores SIGTERM** (a shell), and it
appends to a bind-mounted file in a tight loop, so the benchmark can count how far untrusted code got.

- **floor**: no agent; the benchmark's own event subscriber kills and removes each container through the
  API (``DELETE /containers/{id}?force=1``) the moment it sees its start event, from a pool of 8 threads.
- **agent**: a separate process (enforce mode, empty allowlist, ``stop_grace_seconds = 1``), as shipped: it
  freezes each container when the runtime makes its cgroup, so a blocked one is killed before its entrypoint
  runs and its ``start`` fails.
- **agent, start-event path only** (``freeze_on_create = false``): the backstop alone, for comparison; its
  figures are reported, the goals apply to the agent as shipped.

Figures, floor and agents in the same run:

- **exposure**: from the engine's start event to the container's processes frozen (its cgroup's freezer
  state, polled by the benchmark) or dead (the engine's ``die`` event), p50 and p95; goal p50 <= 3 ms.
  A container whose start was refused (killed before its entrypoint ran) has no start event: its exposure
  counts as 0, and how many there were is printed;
- **lines written** by each blocked container in all; goal p50 <= 0.1 x the floor's;
- **removed**: from ``start`` returned to the engine's ``destroy`` event, p50; goal <= 1.2 x the floor's;
- **burst**: ``--burst`` blocked starts at once, then probe containers started right after: the probe's
  start returned -> destroyed, p50 and max (no lane waits on a grace period);
- **allowlisted start delay**: from the ``start`` call to the first line an allowlisted writer writes, with
  the agent (which freezes it until decided) against no agent at all, p50.
- **removed from the call**: from the ``start`` call to destroyed, beside "removed" (a gate holds the start
  call itself, so "start returned" starts the clock late for it).
"""

from __future__ import annotations

import argparse
import contextlib
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
    BENCH_LABEL,
    HEADER,
    AgentProcess,
    EventWatcher,
    Summary,
    client,
    leftovers,
    private_engine,
    remove_leftovers,
    row,
)

BLOCKED = "imageguard-bench/writer:1"
ALLOWED = "imageguard-bench/allowed-writer:1"
# PID 1 is a shell that ignores SIGTERM and writes as fast as it can
WRITER = ["/bin/busybox", "sh", "-c", "trap '' TERM; while :; do echo x >> /out/log; done"]
GOAL_EXPOSURE_MS = 3.0
GOAL_LINES_RATIO = 0.1
GOAL_REMOVED_RATIO = 1.2
WARMUP = 3
PROBES = 5
FREEZER = Path("/sys/fs/cgroup/freezer/docker")


@dataclass
class Run:
    label: str
    exposure: list[float] = field(default_factory=list)
    lines: list[float] = field(default_factory=list)
    removed: list[float] = field(default_factory=list)
    #: from the start call (before it returns: a gate holds the start itself) to destroyed
    removed_from_call: list[float] = field(default_factory=list)
    probe: list[float] = field(default_factory=list)
    burst_removed: int = 0
    burst_size: int = 0
    #: starts that failed because the container was killed before its entrypoint ran
    refused: int = 0
    attempts: int = 0
    leftovers: int = 0
    errors: list[str] = field(default_factory=list)


class FreezeWatch:
    """Stamps the moment a container's cgroup reads FROZEN (cgroup v1 and v2), polled from its start event."""

    def __init__(self) -> None:
        self.frozen_ns: dict[str, int] = {}
        self._lock = threading.Lock()

    def watch(self, cid: str) -> None:
        threading.Thread(target=self._poll, args=(cid,), daemon=True).start()

    def _poll(self, cid: str) -> None:
        v1 = FREEZER / cid / "freezer.state"
        v2 = Path("/sys/fs/cgroup/docker") / cid / "cgroup.freeze"
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                state = (v1 if v1.exists() else v2).read_text().strip()
            except OSError:
                return  # gone: the die event tells
            if state in ("FROZEN", "1"):
                with self._lock:
                    self.frozen_ns[cid] = time.time_ns()
                return
            time.sleep(0.0001)

    def get(self, cid: str) -> int | None:
        with self._lock:
            return self.frozen_ns.get(cid)


def _ms(ns: int) -> float:
    return ns / 1e6


def create(api: docker.APIClient, image: str, name: str, work: Path) -> tuple[str, Path]:
    out = work / "out" / name
    out.mkdir(parents=True, mode=0o777)
    out.chmod(0o777)
    host = api.create_host_config(binds=[f"{out}:/out"])
    cid = api.create_container(image, name=name, labels={BENCH_LABEL: "1"}, host_config=host)["Id"]
    return str(cid), out / "log"


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def blocked_one(
    api: docker.APIClient,
    watcher: EventWatcher,
    freeze: FreezeWatch,
    run: Run,
    name: str,
    work: Path,
    warm: bool,
) -> None:
    cid, log = create(api, BLOCKED, name, work)
    refused = False
    called = time.time_ns()
    try:
        api.start(cid)
    except docker.errors.APIError as exc:
        # killed before its entrypoint ran (the runtime reports its init gone), or already removed
        refused = "OCI runtime" in str(exc)
        if not refused:
            run.errors.append(f"start {cid[:12]}: {exc}")
    returned = time.time_ns()
    if not watcher.wait_for([cid], "destroy", timeout=30):
        run.errors.append(f"{cid[:12]} was not destroyed within 30 s")
        return
    if warm:
        return
    started, died, gone = (watcher.event_ns(cid, a) for a in ("start", "die", "destroy"))
    assert gone is not None
    run.attempts += 1
    run.removed.append(_ms(gone - returned))
    run.removed_from_call.append(_ms(gone - called))
    if started is not None:
        stops = [t for t in (freeze.get(cid), died) if t is not None]
        if stops:
            run.exposure.append(max(0.0, _ms(min(stops) - started)))
    elif refused:
        run.refused += 1
        run.exposure.append(0.0)  # never started: none of its code ran
    run.lines.append(float(count_lines(log)))


def sequential(
    api: docker.APIClient, watcher: EventWatcher, freeze: FreezeWatch, run: Run, n: int, work: Path
) -> None:
    tag = run.label.split(":")[0]
    for i in range(WARMUP + n):
        blocked_one(api, watcher, freeze, run, f"{tag}-seq-{i}", work, i < WARMUP)


def burst(
    url: str, api: docker.APIClient, watcher: EventWatcher, freeze: FreezeWatch, run: Run, n: int, work: Path
) -> None:
    """``n`` blocked starts at the same moment, then probes started one after the other."""
    tag = run.label.split(":")[0]
    ids = [create(api, BLOCKED, f"{tag}-burst-{i}", work)[0] for i in range(n)]
    clients = [
        docker.APIClient(base_url=url, version=api.api_version, timeout=120) for _ in range(min(n, 25))
    ]
    for c in clients:
        c.ping()
    gate = threading.Barrier(len(clients) + 1)

    def go(c: docker.APIClient, mine: list[str]) -> None:
        gate.wait()
        for cid in mine:
            with contextlib.suppress(docker.errors.APIError):
                c.start(cid)

    threads = [threading.Thread(target=go, args=(c, ids[i :: len(clients)])) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    gate.wait()
    probe_run = Run("probe")
    for p in range(PROBES):  # while the burst is being handled
        blocked_one(api, watcher, freeze, probe_run, f"{tag}-probe-{p}", work, False)
    run.probe = probe_run.removed
    for t in threads:
        t.join()
    watcher.wait_for(ids, "destroy", timeout=120)
    run.burst_size = n
    run.burst_removed = sum(1 for cid in ids if watcher.event_ns(cid, "destroy") is not None)
    for c in clients:
        c.close()


def allowed_delay(api: docker.APIClient, n: int, work: Path, tag: str) -> list[float]:
    """``start`` called -> first line written by an allowlisted writer (a gate holds the start call itself,
    so the clock starts before it)."""
    out = []
    for i in range(n):
        cid, log = create(api, ALLOWED, f"{tag}-ok-{i}", work)
        called = time.time_ns()
        api.start(cid)
        deadline = time.monotonic() + 10
        while count_lines(log) == 0 and time.monotonic() < deadline:
            time.sleep(0.0001)
        out.append(_ms(time.time_ns() - called))
        api.remove_container(cid, force=True)
    return out


def measure_floor(
    url: str, api: docker.APIClient, args: argparse.Namespace, work: Path
) -> tuple[Run, list[float]]:
    run = Run("floor: own subscriber + direct kill & remove (no agent)")
    local = threading.local()
    pool = ThreadPoolExecutor(8)
    freeze = FreezeWatch()

    def react(cid: str) -> None:
        c = getattr(local, "api", None)
        if c is None:
            c = local.api = docker.APIClient(base_url=url, version=api.api_version, timeout=60)
        try:
            c.remove_container(cid, force=True)
        except docker.errors.APIError as exc:
            run.errors.append(f"remove {cid[:12]}: {exc}")

    with EventWatcher(url, on_start=lambda cid: pool.submit(react, cid)) as watcher:
        sequential(api, watcher, freeze, run, args.sequential, work)
        burst(url, api, watcher, freeze, run, args.burst, work)
    pool.shutdown(wait=True)
    run.leftovers = len(leftovers(api))
    remove_leftovers(api)
    without_agent = allowed_delay(api, args.allowed, work, "floor")
    return run, without_agent


def measure_agent(
    url: str, api: docker.APIClient, args: argparse.Namespace, work: Path, allowed_id: str, *, gate: bool
) -> tuple[Run, list[float]]:
    run = Run(
        "agent: stop_grace_seconds=1, empty allowlist but the allowed writer"
        + ("" if gate else "; start-event path only (freeze_on_create = false)")
    )
    agent = AgentProcess(
        url,
        work / "agent",
        grace=1,
        policy={"version": 1, "allowlist": [{"digest": allowed_id}]},
        enforcement="" if gate else "freeze_on_create = false",
    )
    agent.launch()
    freeze = FreezeWatch()
    try:
        agent.wait_log("scan done", timeout=30)
        with EventWatcher(url, on_start=freeze.watch) as watcher:
            sequential(api, watcher, freeze, run, args.sequential, work)
            burst(url, api, watcher, freeze, run, args.burst, work)
            delays = allowed_delay(api, args.allowed, work, "agent")
    finally:
        code = agent.stop()
    if code != 0:
        run.errors.append(f"agent exited with status {code}; see {agent.workdir / 'agent.log'}")
    run.leftovers = len(leftovers(api))
    remove_leftovers(api)
    return run, delays


def report(
    floor: Run,
    agent: Run,
    backstop: Run | None,
    no_agent_delay: list[float],
    agent_delay: list[float],
    backstop_delay: list[float],
) -> bool:
    print(
        "\nHow far a blocked container gets (its PID 1 ignores SIGTERM; it writes to a bind mount in a loop)"
    )
    print(HEADER)
    ok = True
    for r in (floor, agent, *([backstop] if backstop else [])):
        print(r.label)
        print(row("exposure: start event -> frozen or dead", Summary.of(r.exposure)))
        print(row("lines written by the blocked container", Summary.of(r.lines)))
        print(row("removed: start returned -> destroyed", Summary.of(r.removed)))
        print(row("removed: start called -> destroyed", Summary.of(r.removed_from_call)))
        print(row(f"probe during a burst of {r.burst_size}: start -> destroyed", Summary.of(r.probe)))
        print(f"  starts refused before the entrypoint ran: {r.refused}/{r.attempts}")
        print(f"  burst removed {r.burst_removed}/{r.burst_size}, leftovers {r.leftovers}")
        for e in r.errors[:5]:
            print(f"  note: {e}")
    exp = Summary.of(agent.exposure).p50
    lines_f, lines_a = Summary.of(floor.lines).p50, Summary.of(agent.lines).p50
    rem_f, rem_a = Summary.of(floor.removed).p50, Summary.of(agent.removed).p50
    call_f, call_a = Summary.of(floor.removed_from_call).p50, Summary.of(agent.removed_from_call).p50
    checks = [
        (f"exposure p50 {exp:.2f} ms (goal <= {GOAL_EXPOSURE_MS} ms)", exp <= GOAL_EXPOSURE_MS),
        (
            f"lines written p50 {lines_a:.0f} vs floor {lines_f:.0f}: {lines_a / max(lines_f, 1):.3f} x "
            f"(goal <= {GOAL_LINES_RATIO} x)",
            lines_a <= GOAL_LINES_RATIO * max(lines_f, 1),
        ),
        (
            f"removed p50 {rem_a:.1f} ms vs floor {rem_f:.1f} ms: {rem_a / rem_f:.2f} x (goal <= {GOAL_REMOVED_RATIO} x)",
            rem_a <= GOAL_REMOVED_RATIO * rem_f,
        ),
        (
            f"removed from the start call p50 {call_a:.1f} ms vs floor {call_f:.1f} ms: {call_a / call_f:.2f} x "
            f"(goal <= {GOAL_REMOVED_RATIO} x)",
            call_a <= GOAL_REMOVED_RATIO * call_f,
        ),
        (
            f"burst: all removed ({agent.burst_removed}/{agent.burst_size}), no leftovers",
            agent.burst_removed == agent.burst_size and agent.leftovers == 0,
        ),
    ]
    probe = Summary.of(agent.probe)
    print(
        f"\nprobe during the burst: p50 {probe.p50:.1f} ms, max {probe.max:.1f} ms (floor p50 {Summary.of(floor.probe).p50:.1f} ms)"
    )
    d0, d1 = Summary.of(no_agent_delay).p50, Summary.of(agent_delay).p50
    print(
        f"allowlisted writer, start called -> first line: p50 {d1:.1f} ms with the agent, {d0:.1f} ms without ({d1 - d0:+.1f} ms)"
    )
    if backstop is not None:
        d2 = Summary.of(backstop_delay).p50
        lines_b = Summary.of(backstop.lines).p50
        print(
            f"start-event path only: lines written p50 {lines_b:.0f} ({lines_b / max(lines_f, 1):.3f} x the floor), "
            f"allowlisted writer p50 {d2:.1f} ms ({d2 - d0:+.1f} ms); reported, not held to the goals"
        )
    for text, met in checks:
        print(f"  {'meets' if met else 'MISSES'}: {text}")
        ok &= met
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sequential", type=int, default=30, help="sequential blocked starts (default 30)")
    p.add_argument("--burst", type=int, default=100, help="concurrent blocked starts (default 100)")
    p.add_argument(
        "--allowed", type=int, default=20, help="allowlisted starts for the freeze delay (default 20)"
    )
    p.add_argument(
        "--no-backstop",
        action="store_true",
        help="skip the run of the start-event path alone (freeze_on_create = false)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the raw figures (ms) to FILE")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ig-bench-") as tmp, private_engine() as d:
        d.build_image(BLOCKED, "blocked-writer", entrypoint=WRITER)
        allowed_id = d.build_image(ALLOWED, "allowed-writer", entrypoint=WRITER)
        api = client(d)
        floor, no_agent_delay = measure_floor(d.url, api, args, Path(tmp) / "floor")
        agent, agent_delay = measure_agent(d.url, api, args, Path(tmp) / "agent", allowed_id, gate=True)
        backstop, backstop_delay = None, []
        if not args.no_backstop:
            backstop, backstop_delay = measure_agent(
                d.url, api, args, Path(tmp) / "backstop", allowed_id, gate=False
            )
        api.close()
    ok = report(floor, agent, backstop, no_agent_delay, agent_delay, backstop_delay)
    if args.json:
        runs = {"floor": asdict(floor), "agent": asdict(agent)}
        if backstop is not None:
            runs["backstop"] = asdict(backstop)
        Path(args.json).write_text(json.dumps(runs, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
