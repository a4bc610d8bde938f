"""Issue 11: what was never allowed is killed at once (SIGKILL, no grace, never thawed); only a container
that was allowed and loses that gets the stop grace period. Judged from the engine's own kill events."""

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
            "enforcement": {"stop_grace_seconds": GRACE},
        },
    )
    cli(config, "allowlist", "add", busybox_images[ALLOWED], check=True)
    proc = AgentProcess(config, tmp_path / "agent.log").start()
    yield config, engine
    assert proc.stop() == 0, proc.log()


def exists(engine: Dockerd, name: str) -> bool:
    return engine.docker("inspect", name, check=False).returncode == 0


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
