"""The agent's idle footprint and how soon after launch it enforces.

Run: ``.venv/bin/python bench/footprint.py [--idle 20] [--launches 5]`` (root: it starts a private dockerd).

* memory: VmRSS of the agent after its start-up scan over 7 containers (5 allowlisted, 2 not), once with an
  allowlist-only policy and once with a trust anchor too;
* CPU with no events: utime+stime delta over ``--idle`` seconds, as a share of one core;
* launch to enforcing, two definitions, from ``Popen`` returning:
  (a) the agent logged "scan done" (events followed and every existing container decided);
  (b) a not-allowlisted container, started right after ``Popen``, is destroyed (engine event time).
* import cost of the modules the agent loads (``python -X importtime``), biggest first.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import docker
from harness import (
    CLK_TCK,
    HEADER,
    PYTHON,
    REPO,
    TRAP_ENTRYPOINT,
    AgentProcess,
    EventWatcher,
    Summary,
    client,
    create_containers,
    private_engine,
    proc_cpu_ticks,
    proc_status,
    row,
)

from tests.support.ports import free_port

ALLOWED = "imageguard-bench/allowed:1"
BLOCKED = "imageguard-bench/blocked:1"
GOAL_RSS_MB = 40.0
GOAL_CPU_PCT = 1.0
GOAL_LAUNCH_S = 1.0


def _kb(text: str) -> float:
    return int(text.split()[0]) / 1024


def idle_footprint(
    url: str,
    api_c: docker.APIClient,
    allowed_id: str,
    work: Path,
    args: argparse.Namespace,
    *,
    anchors: bool,
    metrics: bool = False,
) -> bool:
    for cid in create_containers(api_c, ALLOWED, 5, "fp-allowed") + create_containers(
        api_c, BLOCKED, 2, "fp-blocked"
    ):
        api_c.start(cid)
    policy: dict[str, Any] = {
        "version": 1,
        "allowlist": [{"digest": allowed_id, "comment": "footprint benchmark"}],
    }
    if anchors:  # the example key anchor: its policy is parsed, but local images never need a verification
        example = json.loads((REPO / "deploy" / "policy.example.json").read_text())
        policy["trust_anchors"] = example["trust_anchors"]
    tag = f"{anchors}-{metrics}"
    extra = f'\n[metrics]\nenabled = true\nlisten = "127.0.0.1:{free_port()}"\n' if metrics else ""
    agent = AgentProcess(
        url, work / f"idle-{tag}", grace=1, env=args.env, python_args=args.python_arg, extra_config=extra
    )
    # imported by the CLI beforehand, as on a device (the systemd unit runs no --policy)
    (work / f"policy-{tag}.json").write_text(json.dumps(policy))
    agent.cli("policy", "import", str(work / f"policy-{tag}.json"))
    idle = args.idle
    agent.launch()
    try:
        agent.wait_log("scan done", timeout=30)
        time.sleep(2)  # let the start-up work settle
        st = proc_status(agent.pid)
        remaining = {c["Names"][0].lstrip("/") for c in api_c.containers(all=True)}
        t0, c0 = time.monotonic(), proc_cpu_ticks(agent.pid)
        time.sleep(idle)
        t1, c1 = time.monotonic(), proc_cpu_ticks(agent.pid)
        st_after = proc_status(agent.pid)
    finally:
        code = agent.stop()
    rss = _kb(st["VmRSS"])
    cpu = (c1 - c0) / CLK_TCK / (t1 - t0) * 100
    tuning = " ".join([*(f"{k}={v}" for k, v in args.env.items()), *args.python_arg]) or "none"
    what = ("allowlist + 1 trust anchor" if anchors else "allowlist only") + (
        ", metrics endpoint on" if metrics else ""
    )
    print(
        f"\nIdle footprint, policy: {what} (after the start-up scan of 7 containers: 5 allowlisted, 2 not;"
        f" tuning: {tuning})"
    )
    print(
        f"  {'VmRSS':<34} {rss:>7.1f} MB   goal <= {GOAL_RSS_MB:.0f} MB  {'meets' if rss <= GOAL_RSS_MB else 'MISSES'}"
    )
    print(
        f"  {'  of which anonymous / file-backed':<34} {_kb(st['RssAnon']):>7.1f} / {_kb(st['RssFile']):.1f} MB"
    )
    print(f"  {'VmHWM (peak RSS)':<34} {_kb(st['VmHWM']):>7.1f} MB")
    print(f"  {'VmRSS after the idle window':<34} {_kb(st_after['VmRSS']):>7.1f} MB")
    print(f"  {'threads':<34} {st['Threads']:>7}")
    print(
        f"  {'CPU with no events':<34} {cpu:>7.2f} %    goal <= {GOAL_CPU_PCT:.0f} %   "
        f"{'meets' if cpu <= GOAL_CPU_PCT else 'MISSES'}  ({c1 - c0} ticks in {t1 - t0:.1f} s)"
    )
    kept = sorted(n for n in remaining if n.startswith("fp-allowed"))
    gone = [n for n in ("fp-blocked-0", "fp-blocked-1") if n in remaining]
    sane = len(kept) == 5 and not gone and code == 0
    print(
        f"  sanity: {len(kept)}/5 allowlisted containers kept, {2 - len(gone)}/2 blocked removed, "
        f"agent exit status {code}" + ("" if sane else "  <-- UNEXPECTED")
    )
    for cid in [c["Id"] for c in api_c.containers(all=True)]:
        api_c.remove_container(cid, force=True)
    return rss <= GOAL_RSS_MB and cpu <= GOAL_CPU_PCT and sane


def launch_to_enforcing(url: str, api: docker.APIClient, work: Path, args: argparse.Namespace) -> bool:
    launches = args.launches
    scan_done: list[float] = []
    following: list[float] = []
    removed: list[float] = []
    for i in range(launches):
        (cid,) = create_containers(api, BLOCKED, 1, f"fp-launch-{i}")
        agent = AgentProcess(url, work / f"launch-{i}", grace=0, env=args.env, python_args=args.python_arg)
        cmd = agent.command()
        with EventWatcher(url) as watcher:
            agent.launch(cmd)
            api.start(cid)
            try:
                ok = watcher.wait_for([cid], "destroy", timeout=30)
                done = agent.wait_log("scan done", timeout=30)
                follow = agent.wait_log("following engine events", timeout=1)
            finally:
                agent.stop()
        if ok:
            removed.append((watcher.event_ns(cid, "destroy") - agent.launched_ns) / 1e6)  # type: ignore[operator]
        scan_done.append((done - agent.launched_ns) / 1e6)
        following.append((follow - agent.launched_ns) / 1e6)
    print(f"\nLaunch to enforcing ({launches} launches, from Popen; fresh state directory each time)")
    print(HEADER)
    print(row("Popen -> log 'following engine events'", Summary.of(following)))
    s_done, s_rm = Summary.of(scan_done), Summary.of(removed)
    goal = GOAL_LAUNCH_S * 1000
    print(
        row("(a) Popen -> log 'scan done'", s_done, f"goal < {goal:.0f}  {_verdict(s_done.max < goal)} (max)")
    )
    print(
        row(
            "(b) Popen -> unlisted container destroyed",
            s_rm,
            f"goal < {goal:.0f}  {_verdict(s_rm.max < goal)} (max)",
        )
    )
    if len(removed) != launches:
        print(f"  {launches - len(removed)} unlisted containers were NOT removed  <-- MISS")
    return s_done.max < goal and s_rm.max < goal and len(removed) == launches


def _verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def import_costs(top: int = 10) -> None:
    """Import time and memory of what the agent loads, grouped by top-level package (one fresh interpreter)."""
    modules = ["agent.cli.main", "agent.cli.agent", "agent.app"]
    out = subprocess.run(
        [PYTHON, "-X", "importtime", "-c", "import " + ", ".join(modules)],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stderr
    own: dict[str, int] = {}
    for line in out.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \| \s*(\S+)", line)
        if m:
            package = m.group(2).split(".")[0]
            own[package] = own.get(package, 0) + int(m.group(1))
    total = sum(own.values())
    print(f"\nImport time by top-level package (self time, additive; all imports {total / 1000:.0f} ms)")
    for name, us in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {us / 1000:>7.1f} ms  {name}")
    steps = [
        "logging",
        "sqlite3",
        "ssl",
        "urllib3",
        "requests",
        "docker",
        "jsonschema",
        *modules,
        "cryptography.x509",
        "agent.runtime.verification",
    ]
    rss = subprocess.run(
        [PYTHON, "-c", _RSS_STEPS, *steps], cwd=REPO, capture_output=True, text=True, check=True
    )
    print(
        "RSS growth as the agent's imports load, in order (each line: RSS after, growth); the last two load"
    )
    print("only with trust anchors in the policy / at the first signature verification:")
    print(rss.stdout.rstrip())


_RSS_STEPS = """
import importlib, re, sys
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
prev = rss()
print(f"    {prev:6.1f} MB           interpreter")
for m in sys.argv[1:]:
    importlib.import_module(m)
    now = rss()
    print(f"    {now:6.1f} MB  {now - prev:+5.1f}    {m}")
    prev = now
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--idle", type=float, default=20.0, help="seconds of the no-event CPU window (default 20)")
    p.add_argument(
        "--launches", type=int, default=5, help="launches for the launch-to-enforcing figure (default 5)"
    )
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra agent environment")
    p.add_argument(
        "--python-arg", action="append", default=[], metavar="OPT", help="extra interpreter option"
    )
    p.add_argument("--skip-launch", action="store_true", help="only measure the idle footprint")
    args = p.parse_args()
    args.env = dict(e.split("=", 1) for e in args.env)
    with tempfile.TemporaryDirectory(prefix="ig-bench-") as tmp, private_engine() as d:
        d.build_image(BLOCKED, "blocked", entrypoint=TRAP_ENTRYPOINT)
        allowed_id = d.build_image(ALLOWED, "allowed", entrypoint=TRAP_ENTRYPOINT)
        api = client(d)
        ok = idle_footprint(d.url, api, allowed_id, Path(tmp), args, anchors=False)
        ok = idle_footprint(d.url, api, allowed_id, Path(tmp), args, anchors=True) and ok
        # the cost of the optional endpoint, reported (not held to the floor: it is opt-in)
        idle_footprint(d.url, api, allowed_id, Path(tmp), args, anchors=False, metrics=True)
        if not args.skip_launch:
            ok = launch_to_enforcing(d.url, api, Path(tmp), args) and ok
        api.close()
    import_costs()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
