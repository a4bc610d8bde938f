"""Issue 12 against a running agent over a real broker: with [mqtt] configured and nothing else, whoever can
publish on the device's topics cannot change its policy. Every attempt gets a 403, is counted and logged,
and enforcement goes on as before."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agentproc import AgentProcess, cli, wait_for
from tests.support.cloud import Console, agent_config, make_broker
from tests.support.dockerd import Dockerd
from tests.support.fixtures.docker import OTHER

pytestmark = pytest.mark.integration

ATTACKS = [
    ("PUT", ("enforcement",), {"enabled": False}),
    ("PUT", ("policy",), {"version": 9, "enforcement": {"enabled": False, "mode": "audit"}}),
    ("POST", ("allowlist",), {"digests": ["sha256:" + "ab" * 32]}),
    (
        "PUT",
        ("trust-anchors", "evil"),
        {
            "name": "evil",
            "kind": "key",
            "pem": "-----BEGIN PUBLIC KEY-----\nAA==\n-----END PUBLIC KEY-----\n",
        },
    ),
    (
        "PUT",
        ("instances", "root"),
        {"image": "evil.example/x", "tag": "1", "trust_anchor": {"pem": "x"}, "run": {"network": "host"}},
    ),
]


@pytest.fixture
def device(
    tmp_path: Path, dockerd: Dockerd, busybox_images: dict[str, str]
) -> Iterator[tuple[Path, AgentProcess, Console]]:
    dockerd.remove_all_containers()
    broker = make_broker(tmp_path / "broker")
    config = agent_config(  # the shipped default, on a device of group g1
        tmp_path, dockerd, broker, allow_unsigned_policy=False, device={"id": "dev-1", "groups": ["g1"]}
    )
    cli(config, "enforcement", "--mode", "enforce", check=True)
    agent = AgentProcess(config, tmp_path / "agent.log")
    try:
        agent.start()
        agent.wait_log("mqtt: connected")
        yield config, agent, Console(broker, "json")
    finally:
        if agent.proc is not None:
            assert agent.stop() == 0, agent.log()
        broker.stop()
        dockerd.remove_all_containers()


def test_unsigned_changes_over_mqtt_are_refused_counted_and_change_nothing(
    device: tuple[Path, AgentProcess, Console], dockerd: Dockerd, busybox_images: dict[str, str]
) -> None:
    config, agent, console = device
    before = cli(config, "policy", "export", check=True).stdout
    # the console's wave delivery, aimed by whoever reaches the topic: a group layer allowing OTHER
    attacks = [
        *ATTACKS,
        ("PUT", ("fleet", "g1"), {"version": 9, "allowlist": [{"digest": busybox_images[OTHER]}]}),
    ]
    for method, resource, body in attacks:
        code, message = console.status(method, *resource, body=body)
        assert code == 403, (method, resource, code, message)
        assert "signed" in message, message
    assert cli(config, "policy", "export", check=True).stdout == before
    status = console.ok("get-status.reply", "GET", "status")
    assert status["enforcement"] == {"enabled": True, "mode": "enforce"}
    rejected = sum(v for k, v in status["counters"].items() if k.startswith("policy_rejected."))
    assert rejected == len(attacks), status["counters"]
    assert agent.log().count("refused (signed-document-required)") == len(attacks)
    assert status["policy"]["layers"].get("group:g1", 0) == 0
    dockerd.run_untrusted("-d", "--name", "after-the-attempts", OTHER)
    wait_for(
        lambda: "after-the-attempts" not in dockerd.docker("ps", "-a", "--format", "{{.Names}}").stdout,
        20,
        what="the blocked container to be removed",
    )
