"""Issue 11: a start is held at its cgroup's creation, before the container's entrypoint runs.

On the real engine, with a writer whose PID 1 ignores SIGTERM and appends to a bind-mounted file in a tight
loop: a blocked container must not write one line, whether the agent saw its create or only listed it, on
cgroup v1 and on a dockerd running on cgroup v2; an allowlisted one runs. And a start that an agent froze
there and then died on (its start and dockerd's lock on the container held for good) is settled by the next
agent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.agentproc import AgentProcess, cli, wait_for, write_config
from tests.support.dockerd import Dockerd
from tests.support.fixtures.docker import ALLOWED

pytestmark = pytest.mark.integration

WRITER = "ig-test/writer:1"
# PID 1 is a shell that ignores SIGTERM and writes as fast as it can
LOOP = ["/bin/busybox", "sh", "-c", "trap '' TERM; while :; do echo x >> /out/log; done"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def writer(dockerd: Dockerd) -> str:
    return dockerd.build_image(WRITER, "writer", entrypoint=LOOP)


def agent_config(tmp_path: Path, engine: Dockerd, name: str = "config.toml") -> Path:
    return write_config(
        tmp_path / name,
        {
            "device": {"id": "gate-test"},
            "engine": {"url": engine.url},
            "state": {"dir": str(tmp_path / "state")},
            "enforcement": {"stop_grace_seconds": 5},
        },
    )


@pytest.fixture
def agent(tmp_path: Path, engine: Dockerd, busybox_images: dict[str, str], writer: str) -> Iterator[Path]:
    """The agent (enforce mode, only ALLOWED on the allowlist); its configuration file."""
    config = agent_config(tmp_path, engine)
    cli(config, "allowlist", "add", busybox_images[ALLOWED], check=True)
    proc = AgentProcess(config, tmp_path / "agent.log").start()
    yield config
    assert proc.stop() == 0, proc.log()


def out_dir(tmp_path: Path, name: str) -> Path:
    out = tmp_path / "out" / name
    out.mkdir(parents=True)
    out.chmod(0o777)
    return out


def lines(out: Path) -> int:
    log = out / "log"
    return log.read_bytes().count(b"\n") if log.exists() else 0


def exists(engine: Dockerd, name: str) -> bool:
    return engine.has_container(name)


def refused_before_its_entrypoint(engine: Dockerd, tmp_path: Path, name: str, *run_args: str) -> None:
    """``docker run`` the blocked writer: its start fails, the agent removes it, and it never wrote a line."""
    out = out_dir(tmp_path, name)
    run = engine.run_untrusted("-d", "--name", name, *run_args, "-v", f"{out}:/out", WRITER)
    assert run.returncode != 0, f"the start of blocked container {name} succeeded"
    wait_for(lambda: not exists(engine, name), 30, what=f"blocked container {name} to be removed")
    time.sleep(0.3)  # anything that got to run would have written by now
    assert lines(out) == 0, f"blocked container {name}'s entrypoint ran"


def decisions(config: Path, name: str) -> list[dict[str, Any]]:
    rows = json.loads(cli(config, "decisions", "--json", check=True).stdout)["decisions"]
    return [r for r in rows if r["container"].get("name") == name]


def counter(config: Path, name: str) -> int:
    return int(json.loads(cli(config, "status", "--json").stdout)["counters"].get(name, 0))


def started_events(engine: Dockerd, name: str, since: str) -> int:
    out = engine.docker(
        "events", "--since", since, "--until", str(int(time.time()) + 1), "--format", "{{.Action}} {{.Actor.Attributes.name}}"
    ).stdout  # fmt: skip
    return sum(1 for line in out.splitlines() if line == f"start {name}")


def test_a_blocked_start_fails_before_its_entrypoint_runs(
    agent: Path, engine: Dockerd, tmp_path: Path
) -> None:
    config = agent
    since = str(int(time.time()) - 1)
    refused_before_its_entrypoint(engine, tmp_path, "blocked")
    assert started_events(engine, "blocked", since) == 0  # the engine never reported it started
    [record] = decisions(config, "blocked")
    assert (record["verdict"], record["reason"], record["action"]) == ("blocked", "not-allowlisted", "remove")
    wait_for(lambda: counter(config, "killed_before_entrypoint") == 1, 10, what="the kill to be counted")
    assert "killed before entrypoint 1" in cli(config, "status").stdout


def test_an_allowlisted_container_runs_and_is_decided_once(agent: Path, engine: Dockerd) -> None:
    config = agent
    engine.docker("run", "-d", "--name", "fine", ALLOWED)
    wait_for(lambda: bool(decisions(config, "fine")), 15, what="its decision")
    time.sleep(0.5)
    assert engine.docker("inspect", "-f", "{{.State.Running}}", "fine").stdout.strip() == "true"
    assert [d["verdict"] for d in decisions(config, "fine")] == ["allowed"]


def test_its_own_cgroup_parent_does_not_take_a_container_past_the_gate(
    agent: Path, engine: Dockerd, tmp_path: Path
) -> None:
    """``--cgroup-parent`` puts the container's cgroup where its creator likes, made with one mkdir -p."""
    parent = f"/ig-test-parent-{os.getpid()}/nested"
    refused_before_its_entrypoint(engine, tmp_path, "elsewhere", "--cgroup-parent", parent)


def test_nor_does_a_cgroup_parent_inside_an_allowed_containers_cgroup(
    agent: Path, engine: Dockerd, tmp_path: Path
) -> None:
    host = engine.docker("run", "-d", "--name", "host", ALLOWED).stdout.strip()
    time.sleep(0.5)
    refused_before_its_entrypoint(engine, tmp_path, "inside", "--cgroup-parent", f"/docker/{host}")
    assert engine.docker("inspect", "-f", "{{.State.Running}}", "host").stdout.strip() == "true"


def test_a_container_created_before_the_agent_started_is_held_too(
    tmp_path: Path, engine: Dockerd, busybox_images: dict[str, str], writer: str
) -> None:
    """No create event was seen: the gate knows it from the agent's first scan, and decides on the list."""
    out = out_dir(tmp_path, "early")
    engine.docker("create", "--name", "early", "-v", f"{out}:/out", WRITER)
    config = agent_config(tmp_path, engine)
    cli(config, "allowlist", "add", busybox_images[ALLOWED], check=True)
    proc = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        assert engine.docker("start", "early", check=False).returncode != 0
        wait_for(lambda: not exists(engine, "early"), 30, what="the blocked container to be removed")
        time.sleep(0.3)
        assert lines(out) == 0
    finally:
        assert proc.stop() == 0, proc.log()


# -- an agent that froze a start and died ----------------------------------------------------------------

FREEZER = """
import sys, threading
sys.path.insert(0, {repo!r})
from agent.adapters.cgroups import CgroupWatch
def freeze(cid, cg):
    cg.freeze()
    print("frozen", cid, flush=True)
CgroupWatch(freeze).start()
print("watching", flush=True)
threading.Event().wait()
"""


def test_a_start_left_frozen_by_a_dead_agent_is_settled_by_the_next(
    tmp_path: Path, engine: Dockerd, busybox_images: dict[str, str], writer: str
) -> None:
    """An agent freezes a start at its cgroup's creation and is SIGKILLed before deciding: the start (and
    dockerd's lock on the container, so even an inspect) waits for good. The next agent settles it: the
    blocked one dies without writing a line, the allowed one runs."""
    out = out_dir(tmp_path, "stuck")
    engine.docker("create", "--name", "stuck", "-v", f"{out}:/out", WRITER)
    engine.docker("create", "--name", "stuck-ok", ALLOWED)
    dead = subprocess.Popen(
        [sys.executable, "-c", FREEZER.format(repo=str(REPO))], stdout=subprocess.PIPE, text=True
    )
    assert dead.stdout is not None and dead.stdout.readline().strip() == "watching"
    starts: dict[str, subprocess.CompletedProcess[str]] = {}

    def start(name: str) -> None:
        starts[name] = engine.docker("start", name, check=False, timeout=120)

    threads = [threading.Thread(target=start, args=(n,)) for n in ("stuck", "stuck-ok")]
    try:
        for t in threads:
            t.start()
        frozen = {dead.stdout.readline().split()[1] for _ in threads}
    finally:
        dead.kill()  # died between its freeze and its decision
        dead.wait()
        dead.stdout.close()
    assert len(frozen) == 2
    time.sleep(1)
    assert not starts, "a start went through although its container was frozen"
    with pytest.raises(subprocess.TimeoutExpired):  # even an inspect waits for the start: no agent may
        engine.docker("inspect", "stuck", timeout=3)
    config = agent_config(tmp_path, engine)
    cli(config, "allowlist", "add", busybox_images[ALLOWED], check=True)
    proc = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        for t in threads:
            t.join(60)
        assert starts["stuck"].returncode != 0 and starts["stuck-ok"].returncode == 0, starts
        wait_for(lambda: not exists(engine, "stuck"), 30, what="the blocked container to be removed")
        assert lines(out) == 0
        assert engine.docker("inspect", "-f", "{{.State.Running}}", "stuck-ok").stdout.strip() == "true"
        assert "left frozen before its start" in proc.log()
    finally:
        assert proc.stop() == 0, proc.log()


# -- dockerd on cgroup v2 ------------------------------------------------------------------------------

#: runs a command in a mount namespace of its own in which /sys/fs/cgroup is the unified (v2) hierarchy:
#: on this hybrid host, that is how a dockerd (and an agent) see a cgroup v2 machine
V2 = [
    "unshare",
    "-m",
    "--propagation",
    "private",
    "sh",
    "-c",
    'mount -t cgroup2 none /sys/fs/cgroup && exec "$@"',
    "v2",
]


def cgroup2_available() -> bool:
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return True  # already a v2 host
    return "cgroup2" in Path("/proc/filesystems").read_text() and os.geteuid() == 0


@pytest.fixture(scope="module")
def v2_engine() -> Iterator[Dockerd]:
    if not cgroup2_available():
        pytest.skip("this kernel has no cgroup v2")
    wrapper = [] if Path("/sys/fs/cgroup/cgroup.controllers").exists() else V2
    root = Path("/tmp") / f"ig-dockerd-v2-{os.getpid()}"
    d = Dockerd(root, wrapper=wrapper)
    d.start()
    try:
        assert d.docker("info", "--format", "{{.CgroupVersion}}").stdout.strip() == "2"
        yield d
    finally:
        d.remove_all_containers()
        d.stop()
        subprocess.run(["rm", "-rf", str(root)], check=False)


def test_on_a_cgroup_v2_engine_a_blocked_start_fails_before_its_entrypoint_runs(
    tmp_path: Path, v2_engine: Dockerd
) -> None:
    allowed = v2_engine.build_image(ALLOWED, "allowed")
    v2_engine.build_image(WRITER, "writer", entrypoint=LOOP)
    config = agent_config(tmp_path, v2_engine)
    cli(config, "allowlist", "add", allowed, check=True)
    proc = AgentProcess(config, tmp_path / "agent.log", wrapper=v2_engine.wrapper).start()
    try:
        refused_before_its_entrypoint(v2_engine, tmp_path, "blocked-v2")
        v2_engine.docker("run", "-d", "--name", "fine-v2", ALLOWED)
        time.sleep(1)
        assert v2_engine.docker("inspect", "-f", "{{.State.Running}}", "fine-v2").stdout.strip() == "true"
        # and the start-event path's kill on v2: the allowlist shrinks, the running container goes
        cli(config, "allowlist", "remove", allowed, check=True)
        wait_for(lambda: not exists(v2_engine, "fine-v2"), 30, what="the no longer allowed container to go")
    finally:
        assert proc.stop() == 0, proc.log()
