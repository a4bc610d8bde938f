"""Request/response for every CONTAINER-AUTH-V1 resource against a running agent process, driven only with
Debian's tools: mosquitto_sub / mosquitto_pub for the MQTT side, ``protoc --encode/--decode`` with Kura's
schema for protobuf payloads (an encoder and decoder independent of ours)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.agentproc import AgentProcess, wait_for
from tests.support.cloud import DEVICE, Console, agent_config, make_broker, publish, request_topic
from tests.support.dockerd import Dockerd
from tests.support.fixtures.docker import ALLOWED
from tests.support.fixtures.mosquitto import MosquittoBroker
from tests.support.keys import public_pem

pytestmark = pytest.mark.integration

D_X = "sha256:" + "ab" * 32


@dataclass
class Env:
    broker: MosquittoBroker
    engine: Dockerd
    agent: AgentProcess


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory, dockerd: Dockerd, busybox_images: dict[str, str]
) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("cloud-control")
    dockerd.remove_all_containers()
    broker = make_broker(tmp / "broker")
    agent = AgentProcess(agent_config(tmp, dockerd, broker), tmp / "agent.log")
    try:
        agent.start()
        agent.wait_log("mqtt: connected")
        dockerd.run_untrusted("-d", "--name", "good", ALLOWED)  # blocked: the allowlist starts empty
        wait_for(lambda: "good" not in dockerd.docker("ps", "-a", "--format", "{{.Names}}").stdout, 20)
        yield Env(broker, dockerd, agent)
    finally:
        if agent.proc is not None:
            assert agent.stop() == 0, agent.log()
        broker.stop()
        dockerd.remove_all_containers()


@pytest.mark.parametrize("encoding", ["json", "kura-protobuf"])
def test_every_resource_round_trip(env: Env, encoding: str, busybox_images: dict[str, str]) -> None:
    c = Console(env.broker, encoding)
    allowed_id = busybox_images[ALLOWED]

    status = c.ok("get-status.reply", "GET", "status")
    assert status["device"] == DEVICE and status["mqtt"]["connected"] is True
    assert status["engine"]["reachable"] is True

    # policy: replace if newer, equal is unchanged, older is a rollback (400); nothing changes on 400
    v = c.ok("get-policy.reply", "GET", "policy")["version"]
    doc = {"version": v + 1, "allowlist": [{"digest": allowed_id, "comment": "busybox"}]}
    assert c.ok("apply-result.reply", "PUT", "policy", body=doc)["status"] == "applied"
    assert c.ok("apply-result.reply", "PUT", "policy", body=doc)["status"] == "unchanged"
    code, message = c.status("PUT", "policy", body={**doc, "version": v})
    assert code == 400 and "older" in message
    assert c.ok("get-policy.reply", "GET", "policy")["version"] == v + 1
    # the same version with other content is a conflict, not "unchanged"; a version jump that would use up
    # the version space (and freeze the policy) is refused; neither changes anything
    code, message = c.status("PUT", "policy", body={"version": v + 1})
    assert code == 400 and "already held with different content" in message
    code, message = c.status(
        "PUT", "policy", body={**doc, "version": 2**53 - 1, "enforcement": {"enabled": False}}
    )
    assert code == 400 and "jumps by" in message
    assert c.ok("get-policy.reply", "GET", "policy")["version"] == v + 1
    assert c.ok("get-enforcement.reply", "GET", "enforcement")["enabled"] is True

    # allowlist
    result = c.ok("apply-result.reply", "POST", "allowlist", body={"digests": [D_X], "comment": encoding})
    assert result == {"layer": "device", "version": v + 2, "status": "applied", "revoked": 0}
    listed = c.ok("get-allowlist.reply", "GET", "allowlist")["allowlist"]
    assert {"digest": D_X, "comment": encoding, "layer": "device"} in listed
    code, message = c.status("POST", "allowlist", body={"digests": ["sha256:nothex"]})
    assert code == 400 and "at /digests/0" in message
    assert c.ok("apply-result.reply", "DEL", "allowlist", D_X)["version"] == v + 3
    assert c.status("DEL", "allowlist", D_X)[0] == 404

    # trust anchors (an unreachable registry in scope, so EXEC verify has an anchor to use)
    anchor = {"name": "release", "kind": "key", "pem": public_pem(), "scope": ["127.0.0.1:1/**"]}
    assert c.ok("apply-result.reply", "PUT", "trust-anchors", "release", body=anchor)["status"] == "applied"
    names = [a["name"] for a in c.ok("get-trust-anchors.reply", "GET", "trust-anchors")["trust_anchors"]]
    assert names == ["release"]
    code, message = c.status("PUT", "trust-anchors", "release", body={**anchor, "pem": "not a key"})
    assert code == 400
    verified = c.ok("exec-verify.reply", "EXEC", "verify", body={"image": "127.0.0.1:1/acme/app:1"})
    assert verified["valid"] is False and verified["reason"] == "registry-unreachable"
    assert c.ok("apply-result.reply", "DEL", "trust-anchors", "release")["status"] == "applied"
    assert c.status("DEL", "trust-anchors", "release")[0] == 404

    # enforcement
    assert c.ok("get-enforcement.reply", "GET", "enforcement") == {"enabled": True, "mode": "enforce"}
    changed = c.ok("put-enforcement.reply", "PUT", "enforcement", body={"mode": "audit"})
    assert changed["enforcement"]["mode"] == "audit"
    c.ok("put-enforcement.reply", "PUT", "enforcement", body={"mode": "enforce"})

    # containers, decisions, scan
    name = f"keep-{encoding}"
    env.engine.docker("run", "-d", "--name", name, ALLOWED)
    env.agent.wait_log(f"allowed container {name}")
    containers = c.ok("get-containers.reply", "GET", "containers")["containers"]
    mine = next(x for x in containers if x["name"] == name)
    assert mine["verdict"] == "allowed" and mine["reason"] == "allowlisted" and mine["state"] == "running"
    page = c.ok("get-decisions.reply", "GET", "decisions", body={"limit": 1})
    assert len(page["decisions"]) == 1 and page["next"] is not None
    older = c.ok("get-decisions.reply", "GET", "decisions", body={"limit": 1, "before": page["next"]})
    assert older["decisions"][0]["id"] != page["decisions"][0]["id"]
    scan = c.ok("exec-scan.reply", "EXEC", "scan", body={"dry_run": True})
    assert scan["scanned"] >= 1 and scan["dry_run"] is True
    assert name in {d["container"]["name"] for d in scan["decisions"]}
    env.engine.docker("rm", "-f", name)

    # errors
    assert c.status("GET", "nothing-here")[0] == 404
    code, message = c.status("PUT", "enforcement", body={"mode": "lenient"})
    assert code == 400 and "at /mode" in message
    code, message = c.status("GET", "decisions", body={"limit": 0})
    assert code == 400 and "at /limit" in message


def test_request_without_id_gets_no_reply_and_agent_keeps_serving(env: Env) -> None:
    c = Console(env.broker, "json")
    assert c.call("GET", "status", rid=None) is None
    publish(env.broker, request_topic("GET", "status"), b"\x00\xffnot a payload")
    status = c.ok("get-status.reply", "GET", "status")
    assert status["mqtt"]["requests"]["dropped"] >= 2
    assert env.agent.proc is not None and env.agent.proc.poll() is None
