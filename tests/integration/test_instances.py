"""Issue 5 on the real engine and registry: the agent pulls, verifies, pins, runs and updates declared instances.

Images are built on the private dockerd, pushed to a docker-registry of this module (so that the registry can
be stopped and started again on the same port), signed with ``imageguard sign``, and then removed from the
engine, so that every instance really pulls what it runs.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.store import Store
from agent.core.digest import Digest
from agent.core.schemas import validate
from tests.support.agentproc import AgentProcess, cli, wait_for
from tests.support.dockerd import Dockerd
from tests.support.fixtures.registry import (
    REGISTRY_BIN,
    RegistryServer,
    _Running,
    _wait_ready,
    start_registry,
    stop_registry,
)
from tests.support.ports import free_port
from tests.support.signing import (
    build_and_push,
    docker_login,
    generate_keys,
    registry_entry,
    write_agent_config,
)

pytestmark = pytest.mark.integration

LABEL_INSTANCE = "dev.imageguard.instance"


@dataclass
class Registry:
    """A docker-registry this module may stop and start again on the same port and storage."""

    running: _Running
    directory: Path

    @property
    def server(self) -> RegistryServer:
        return self.running.server

    @property
    def host(self) -> str:
        return self.server.host

    def stop(self) -> None:
        stop_registry(self.running)

    def start(self) -> None:
        port = self.host.rsplit(":", 1)[1]
        log = self.directory / f"registry-{port}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [REGISTRY_BIN, "serve", str(self.directory / f"config-{port}.yml")],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.running = _Running(proc, self.server)
        _wait_ready(proc, self.server.url, False, log)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    d = tmp_path_factory.mktemp("instances-registry")
    reg = Registry(start_registry(d), d)
    yield reg
    if reg.running.proc.poll() is None:
        reg.stop()


@dataclass
class Setup:
    config: Path
    engine: Dockerd
    registry: Registry
    key: Path
    pub: Path
    password: Path
    state: Path

    def push(self, repo: str, tag: str, marker: str, *, sign: bool) -> Digest:
        """Build, push and (optionally) sign ``host/repo:tag``; the engine keeps no copy of it."""
        ref = f"{self.registry.host}/{repo}:{tag}"
        digest = build_and_push(self.engine, ref, marker)
        if sign:
            cli(
                self.config,
                "sign",
                ref,
                "--key",
                str(self.key),
                "--passphrase-file",
                str(self.password),
                check=True,
            )
        self.engine.docker("rmi", "-f", ref)
        return digest

    def apply(
        self, spec: dict[str, Any] | list[dict[str, Any]], tmp: Path
    ) -> subprocess.CompletedProcess[str]:
        path = tmp / "spec.json"
        path.write_text(json.dumps(spec))
        return cli(self.config, "instances", "apply", str(path), "--json")

    def show(self, name: str) -> dict[str, Any]:
        out = cli(self.config, "instances", "show", name, "--json", check=True)
        doc: dict[str, Any] = json.loads(out.stdout)
        return doc

    def wait_status(self, name: str, status: str, timeout: float = 60, **fields: Any) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        def ready() -> bool:
            seen.update(self.show(name))
            return seen.get("status") == status and all(seen.get(k) == v for k, v in fields.items())

        try:
            wait_for(ready, timeout, interval=0.2, what=f"instance {name} {status} {fields}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last seen {seen}") from None
        return seen

    def outbox(self) -> list[dict[str, Any]]:
        store = Store(self.state)
        try:
            return [{"kind": m.kind, **m.message} for m in store.outbox_peek(limit=10_000)]
        finally:
            store.close()


@pytest.fixture
def setup(tmp_path: Path, engine: Dockerd, registry: Registry) -> Setup:
    state = tmp_path / "state"
    config = write_agent_config(
        tmp_path / "config.toml",
        {
            "device": {"id": "instances-test"},
            "engine": {"url": engine.url},
            "state": {"dir": str(state)},
            "enforcement": {"stop_grace_seconds": 0},
            # no broker listens: telemetry (status changes, alerts) stays in the outbox, where we read it
            "mqtt": {"url": f"mqtt://127.0.0.1:{free_port()}"},
        },
        [registry_entry(registry.server)],
    )
    key, pub, pw = generate_keys(config, tmp_path / "cosign")
    return Setup(config, engine, registry, key, pub, pw, state)


@pytest.fixture
def agent(setup: Setup, tmp_path: Path) -> Iterator[AgentProcess]:
    proc = AgentProcess(setup.config, tmp_path / "agent.log").start()
    yield proc
    if proc.proc is not None:
        assert proc.stop() == 0, proc.log()


def container(engine: Dockerd, name: str) -> dict[str, Any] | None:
    out = engine.docker("inspect", name, check=False)
    if out.returncode != 0:
        return None
    doc: dict[str, Any] = json.loads(out.stdout)[0]
    return doc


def gone(engine: Dockerd, name: str, timeout: float = 20) -> None:
    wait_for(lambda: container(engine, name) is None, timeout, what=f"container {name} to be removed")


def decisions_for(config: Path, name: str) -> list[dict[str, Any]]:
    out = cli(config, "decisions", "--limit", "1000", "--json", check=True)
    return [d for d in json.loads(out.stdout)["decisions"] if d["container"]["name"] == name]


def web_spec(setup: Setup, repo: str, **run: Any) -> dict[str, Any]:
    return {
        "name": "web",
        "image": f"{setup.registry.host}/{repo}",
        "tag": "stable",
        # inline: no policy anchor covers the image, so only the instance's pin can allow it
        "trust_anchor": {"pem": setup.pub.read_text()},
        "run": {
            "environment": {"COLOUR": "blue"},
            "labels": {"team": "edge"},
            "stop_timeout_seconds": 0,
            **run,
        },
    }


def test_pin_run_update_reject_and_disable(setup: Setup, agent: AgentProcess, tmp_path: Path) -> None:
    engine, host = setup.engine, setup.registry.host
    d1 = setup.push("it/web", "stable", "web-v1", sign=True)
    assert engine.docker("image", "inspect", f"{host}/it/web@{d1}", check=False).returncode != 0

    # tag v1, signed: runs pinned to v1's digest, from repo@digest, with the declared options and our labels
    out = setup.apply(web_spec(setup, "it/web"), tmp_path)
    assert out.returncode == 0, out.stderr
    state = setup.wait_status("web", "running", pinned_digest=str(d1))
    c1 = container(engine, "web")
    assert c1 is not None and c1["State"]["Running"]
    assert c1["Id"] == state["container_id"]
    assert c1["Config"]["Image"] == f"{host}/it/web@{d1}"
    labels = c1["Config"]["Labels"]
    assert labels["dev.imageguard.managed"] == "true" and labels[LABEL_INSTANCE] == "web"
    assert labels["team"] == "edge" and "COLOUR=blue" in c1["Config"]["Env"]
    agent.wait_log("allowed container web")
    (verdict,) = decisions_for(setup.config, "web")[:1]
    assert verdict["verdict"] == "allowed" and verdict["reason"] == "instance-digest"
    statuses = [m["status"] for m in setup.outbox() if m["kind"] == "instances" and m["name"] == "web"]
    assert statuses[0] == "pulling" and "verifying" in statuses and statuses[-1] == "running", statuses

    # v2 signed under the same tag: an update replaces the container
    d2 = setup.push("it/web", "stable", "web-v2", sign=True)
    out = cli(setup.config, "instances", "update", "web", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["result"] == "updated" and result["digest"] == str(d2) and result["previous"] == str(d1)
    setup.wait_status("web", "running", pinned_digest=str(d2))
    wait_for(
        lambda: (c := container(engine, "web")) is not None and c["Id"] != c1["Id"], 20, what="replacement"
    )
    c2 = container(engine, "web")
    assert c2 is not None and c2["Config"]["Image"] == f"{host}/it/web@{d2}" and c2["State"]["Running"]

    # v3 unsigned under the same tag: the update is rejected, v2 keeps running, an alert says why
    d3 = setup.push("it/web", "stable", "web-v3", sign=False)
    out = cli(setup.config, "instances", "update", "web", "--json")
    assert out.returncode == 1, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["result"] == "rejected" and result["reason"] == "signature-invalid", result
    assert "no signatures found" in result["detail"]
    state = setup.show("web")
    assert state["status"] == "running" and state["pinned_digest"] == str(d2)
    assert state["reason"] == "update-rejected"
    c = container(engine, "web")
    assert c is not None and c["Id"] == c2["Id"] and c["State"]["Running"]
    alerts = [
        m for m in setup.outbox() if m["kind"] == "alerts" and m.get("alert") == "instance-update-rejected"
    ]
    assert len(alerts) == 1 and alerts[0]["instance"] == "web" and alerts[0]["pinned_digest"] == str(d2)
    assert (
        engine.docker("image", "inspect", f"{host}/it/web@{d3}", check=False).returncode != 0
    )  # never pulled

    # changing run options recreates the container and touches nothing else
    out = setup.apply(web_spec(setup, "it/web", environment={"COLOUR": "green"}), tmp_path)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: (c := container(engine, "web")) is not None and "COLOUR=green" in c["Config"]["Env"], 20)
    state = setup.wait_status("web", "running")
    assert state["pinned_digest"] == str(d2) and state["last_update"]["result"] == "rejected"
    c3 = container(engine, "web")
    assert c3 is not None and c3["Config"]["Image"] == f"{host}/it/web@{d2}"

    # a container started by hand from the pinned image is allowed while the instance is enabled ...
    engine.docker("run", "-d", "--name", "by-hand", f"{host}/it/web@{d2}")
    agent.wait_log("allowed container by-hand")
    assert decisions_for(setup.config, "by-hand")[0]["reason"] == "instance-digest"
    # ... and disabling the instance removes both
    cli(setup.config, "instances", "disable", "web", check=True)
    gone(engine, "web")
    gone(engine, "by-hand")
    setup.wait_status("web", "disabled")
    out = cli(setup.config, "instances", "update", "web", "--json", timeout=30)
    assert out.returncode == 1 and json.loads(out.stdout)["reason"] == "disabled", out.stdout + out.stderr
    engine.run_untrusted("-d", "--name", "by-hand-2", f"{host}/it/web@{d2}")
    gone(engine, "by-hand-2")

    # enabling it again runs the pinned digest (no new resolution: v3 is still the tag)
    cli(setup.config, "instances", "enable", "web", check=True)
    setup.wait_status("web", "running", pinned_digest=str(d2))
    # deleting it removes its container and its state
    cli(setup.config, "instances", "delete", "web", check=True)
    gone(engine, "web")
    wait_for(lambda: cli(setup.config, "instances", "show", "web").returncode == 1, 20, what="state removed")


def test_enforcement_digest_vouches_without_verification(
    setup: Setup, agent: AgentProcess, tmp_path: Path
) -> None:
    host = setup.registry.host
    digest = setup.push("it/vouched", "1", "vouched", sign=False)
    other = setup.push("it/vouched", "2", "vouched-other", sign=False)
    specs = [
        {"name": "vouched", "image": f"{host}/it/vouched", "tag": "1", "enforcement_digest": str(digest)},
        {"name": "mismatch", "image": f"{host}/it/vouched", "tag": "2", "enforcement_digest": str(digest)},
    ]
    for s in specs:
        s["run"] = {"stop_timeout_seconds": 0}
    out = setup.apply(specs, tmp_path)
    assert out.returncode == 0, out.stderr
    state = setup.wait_status("vouched", "running", pinned_digest=str(digest))
    assert container(setup.engine, "vouched") is not None
    failed = setup.wait_status("mismatch", "failed", reason="digest-mismatch")
    assert str(other) in failed["detail"] and failed["pinned_digest"] is None
    assert container(setup.engine, "mismatch") is None
    assert "vouched for by its enforcement digest (no verification)" in agent.log()
    assert "verifying" not in [
        m["status"] for m in setup.outbox() if m["kind"] == "instances" and m["name"] == "vouched"
    ]
    assert state["spec"]["enforcement_digest"] == str(digest)


def test_named_anchor_and_restart_with_registry_down(setup: Setup, tmp_path: Path) -> None:
    engine, host = setup.engine, setup.registry.host
    cli(
        setup.config, "anchors", "add", "team", "--key", str(setup.pub), "--scope", f"{host}/it/*", check=True
    )
    setup.push("it/api", "1", "api-v1", sign=True)
    setup.push("it/late", "1", "late-v1", sign=True)
    run = {"stop_timeout_seconds": 0}
    out = setup.apply(
        {"name": "api", "image": f"{host}/it/api", "tag": "1", "trust_anchor": "team", "run": run}, tmp_path
    )
    assert out.returncode == 0, out.stderr
    first = AgentProcess(setup.config, tmp_path / "agent.log").start()
    try:
        setup.wait_status("api", "running")
    finally:
        assert first.stop() == 0
    # while the agent is down: its container goes, the registry goes, and a new instance is declared
    engine.docker("rm", "-f", "api")
    setup.registry.stop()
    try:
        out = setup.apply(
            {"name": "late", "image": f"{host}/it/late", "tag": "1", "trust_anchor": "team", "run": run},
            tmp_path,
        )
        assert out.returncode == 0, out.stderr
        again = AgentProcess(setup.config, tmp_path / "agent2.log").start()
        try:
            # the pinned image is on the device: it runs without the registry
            setup.wait_status("api", "running")
            c = container(engine, "api")
            assert c is not None and c["State"]["Running"]
            # never pulled: failed, and retried once the registry is back
            setup.wait_status("late", "failed", reason="image-unavailable-offline")
            setup.registry.start()
            setup.wait_status("late", "running", timeout=90)
        finally:
            assert again.stop() == 0, again.log()
    finally:
        if setup.registry.running.proc.poll() is not None:
            setup.registry.start()


def test_periodic_update_check(setup: Setup, agent: AgentProcess, tmp_path: Path) -> None:
    d1 = setup.push("it/periodic", "stable", "periodic-v1", sign=True)
    out = setup.apply(
        dict(web_spec(setup, "it/periodic"), name="periodic", update_interval_seconds=10), tmp_path
    )
    assert out.returncode == 0, out.stderr
    setup.wait_status("periodic", "running", pinned_digest=str(d1))
    d2 = setup.push("it/periodic", "stable", "periodic-v2", sign=True)
    # nobody asks: the agent's own check finds the new digest, verifies it and moves the instance
    state = setup.wait_status("periodic", "running", timeout=40, pinned_digest=str(d2))
    assert state["last_update"]["id"] == "periodic" and state["last_update"]["result"] == "updated"
    c = container(setup.engine, "periodic")
    assert c is not None and c["Config"]["Image"].endswith(f"@{d2}")


def test_private_registry_pull_with_credentials(
    tmp_path: Path, engine: Dockerd, registry_token: tuple[RegistryServer, Any]
) -> None:
    server, _ = registry_token
    env = {**engine.env, "DOCKER_CONFIG": str(tmp_path / "docker-config")}
    docker_login(server, env)
    ref = f"{server.host}/it/private:1"
    digest = build_and_push(engine, ref, "private", env=env)
    engine.docker("rmi", "-f", ref)
    entry = registry_entry(server)
    entry["insecure"] = True
    config = write_agent_config(
        tmp_path / "config.toml",
        {
            "device": {"id": "instances-private"},
            "engine": {"url": engine.url},
            "state": {"dir": str(tmp_path / "state")},
            "enforcement": {"stop_grace_seconds": 0},
        },
        [entry],
    )
    key, pub, pw = generate_keys(config, tmp_path / "cosign")
    cli(config, "sign", ref, "--key", str(key), "--passphrase-file", str(pw), check=True)
    spec = {
        "name": "private",
        "image": f"{server.host}/it/private",
        "tag": "1",
        "trust_anchor": {"pem": pub.read_text()},
        "registry_credentials": server.host,
        "run": {"stop_timeout_seconds": 0},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    cli(config, "instances", "apply", str(tmp_path / "spec.json"), check=True)
    proc = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        wait_for(
            lambda: (
                json.loads(cli(config, "instances", "show", "private", "--json").stdout).get("status")
                in ("running", "failed")
            ),
            60,
            what="instance private settled",
        )
        state = json.loads(cli(config, "instances", "show", "private", "--json").stdout)
        assert state["status"] == "running" and state["pinned_digest"] == str(digest), state
        c = container(engine, "private")
        assert c is not None and c["State"]["Running"]
    finally:
        assert proc.stop() == 0, proc.log()


def test_status_changes_and_rejection_alert_arrive_over_the_broker(
    tmp_path: Path, engine: Dockerd, registry: Registry, mosquitto: Any, mqtt_probe_factory: Any
) -> None:
    """The instance telemetry leaves the outbox: status changes on .../instances, the alert on .../alerts."""
    from agent.adapters.mqtt.kurapayload import decode_protobuf

    state = tmp_path / "state"
    config = write_agent_config(
        tmp_path / "config.toml",
        {
            "device": {"id": "inst-mqtt"},
            "engine": {"url": engine.url},
            "state": {"dir": str(state)},
            "enforcement": {"stop_grace_seconds": 0},
            "mqtt": {"url": mosquitto.url, "account": "acct", "allow_unsigned_policy": True},
        },
        [registry_entry(registry.server)],
    )
    key, pub, pw = generate_keys(config, tmp_path / "cosign")
    setup = Setup(config, engine, registry, key, pub, pw, state)
    probe = mqtt_probe_factory(mosquitto, client_id="watcher")
    probe.subscribe("acct/inst-mqtt/CONTAINER-AUTH-V1/#")
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        d1 = setup.push("it/tele", "stable", "tele-v1", sign=True)
        spec = web_spec(setup, "it/tele")
        spec["name"] = "tele"
        assert setup.apply(spec, tmp_path).returncode == 0
        setup.wait_status("tele", "running", pinned_digest=str(d1))
        statuses = []
        while "running" not in statuses:
            msg = probe.expect("acct/inst-mqtt/CONTAINER-AUTH-V1/instances", timeout=30)
            body = json.loads(decode_protobuf(msg.payload).body or b"{}")
            assert body["name"] == "tele" and body["device"] == "inst-mqtt", body
            validate(body, "instance-event", "instance telemetry")
            statuses.append(body["status"])
        assert statuses[-1] == "running" and "verifying" in statuses, statuses

        listed = json.loads(cli(config, "instances", "list", "--json", check=True).stdout)
        validate(listed, "control/get-instances.reply", "instances list")  # the shape GET instances answers

        # an unsigned image under the same tag: the update is refused, the alert goes out
        setup.push("it/tele", "stable", "tele-v3-unsigned", sign=False)
        out = cli(config, "instances", "update", "tele", "--json", timeout=90)
        assert out.returncode == 1, out.stdout + out.stderr
        validate(json.loads(out.stdout), "control/exec-instance-update.reply", "instances update")
        alert = probe.expect("acct/inst-mqtt/CONTAINER-AUTH-V1/alerts", timeout=30)
        body = json.loads(decode_protobuf(alert.payload).body or b"{}")
        assert body["instance"] == "tele" and body["alert"] == "instance-update-rejected", body
        validate(body, "instance-alert", "instance alert")
        assert container(engine, "tele") is not None  # still running on v1
    finally:
        assert agent.stop() == 0, agent.log()


def test_a_removed_or_exited_managed_container_is_recreated_at_once(
    setup: Setup, agent: AgentProcess, tmp_path: Path
) -> None:
    """Issue 14: self-healing from the engine's events, not the hourly check."""
    engine = setup.engine
    d1 = setup.push("it/heal", "stable", "heal-v1", sign=True)
    spec = {**web_spec(setup, "it/heal"), "name": "heal"}
    assert setup.apply(spec, tmp_path).returncode == 0
    setup.wait_status("heal", "running", pinned_digest=str(d1))
    first = container(engine, "heal")
    assert first is not None
    engine.docker("rm", "-f", "heal")
    wait_for(
        lambda: (
            (c := container(engine, "heal")) is not None and c["Id"] != first["Id"] and c["State"]["Running"]
        ),
        15,
        what="the removed container to be recreated",
    )
    second = container(engine, "heal")
    assert second is not None
    wait_for(
        lambda: (
            json.loads(cli(setup.config, "instances", "show", "heal", "--json").stdout).get("container_id")
            == second["Id"]
        ),
        10,
        what="the status to name the new container",
    )
    engine.docker("kill", "heal")  # it exits: started again
    wait_for(
        lambda: (c := container(engine, "heal")) is not None and c["State"]["Running"],
        15,
        what="the exited container to run again",
    )
    agent.wait_log("instance heal")
