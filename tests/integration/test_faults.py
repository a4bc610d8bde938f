"""Issue 13, the fault suite: storage trouble never stalls enforcement, and nothing is lost without a trace.

Each case runs the real agent process against a private dockerd, with its state directory on a real
filesystem that is locked, frozen (fsfreeze on a loop-mounted ext4), full (a small tmpfs), emptied, deleted
or poisoned. The header-trickling registries are in test_verify_enforcement.py.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.agentproc import AgentProcess, cli, wait_for, write_config
from tests.support.dockerd import Dockerd
from tests.support.fixtures.docker import ALLOWED, OTHER
from tests.support.fixtures.fs import ext4, fill, frozen, tmpfs

pytestmark = pytest.mark.integration


def make_config(tmp_path: Path, engine: Dockerd, state: Path, busybox_images: dict[str, str]) -> Path:
    config = write_config(
        tmp_path / "config.toml",
        {
            "device": {"id": "fault-device"},
            "engine": {"url": engine.url},
            "state": {"dir": str(state)},
            "enforcement": {"stop_grace_seconds": 0},
        },
    )
    cli(config, "allowlist", "add", busybox_images[ALLOWED], check=True)
    return config


def exists(engine: Dockerd, name: str) -> bool:
    return engine.has_container(name)


def running(engine: Dockerd, name: str) -> bool:
    out = engine.docker("inspect", "--format", "{{.State.Running}}", name, check=False)
    return out.returncode == 0 and out.stdout.strip() == "true"


def gone(engine: Dockerd, name: str, timeout: float = 10) -> None:
    wait_for(lambda: not exists(engine, name), timeout, what=f"container {name} to be removed")


def decided(config: Path) -> dict[str, dict[str, Any]]:
    out = cli(config, "decisions", "--limit", "1000", "--json", check=True)
    return {d["container"]["name"]: d for d in json.loads(out.stdout)["decisions"]}


def status(config: Path) -> dict[str, Any]:
    out = cli(config, "status", "--json")
    assert "Traceback" not in out.stderr, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def run_blocked(engine: Dockerd, names: list[str]) -> None:
    for name in names:
        engine.run_untrusted("-d", "--name", name, OTHER)


@pytest.fixture
def agent_on(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for proc in started:
        if proc.proc is not None:
            proc.stop()


# -- a locked or frozen database never delays a removal ------------------------------------------------


class WriteLock:
    """Another process holding the database's write lock (``BEGIN IMMEDIATE``) until released."""

    def __init__(self, db: Path) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sqlite3, sys; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
                "db.execute('BEGIN IMMEDIATE'); print('locked', flush=True); sys.stdin.read()",
                str(db),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def test_a_write_locked_database_does_not_delay_removals(
    tmp_path: Path, engine: Dockerd, busybox_images: dict[str, str], agent_on: list[AgentProcess]
) -> None:
    state = tmp_path / "state"
    config = make_config(tmp_path, engine, state, busybox_images)
    proc = AgentProcess(config, tmp_path / "agent.log").start()
    agent_on.append(proc)
    lock = WriteLock(state / "state.db")
    try:
        names = [f"locked-{i}" for i in range(3)]
        run_blocked(engine, names)
        for name in names:  # each one within the time a removal takes without the lock
            gone(engine, name, timeout=8)
        assert lock.proc.poll() is None, "the lock was held throughout"
        proc.wait_log("locked by another process")
    finally:
        lock.release()
    wait_for(lambda: set(names) <= set(decided(config)), 15, what="the kept decisions to be written")
    assert {decided(config)[n]["verdict"] for n in names} == {"blocked"}
    proc.wait_log("state storage answers again")


def test_a_frozen_state_filesystem_does_not_delay_removals(
    tmp_path: Path, engine: Dockerd, busybox_images: dict[str, str], agent_on: list[AgentProcess]
) -> None:
    with ext4(tmp_path / "state.img", tmp_path / "mnt") as mnt:
        config = make_config(tmp_path, engine, mnt / "state", busybox_images)
        proc = AgentProcess(config, tmp_path / "agent.log").start()
        agent_on.append(proc)
        engine.docker("run", "-d", "--name", "good", ALLOWED)
        proc.wait_log("allowed container good")
        names = [f"frozen-{i}" for i in range(5)]
        with frozen(mnt):
            run_blocked(engine, names)
            for name in names:
                gone(engine, name, timeout=8)
            assert running(engine, "good")
        wait_for(lambda: set(names) <= set(decided(config)), 20, what="the kept decisions to be written")
        assert status(config)["storage"]["records_lost"] == {}
        assert proc.stop() == 0, proc.log()


# -- full disks ----------------------------------------------------------------------------------------


def test_started_on_a_full_disk_the_agent_enforces_from_its_last_state_and_says_why(
    tmp_path: Path, engine: Dockerd, busybox_images: dict[str, str], agent_on: list[AgentProcess]
) -> None:
    with tmpfs(tmp_path / "mnt", "4m") as mnt:
        config = make_config(tmp_path, engine, mnt / "state", busybox_images)
        AgentProcess(config, tmp_path / "first.log").start().stop()  # a device that ran before
        filler = fill(mnt)
        proc = AgentProcess(config, tmp_path / "agent.log").start()
        agent_on.append(proc)
        proc.wait_log("the state filesystem is full")
        engine.docker("run", "-d", "--name", "good", ALLOWED)
        run_blocked(engine, ["full-1", "full-2"])
        gone(engine, "full-1")
        gone(engine, "full-2")
        assert running(engine, "good"), "the stored allowlist is in force"
        doc = status(config)
        assert doc["storage"]["state"] == "read-only" and "full" in doc["storage"]["problem"]
        edit = cli(config, "allowlist", "add", busybox_images[OTHER])
        assert edit.returncode != 0 and "full" in edit.stderr and "Traceback" not in edit.stderr
        filler.unlink()
        proc.wait_log("writable again", timeout=15)
        wait_for(
            lambda: {"good", "full-1", "full-2"} <= set(decided(config)),
            15,
            what="decisions made on the full disk to be written",
        )
        assert status(config)["storage"]["state"] == "ok"
        assert proc.stop() == 0, proc.log()


def test_a_disk_that_fills_while_running_loses_nothing_silently(
    tmp_path: Path, engine: Dockerd, busybox_images: dict[str, str], agent_on: list[AgentProcess]
) -> None:
    with tmpfs(tmp_path / "mnt", "4m") as mnt:
        config = make_config(tmp_path, engine, mnt / "state", busybox_images)
        proc = AgentProcess(config, tmp_path / "agent.log").start()
        agent_on.append(proc)
        filler = fill(mnt)
        names = [f"filling-{i}" for i in range(4)]
        run_blocked(engine, names)
        for name in names:
            gone(engine, name)
        filler.unlink()
        wait_for(lambda: set(names) <= set(decided(config)), 20, what="the kept decisions to be written")
        storage = status(config)["storage"]
        assert storage["records_lost"] == {} and storage["state"] == "ok"
        assert proc.stop() == 0, proc.log()


# -- state that cannot be silently reset ---------------------------------------------------------------


def test_an_empty_database_is_refused_and_the_backup_restores_it(
    tmp_path: Path, engine: Dockerd, busybox_images: dict[str, str]
) -> None:
    state = tmp_path / "state"
    config = make_config(tmp_path, engine, state, busybox_images)
    engine.docker("run", "-d", "--name", "workload", ALLOWED)
    first = AgentProcess(config, tmp_path / "first.log").start()
    first.wait_log("allowed container workload")
    wait_for(lambda: (state / "state.db.bak").exists(), 10, what="the backup of the last good state")
    assert first.stop() == 0
    (state / "state.db").write_bytes(b"")  # a crash mid-write
    refused = AgentProcess(config, tmp_path / "refused.log").start(wait_scan=False)
    assert refused.proc is not None and refused.proc.wait(timeout=30) != 0
    refused.proc = None
    log = refused.log()
    assert "is empty (0 bytes)" in log and "imageguard state restore" in log, log
    assert running(engine, "workload"), "nothing was enforced from an empty policy"
    out = cli(config, "state", "restore", "--json", check=True)
    assert json.loads(out.stdout)["replaced"].startswith(str(state / "state.db.replaced-"))
    again = AgentProcess(config, tmp_path / "again.log").start()
    try:
        assert running(engine, "workload")
        assert busybox_images[ALLOWED] in cli(config, "allowlist", "list", check=True).stdout
    finally:
        assert again.stop() == 0


def test_a_state_directory_deleted_under_the_agent_is_noticed_and_put_back(
    tmp_path: Path, engine: Dockerd, busybox_images: dict[str, str], agent_on: list[AgentProcess]
) -> None:
    state = tmp_path / "state"
    config = make_config(tmp_path, engine, state, busybox_images)
    proc = AgentProcess(config, tmp_path / "agent.log").start()
    agent_on.append(proc)
    subprocess.run(["rm", "-rf", str(state)], check=True)
    proc.wait_log("was deleted while the agent has it open")
    proc.wait_log("the state database is back")
    # the CLI edits the database the agent uses again: an edit reaches the running agent
    cli(config, "allowlist", "add", busybox_images[OTHER], check=True)
    proc.wait_log("policy reloaded", timeout=5)
    engine.docker("run", "-d", "--name", "now-allowed", OTHER)
    proc.wait_log("allowed container now-allowed")
    assert decided(config)["now-allowed"]["verdict"] == "allowed"
    assert status(config)["counters"]["state_file_replaced"] >= 1


def test_the_cli_refuses_to_edit_a_database_the_agent_does_not_use(
    tmp_path: Path, engine: Dockerd, busybox_images: dict[str, str], agent_on: list[AgentProcess]
) -> None:
    state = tmp_path / "state"
    config = make_config(tmp_path, engine, state, busybox_images)
    proc = AgentProcess(config, tmp_path / "agent.log").start()
    agent_on.append(proc)
    cli(config, "state", "backup", "--to", str(tmp_path / "copy.db"), check=True)
    # a copy moved over the live file: same content, but not the file the agent has open
    (tmp_path / "copy.db").replace(state / "state.db")
    edit = cli(config, "allowlist", "add", busybox_images[OTHER])
    if edit.returncode == 0:  # the agent was quicker and already put its own file back
        proc.wait_log("replaced by another file")
    else:
        assert "has another state database open" in edit.stderr, edit.stderr
    proc.wait_log("the state database is back")
    assert list(state.glob("state.db.replaced-*")), "the file that took its place is kept"


# -- poison rows ---------------------------------------------------------------------------------------


def test_undecodable_rows_are_set_aside_and_everything_else_goes_on(
    tmp_path: Path, engine: Dockerd, busybox_images: dict[str, str]
) -> None:
    state = tmp_path / "state"
    config = make_config(tmp_path, engine, state, busybox_images)
    first = AgentProcess(config, tmp_path / "first.log").start()
    run_blocked(engine, ["p-1", "p-2"])
    gone(engine, "p-1")
    gone(engine, "p-2")
    wait_for(lambda: {"p-1", "p-2"} <= set(decided(config)), 10, what="decisions")
    assert first.stop() == 0
    db = sqlite3.connect(state / "state.db")
    db.execute(
        "UPDATE decisions SET record = '{not json' WHERE container_id = (SELECT MIN(container_id) FROM decisions)"
    )
    db.commit()
    db.close()
    out = cli(config, "decisions", "--json")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert len(json.loads(out.stdout)["decisions"]) == 1
    assert status(config)["storage"]["poison_rows"] == {"decisions": 1}
    again = AgentProcess(config, tmp_path / "again.log").start()
    try:
        run_blocked(engine, ["p-3"])
        gone(engine, "p-3")
        wait_for(lambda: "p-3" in decided(config), 10, what="a new decision")
    finally:
        assert again.stop() == 0


# -- optional parts that cannot start --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mqtt", "words"),
    [
        ({"url": "mqtt://127.0.0.1:1", "policy_signing_key": "/nonexistent/policy.pub"}, "policy.pub"),
        ({"url": "mqtt://192.0.2.10:1883"}, "plaintext MQTT to a broker on another host"),
        ({"url": "mqtts://127.0.0.1:1", "ca_bundle": "/nonexistent/ca.pem"}, "ca.pem"),
    ],
    ids=["signing-key-missing", "plaintext-remote", "tls-file-missing"],
)
def test_a_broken_optional_part_is_disabled_loudly_and_enforcement_goes_on(
    tmp_path: Path,
    engine: Dockerd,
    busybox_images: dict[str, str],
    agent_on: list[AgentProcess],
    mqtt: dict[str, str],
    words: str,
) -> None:
    config = write_config(
        tmp_path / "config.toml",
        {
            "device": {"id": "degraded-device"},
            "engine": {"url": engine.url},
            "state": {"dir": str(tmp_path / "state")},
            "enforcement": {"stop_grace_seconds": 0},
            "mqtt": mqtt,
        },
    )
    proc = AgentProcess(config, tmp_path / "agent.log").start()
    agent_on.append(proc)
    proc.wait_log("MQTT is DISABLED")
    assert words in proc.log()
    run_blocked(engine, ["while-degraded"])
    gone(engine, "while-degraded")
    doc = status(config)
    assert "mqtt" in doc["agent"]["disabled"] and words in doc["agent"]["disabled"]["mqtt"]
    text = cli(config, "status").stdout
    assert "DISABLED: mqtt" in text
