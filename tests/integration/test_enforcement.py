"""Issue 2 on the real engine: allowlist enforcement by a running agent process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.core.schemas import validate
from tests.support.agentproc import AgentProcess, cli, wait_for, write_config
from tests.support.dockerd import Dockerd
from tests.support.fixtures.docker import ALLOWED, OTHER

pytestmark = pytest.mark.integration


@pytest.fixture
def setup(tmp_path: Path, engine: Dockerd, busybox_images: dict[str, str]) -> Iterator[tuple[Path, Dockerd]]:
    config = write_config(
        tmp_path / "config.toml",
        {
            "device": {"id": "test-device"},
            "engine": {"url": engine.url},
            "state": {"dir": str(tmp_path / "state")},
            "enforcement": {"stop_grace_seconds": 0},
        },
    )
    cli(config, "allowlist", "add", busybox_images[ALLOWED], "--comment", "test image", check=True)
    yield config, engine


@pytest.fixture
def agent(setup: tuple[Path, Dockerd], tmp_path: Path) -> Iterator[AgentProcess]:
    config, _ = setup
    proc = AgentProcess(config, tmp_path / "agent.log").start()
    yield proc
    if proc.proc is not None:
        assert proc.stop() == 0, proc.log()


def exists(engine: Dockerd, name: str) -> bool:
    return engine.has_container(name)


def running(engine: Dockerd, name: str) -> bool:
    out = engine.docker("inspect", "--format", "{{.State.Running}}", name, check=False)
    return out.returncode == 0 and out.stdout.strip() == "true"


def gone(engine: Dockerd, name: str, timeout: float = 15) -> None:
    wait_for(lambda: not exists(engine, name), timeout, what=f"container {name} to be removed")


def decisions(config: Path) -> list[dict]:
    out = cli(config, "decisions", "--limit", "1000", "--json", check=True)
    records = json.loads(out.stdout)["decisions"]
    for record in records:
        validate(record, "decision", "decision record")  # the shape telemetry publishes
    return records


def test_allowed_keeps_running_and_unlisted_is_removed(
    agent: AgentProcess, setup: tuple[Path, Dockerd]
) -> None:
    config, engine = setup
    engine.docker("run", "-d", "--name", "good", ALLOWED)
    engine.run_untrusted("-d", "--name", "bad", OTHER)
    gone(engine, "bad")
    assert running(engine, "good")
    by_name = {d["container"]["name"]: d for d in decisions(config)}
    assert by_name["bad"]["verdict"] == "blocked"
    assert by_name["bad"]["reason"] == "not-allowlisted"
    assert by_name["good"]["verdict"] == "allowed"
    assert by_name["good"]["reason"] == "allowlisted"
    record = by_name["bad"]
    for key in ("id", "time", "device", "image", "digests", "policy_version"):
        assert record[key], key
    assert record["container"]["id"]
    assert record["device"] == "test-device"


@pytest.mark.parametrize("how", ["run --rm", "create+start"])
def test_unlisted_removed_however_started(agent: AgentProcess, setup: tuple[Path, Dockerd], how: str) -> None:
    _, engine = setup
    if how == "run --rm":
        engine.run_untrusted("-d", "--rm", "--name", "victim", OTHER)
    else:
        engine.docker("create", "--name", "victim", OTHER)
        engine.start_untrusted("victim")
    gone(engine, "victim")


def test_old_stopped_container_started_again(agent: AgentProcess, setup: tuple[Path, Dockerd]) -> None:
    """An allowed container restarted later keeps running; once its digest is withdrawn it is removed."""
    config, engine = setup
    engine.docker("run", "-d", "--name", "old", ALLOWED)
    engine.docker("stop", "-t", "0", "old")
    engine.docker("start", "old")
    agent.wait_log("allowed container old", count=2)
    assert running(engine, "old")
    engine.docker("stop", "-t", "0", "old")
    image_id = engine.image_id(ALLOWED)
    cli(config, "allowlist", "remove", image_id, check=True)
    gone(engine, "old")  # stopped, yet removed by the rescan the removal triggers


def test_startup_scan(setup: tuple[Path, Dockerd], tmp_path: Path) -> None:
    config, engine = setup
    engine.docker("run", "-d", "--name", "pre-running-bad", OTHER)
    engine.docker("create", "--name", "pre-stopped-bad", OTHER)
    engine.docker("run", "-d", "--name", "pre-running-good", ALLOWED)
    engine.docker("create", "--name", "pre-stopped-good", ALLOWED)
    proc = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        assert not exists(engine, "pre-running-bad")
        assert not exists(engine, "pre-stopped-bad")
        assert running(engine, "pre-running-good")
        assert exists(engine, "pre-stopped-good")
    finally:
        assert proc.stop() == 0


def test_runtime_allowlist_changes(agent: AgentProcess, setup: tuple[Path, Dockerd]) -> None:
    config, engine = setup
    engine.docker("run", "-d", "--name", "a1", ALLOWED)
    agent.wait_log("allowed container a1")
    cli(config, "allowlist", "remove", engine.image_id(ALLOWED), check=True)
    gone(engine, "a1", timeout=5)  # "within a second" plus engine time
    other = engine.image_id(OTHER)
    cli(config, "allowlist", "add", other, check=True)
    agent.wait_log("policy reloaded", count=2, timeout=5)
    engine.docker("run", "-d", "--name", "o1", OTHER)
    agent.wait_log("allowed container o1")
    assert running(engine, "o1")


def test_audit_mode_records_would_block(agent: AgentProcess, setup: tuple[Path, Dockerd]) -> None:
    config, engine = setup
    cli(config, "enforcement", "--mode", "audit", check=True)
    agent.wait_log("policy reloaded", timeout=5)
    engine.docker("run", "-d", "--name", "audited", OTHER)
    agent.wait_log("audit: container audited (")
    assert running(engine, "audited")
    verdicts = [d for d in decisions(config) if d["container"]["name"] == "audited"]
    assert verdicts and verdicts[0]["verdict"] == "would-block" and verdicts[0]["mode"] == "audit"
    # switching back to enforce rescans and removes it
    cli(config, "enforcement", "--mode", "enforce", check=True)
    gone(engine, "audited")


def test_dockerd_restart_while_agent_runs(agent: AgentProcess, setup: tuple[Path, Dockerd]) -> None:
    _, engine = setup
    engine.stop()
    engine.start()
    # started before the agent can have reconnected: caught by the replay or the rescan
    engine.run_untrusted("-d", "--name", "during-outage", OTHER)
    gone(engine, "during-outage", timeout=30)
    agent.wait_log("following engine events again", timeout=30)


def test_restart_after_kill9_enforces_from_stored_state(setup: tuple[Path, Dockerd], tmp_path: Path) -> None:
    config, engine = setup
    proc = AgentProcess(config, tmp_path / "agent.log").start()
    engine.docker("run", "-d", "--name", "keep", ALLOWED)
    proc.wait_log("allowed container keep")
    proc.kill9()
    engine.docker("run", "-d", "--name", "sneaked-in", OTHER)
    # no network at all: a fresh network namespace with only a down loopback (the engine is a Unix socket)
    wrapper = ["unshare", "--net"] if shutil.which("unshare") else []
    again = AgentProcess(config, tmp_path / "agent2.log", wrapper=wrapper).start()
    try:
        assert not exists(engine, "sneaked-in")
        assert running(engine, "keep")
    finally:
        assert again.stop() == 0


def test_docker_load_image_allowed_by_image_id(setup: tuple[Path, Dockerd], tmp_path: Path) -> None:
    config, engine = setup
    image_id = engine.build_image("ig-test/loaded:1", "loaded")
    archive = tmp_path / "loaded.tar"
    engine.docker("save", "-o", str(archive), "ig-test/loaded:1")
    engine.docker("rmi", "ig-test/loaded:1")
    engine.docker("load", "-i", str(archive))
    repo_digests = engine.docker("image", "inspect", "--format", "{{json .RepoDigests}}", image_id).stdout
    assert json.loads(repo_digests) == []
    cli(config, "allowlist", "add", image_id, check=True)
    proc = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        engine.docker("run", "-d", "--name", "loaded", "ig-test/loaded:1")
        proc.wait_log("allowed container loaded")
        assert running(engine, "loaded")
    finally:
        assert proc.stop() == 0
        engine.docker("rm", "-f", "loaded", check=False)


def test_scan_cli_dry_run_and_real(setup: tuple[Path, Dockerd]) -> None:
    config, engine = setup
    engine.run_untrusted("-d", "--name", "s-bad", OTHER)
    engine.docker("run", "-d", "--name", "s-good", ALLOWED)
    dry = cli(config, "scan", "--dry-run", "--json")
    assert dry.returncode == 1, dry.stderr
    verdicts = {d["container"]["name"]: d["verdict"] for d in json.loads(dry.stdout)["decisions"]}
    assert verdicts == {"s-bad": "blocked", "s-good": "allowed"}
    assert exists(engine, "s-bad")
    assert decisions(config) == []  # a dry run records nothing
    real = cli(config, "scan")
    assert real.returncode == 1
    assert not exists(engine, "s-bad") and running(engine, "s-good")
    assert cli(config, "scan").returncode == 0


def test_status_reports_agent_and_engine(agent: AgentProcess, setup: tuple[Path, Dockerd]) -> None:
    config, _ = setup
    out = cli(config, "status", "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["agent"]["running"] and status["engine"]["reachable"]
    assert status["policy"]["allowlist"] == 1


def test_sigterm_stops_cleanly(agent: AgentProcess) -> None:
    assert agent.stop() == 0
    assert "ImageGuard stopped" in agent.log()


def test_second_agent_on_same_state_is_refused(agent: AgentProcess, setup: tuple[Path, Dockerd]) -> None:
    config, _ = setup
    out = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(config), "run"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "already running" in out.stderr


def test_monitor_removes_an_allowed_image_that_binds_the_agents_state(
    agent: AgentProcess, setup: tuple[Path, Dockerd], tmp_path: Path
) -> None:
    """The same runtime constraints as preventive mode, judged from the container's inspect data."""
    config, engine = setup
    engine.run_untrusted("-d", "--name", "grabber", "-v", f"{tmp_path / 'state'}:/s", ALLOWED)
    engine.docker("run", "-d", "--name", "fine", "-v", f"{tmp_path / 'elsewhere'}:/s", ALLOWED)
    gone(engine, "grabber")
    assert running(engine, "fine")
    by_name = {d["container"]["name"]: d for d in decisions(config)}
    assert by_name["grabber"]["reason"] == "runtime-constraint"
    assert "agent-protection" in by_name["grabber"]["detail"]
    assert by_name["fine"]["reason"] == "allowlisted"


def test_a_blocked_wake_up_channel_never_stops_enforcement(
    setup: tuple[Path, Dockerd], tmp_path: Path, busybox_images: dict[str, str]
) -> None:
    """Whoever occupies the wake-up socket's name cannot take the agent down: it watches the database."""
    config, engine = setup
    (tmp_path / "state" / "agent.sock").mkdir(parents=True)  # the socket's place is taken
    cli(config, "allowlist", "remove", busybox_images[ALLOWED], check=True)
    proc = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        assert "cannot serve the wake-up socket" in proc.log()
        engine.run_untrusted("-d", "--name", "early", ALLOWED)
        gone(engine, "early")  # enforcing
        cli(config, "allowlist", "add", busybox_images[ALLOWED], check=True)  # no wake-up possible
        proc.wait_log("policy reloaded")
        engine.docker("run", "-d", "--name", "late", ALLOWED)
        proc.wait_log("allowed container late")
        assert running(engine, "late")
    finally:
        assert proc.stop() == 0, proc.log()


def test_the_wake_up_socket_is_private_to_the_agents_user(
    agent: AgentProcess, setup: tuple[Path, Dockerd], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    sock = state / "agent.sock"
    assert sock.is_socket() and oct(sock.stat().st_mode & 0o777) == "0o600"
    assert oct(state.stat().st_mode & 0o777) == "0o700"  # no other user can reach it


def test_the_first_run_removes_nothing(engine: Dockerd, tmp_path: Path) -> None:
    """A new device (no policy ever set, no mode configured): audit until enforcing is switched on."""
    config = write_config(
        tmp_path / "config.toml",
        {
            "device": {"id": "new-device"},
            "engine": {"url": engine.url},
            "state": {"dir": str(tmp_path / "state")},
        },
        first_run_audit=True,
    )
    engine.docker("run", "-d", "--name", "was-here", OTHER)
    proc = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        assert "running in AUDIT mode" in proc.log()
        assert running(engine, "was-here")
        status = json.loads(cli(config, "status", "--json").stdout)
        assert status["first_run"] is True and status["enforcement"]["mode"] == "audit"
        assert {d["container"]["name"]: d["verdict"] for d in decisions(config)}["was-here"] == "would-block"
        cli(config, "enforcement", "--mode", "enforce", check=True)  # the explicit step
        gone(engine, "was-here")
    finally:
        assert proc.stop() == 0, proc.log()
        engine.docker("rm", "-f", "was-here", check=False)


def test_building_the_allowlist_from_what_is_there(
    engine: Dockerd, tmp_path: Path, busybox_images: dict[str, str]
) -> None:
    """Issue 14: from a first run in audit mode to enforcing, without a container lost on the way."""
    config = write_config(
        tmp_path / "config.toml",
        {
            "device": {"id": "new-device"},
            "engine": {"url": engine.url},
            "state": {"dir": str(tmp_path / "state")},
        },
        first_run_audit=True,
    )
    engine.docker("run", "-d", "--name", "workload", ALLOWED)
    proc = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        engine.docker("run", "-d", "--name", "late", OTHER)
        wait_for(
            lambda: "late" in {d["container"]["name"] for d in decisions(config)}, 10, what="audit record"
        )
        # the digest to allow is in the decisions table
        table = cli(config, "decisions", check=True).stdout
        assert table.splitlines()[0].split() == ["TIME", "VERDICT", "CONTAINER", "IMAGE", "REASON", "DIGEST"]
        assert busybox_images[OTHER] in table
        # off a terminal, --from-running asks for --yes and changes nothing
        refused = cli(config, "allowlist", "add", "--from-running")
        assert refused.returncode == 2 and "--yes" in refused.stderr
        assert busybox_images[ALLOWED] in refused.stderr  # the preview
        assert json.loads(cli(config, "allowlist", "list", "--json").stdout)["allowlist"] == []
        out = json.loads(cli(config, "allowlist", "add", "--image", ALLOWED, "--json", check=True).stdout)
        assert [a["digest"] for a in out["added"]] == [busybox_images[ALLOWED]]
        out = json.loads(
            cli(config, "allowlist", "add", "--from-decisions", "--yes", "--json", check=True).stdout
        )
        assert [a["digest"] for a in out["added"]] == [busybox_images[OTHER]]
        again = cli(config, "allowlist", "add", "--from-running", "--yes", check=True).stdout
        assert "nothing new" in again
        cli(config, "enforcement", "--mode", "enforce", check=True)
        proc.wait_log("scan done: 2 containers, 0 not allowed")  # the rescan enforcing starts
        assert running(engine, "workload") and running(engine, "late")
        missing = cli(config, "allowlist", "add", "--image", "no/such:image")
        assert missing.returncode == 2 and "no such image" in missing.stderr
    finally:
        assert proc.stop() == 0, proc.log()
        engine.docker("rm", "-f", "workload", "late", check=False)


def test_log_lines_carry_their_priority_when_stderr_is_the_journal(
    setup: tuple[Path, Dockerd], tmp_path: Path
) -> None:
    """systemd names the journal stream in JOURNAL_STREAM; the agent then prefixes every line with its syslog
    priority, as journald expects (here the "journal" is the log file, named the same way)."""
    config, engine = setup
    log = tmp_path / "journal.log"
    log.touch()
    st = log.stat()
    proc = AgentProcess(config, log, env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}).start()
    try:
        engine.run_untrusted("-d", "--name", "ranked", OTHER)
        proc.wait_log("blocked container ranked")
    finally:
        assert proc.stop() == 0
    lines = [line for line in log.read_text().splitlines() if line]
    assert all(line[:3] in ("<3>", "<4>", "<6>", "<7>") for line in lines), lines[:5]
    assert any(line.startswith("<4>") and "blocked container ranked" in line for line in lines)
    assert any(line.startswith("<6>") and "ImageGuard" in line for line in lines)


def test_decisions_follow_prints_each_new_decision(agent: AgentProcess, setup: tuple[Path, Dockerd]) -> None:
    import subprocess
    import sys
    import threading

    config, engine = setup
    follower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "--config",
            str(config),
            "decisions",
            "--follow",
            "--json",
            "--limit",
            "1",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: list[dict[str, Any]] = []

    def read() -> None:
        assert follower.stdout is not None
        for line in follower.stdout:
            lines.append(json.loads(line))

    threading.Thread(target=read, daemon=True).start()
    try:
        engine.run_untrusted("-d", "--name", "followed", OTHER)
        wait_for(
            lambda: any(r["container"]["name"] == "followed" for r in lines), 15, what="the followed decision"
        )
        assert [r["verdict"] for r in lines if r["container"]["name"] == "followed"] == ["blocked"]
    finally:
        follower.terminate()
        follower.wait(timeout=10)
        if follower.stdout is not None:
            follower.stdout.close()
