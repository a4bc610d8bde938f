"""Issue 11: what was never allowed is killed at once (SIGKILL, no grace, never thawed); only a container
that was allowed and loses that gets the stop grace period. Judged from the engine's own kill events.

These are the start-event path's rules, so the gate at cgroup creation is off here (it would refuse the start
before there is any kill to see); tests/integration/test_gate.py tests the gate."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agentproc import AgentProcess, cli, wait_for, write_config
from tests.support.dockerd import Dockerd
from tests.support.fixtures.docker import ALLOWED, OTHER

pytestmark = pytest.mark.integration

GRACE = 3  # long enough that a SIGTERM-first stop would show in the events


@pytest.fixture
def agent(tmp_path: Path, engine: Dockerd, busybox_images: dict[str, str]) -> Iterator[tuple[Path, Dockerd]]:
    config = write_config(
        tmp_path / "config.toml",
        {
            "device": {"id": "kill-test"},
            "engine": {"url": engine.url},
            "state": {"dir": str(tmp_path / "state")},
            "enforcement": {"stop_grace_seconds": GRACE, "freeze_on_create": False},
        },
    )
    cli(config, "allowlist", "add", busybox_images[ALLOWED], check=True)
    proc = AgentProcess(config, tmp_path / "agent.log").start()
    yield config, engine
    assert proc.stop() == 0, proc.log()


def exists(engine: Dockerd, name: str) -> bool:
    return engine.has_container(name)


def events(engine: Dockerd, cid: str, since: str, kind: str) -> list[dict[str, str]]:
    """The engine's own record of ``kind`` events of a container since ``since``, in order.

    Filtered here, not with ``--filter container=``: the engine no longer resolves a removed container.
    """
    out = engine.docker(
        # --until a moment ahead: the events of the current second are in (the command waits for it)
        "events",
        "--since",
        since,
        "--until",
        str(int(time.time()) + 1),
        "--format",
        "{{.Action}} {{.Actor.ID}} {{json .Actor.Attributes}}",
    ).stdout
    found = []
    for line in out.splitlines():
        action, actor, attributes = line.split(" ", 2)
        if action == kind and actor == cid:
            found.append(json.loads(attributes))
    return found


def kill_signals(engine: Dockerd, cid: str, since: str) -> list[str]:
    return [e.get("signal", "") for e in events(engine, cid, since, "kill")]


def now(engine: Dockerd) -> str:
    return str(int(time.time()) - 1)  # the engine runs on this host


def test_never_allowed_container_is_killed_without_sigterm(agent: tuple[Path, Dockerd]) -> None:
    _, engine = agent
    since = now(engine)
    cid = engine.docker("run", "-d", "--name", "never", OTHER).stdout.strip()
    wait_for(lambda: not exists(engine, "never"), 30, what="the blocked container to be removed")
    assert "15" not in kill_signals(engine, cid, since)  # never asked to stop: no SIGTERM, no grace
    assert [e.get("exitCode") for e in events(engine, cid, since, "die")] == ["137"]  # died of SIGKILL


def test_previously_allowed_container_gets_its_grace(
    agent: tuple[Path, Dockerd], busybox_images: dict[str, str]
) -> None:
    config, engine = agent
    cid = engine.docker("run", "-d", "--name", "was-ok", ALLOWED).stdout.strip()
    wait_for(
        lambda: any(
            d["container"]["name"] == "was-ok" and d["verdict"] == "allowed"
            for d in json.loads(cli(config, "decisions", "--json", check=True).stdout)["decisions"]
        ),
        15,
        what="the allowed decision",
    )
    since = now(engine)
    cli(config, "allowlist", "remove", busybox_images[ALLOWED], check=True)
    wait_for(lambda: not exists(engine, "was-ok"), 30, what="the withdrawn container to be removed")
    assert kill_signals(engine, cid, since)[0] == "15"  # SIGTERM first: a clean shutdown


WRITER_LOOP = [
    "/bin/busybox",
    "sh",
    "-c",
    "trap '' TERM; while true; do echo x >> /out/log; /bin/busybox usleep 2000; done",
]


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_containers_left_frozen_by_a_crashed_agent_are_decided_again(
    tmp_path: Path, engine: Dockerd, busybox_images: dict[str, str]
) -> None:
    """An agent that died mid-verification left containers frozen: the next one thaws what is allowed and
    kills what is not, without letting it run a single instruction more."""
    from agent.adapters.cgroups import ContainerCgroup

    config = write_config(
        tmp_path / "config.toml",
        {
            "device": {"id": "crash-test"},
            "engine": {"url": engine.url},
            "state": {"dir": str(tmp_path / "state")},
            "enforcement": {"stop_grace_seconds": GRACE},
        },
    )
    allowed_id = engine.build_image("ig-kill/writer-ok:1", "writer-ok", WRITER_LOOP)
    engine.build_image("ig-kill/writer-bad:1", "writer-bad", WRITER_LOOP)
    cli(config, "allowlist", "add", allowed_id, check=True)
    out = {n: tmp_path / n for n in ("ok", "bad")}
    ids = {}
    for n, d in out.items():
        d.mkdir(mode=0o777)
        ids[n] = engine.docker(
            "run", "-d", "--name", f"frozen-{n}", "-v", f"{d}:/out", f"ig-kill/writer-{n}:1"
        ).stdout.strip()
    groups = {n: ContainerCgroup.find(cid) for n, cid in ids.items()}
    if any(g is None for g in groups.values()):
        pytest.skip("this engine's container cgroups are not where dockerd's drivers put them")
    wait_for(lambda: all(lines(d / "log") > 0 for d in out.values()), 10, what="the writers to write")
    for g in groups.values():
        assert g is not None
        g.freeze()
    time.sleep(0.2)
    before = {n: lines(d / "log") for n, d in out.items()}
    proc = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        wait_for(lambda: not exists(engine, "frozen-bad"), 30, what="the frozen unallowed container to go")
        assert lines(out["bad"] / "log") == before["bad"]  # killed while frozen: not one line more
        wait_for(
            lambda: lines(out["ok"] / "log") > before["ok"], 15, what="the allowed container to be thawed"
        )
        assert "left frozen" in proc.log()
    finally:
        assert proc.stop() == 0, proc.log()
        engine.docker("rm", "-f", "frozen-ok", "frozen-bad", check=False)


def test_a_container_whose_lock_dockerd_holds_is_killed_all_the_same(
    tmp_path: Path, engine: Dockerd, busybox_images: dict[str, str]
) -> None:
    """Issue 11: an unfinished ``docker cp`` upload holds the container's lock in dockerd, so inspect, stop and
    kill through the API all wait. A container that loses its allowance meanwhile is killed through its
    cgroup, on what the agent knew of it, and removed once dockerd answers again."""
    import socket

    config = write_config(
        tmp_path / "config.toml",
        {
            "device": {"id": "lock-test"},
            "engine": {"url": engine.url, "timeout_seconds": 3},
            "state": {"dir": str(tmp_path / "state")},
            "enforcement": {"stop_grace_seconds": 1},
        },
    )
    cli(config, "allowlist", "add", busybox_images[ALLOWED], check=True)
    proc = AgentProcess(config, tmp_path / "agent.log").start()
    upload = socket.socket(socket.AF_UNIX)
    try:
        cid = engine.docker("run", "-d", "--name", "locked", ALLOWED).stdout.strip()
        proc.wait_log("allowed container locked")
        pid = int(engine.docker("inspect", "--format", "{{.State.Pid}}", cid).stdout)
        upload.connect(str(engine.socket))
        upload.sendall(
            f"PUT /containers/{cid}/archive?path=/ HTTP/1.1\r\nHost: docker\r\n"
            "Content-Type: application/x-tar\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        upload.sendall(b"200\r\n" + b"\0" * 512 + b"\r\n")  # a tar upload that never finishes
        cli(config, "allowlist", "remove", busybox_images[ALLOWED], check=True)
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), 30, what="the locked container's process to die")
        proc.wait_log("killing it through its cgroup")
    finally:
        upload.close()
        try:
            wait_for(
                lambda: engine.docker("inspect", "locked", check=False).returncode != 0, 60, what="removal"
            )
        finally:
            assert proc.stop() == 0, proc.log()
