"""Runtime constraints: facts read from inspect data and create requests, and the rules judged on them."""

from __future__ import annotations

from typing import Any

import pytest

from agent.core.constraints import RuntimeFacts, RuntimeRule, violation
from agent.core.decision import decide
from agent.core.digest import Digest
from agent.core.facts import ContainerFacts
from agent.core.imageref import ImageRef
from agent.core.policy import EffectivePolicy, Enforcement, PolicyLayer
from agent.errors import Code, PolicyError

IMAGE_CONFIG = {"Entrypoint": ["/bin/app"], "Cmd": ["--serve"]}


def facts(**host: Any) -> RuntimeFacts:
    entrypoint = host.pop("entrypoint", None)
    cmd = host.pop("cmd", None)
    return RuntimeFacts.from_host_config(host, entrypoint=entrypoint, cmd=cmd, image_config=IMAGE_CONFIG)


READ_CASES = [
    # (HostConfig and overrides, expected facts)
    ({}, RuntimeFacts()),
    ({"Privileged": True}, RuntimeFacts(privileged=True)),
    ({"NetworkMode": "host", "PidMode": "host"}, RuntimeFacts(host_namespaces=frozenset({"network", "pid"}))),
    ({"NetworkMode": "bridge", "IpcMode": "private"}, RuntimeFacts()),
    (
        {"CapAdd": ["cap_sys_admin", "NET_ADMIN"]},
        RuntimeFacts(capabilities=frozenset({"SYS_ADMIN", "NET_ADMIN"})),
    ),
    ({"Devices": [{"PathOnHost": "/dev/mem"}]}, RuntimeFacts(devices=("/dev/mem",))),
    (
        {"Binds": ["/etc:/h:ro", "named-volume:/data", "/srv//x/../y:/y"]},
        RuntimeFacts(binds=("/etc", "/srv/y")),
    ),
    (
        {"Mounts": [{"Type": "bind", "Source": "/"}, {"Type": "volume", "Source": "v"}]},
        RuntimeFacts(binds=("/",)),
    ),
    (
        {"SecurityOpt": ["seccomp=unconfined", "apparmor:unconfined", "label=disable"]},
        RuntimeFacts(unconfined=frozenset({"seccomp", "apparmor", "selinux"})),
    ),
    ({"SecurityOpt": ["no-new-privileges"]}, RuntimeFacts()),
    ({"entrypoint": ["/bin/sh"]}, RuntimeFacts(command_override=True)),
    ({"entrypoint": "/bin/sh"}, RuntimeFacts(command_override=True)),
    ({"cmd": ["-c", "evil"]}, RuntimeFacts(command_override=True)),
    (
        {"entrypoint": ["/bin/app"], "cmd": ["--serve"]},
        RuntimeFacts(),
    ),  # the image's own, spelt out (inspect)
]


@pytest.mark.parametrize(("host", "expected"), READ_CASES)
def test_runtime_facts_from_host_config(host: dict[str, Any], expected: RuntimeFacts) -> None:
    assert facts(**host) == expected


APP = ImageRef.parse("registry.example/acme/app:1")
OTHER = ImageRef.parse("registry.example/other/app:1")
STRICT = RuntimeRule.from_dict(
    {
        "scope": ["registry.example/acme/*"],
        "privileged": False,
        "host_namespaces": ["network"],
        "capabilities": ["net_admin"],
        "devices": False,
        "deny_binds": ["/etc", "/var/run/docker.sock"],
        "command_override": False,
        "unconfined": False,
    },
    "rule",
)
PROTECTED = ("/var/lib/imageguard", "/run/docker/plugins")

JUDGE_CASES = [
    # (facts, image, constraint named in the violation, or None)
    (RuntimeFacts(), APP, None),
    (RuntimeFacts(privileged=True), APP, "'privileged'"),
    (RuntimeFacts(privileged=True), OTHER, None),  # out of the rule's scope
    (RuntimeFacts(host_namespaces=frozenset({"network"})), APP, None),
    (RuntimeFacts(host_namespaces=frozenset({"network", "pid"})), APP, "'host_namespaces'"),
    (RuntimeFacts(capabilities=frozenset({"NET_ADMIN"})), APP, None),
    (RuntimeFacts(capabilities=frozenset({"SYS_ADMIN"})), APP, "'capabilities'"),
    (RuntimeFacts(devices=("/dev/mem",)), APP, "'devices'"),
    (RuntimeFacts(binds=("/etc/ssl",)), APP, "'deny_binds'"),  # below a denied path
    (RuntimeFacts(binds=("/var/run",)), APP, "'deny_binds'"),  # above one
    (RuntimeFacts(binds=("/srv/data",)), APP, None),
    (RuntimeFacts(command_override=True), APP, "'command_override'"),
    (RuntimeFacts(unconfined=frozenset({"seccomp"})), APP, "'unconfined'"),
    # the agent protects itself whatever the rules say, for every image, also one without a name
    (RuntimeFacts(binds=("/",)), OTHER, "'agent-protection'"),
    (RuntimeFacts(binds=("/var/lib",)), None, "'agent-protection'"),
    (RuntimeFacts(binds=("/var/lib/imageguard/state.db",)), OTHER, "'agent-protection'"),
    (RuntimeFacts(binds=("/run/docker",)), OTHER, "'agent-protection'"),
    (RuntimeFacts(binds=("/var/lib/docker-data",)), OTHER, None),  # a prefix, not a parent
]


@pytest.mark.parametrize(("runtime", "ref", "named"), JUDGE_CASES)
def test_violation(runtime: RuntimeFacts, ref: ImageRef | None, named: str | None) -> None:
    found = violation(runtime, ref, (STRICT,), PROTECTED)
    if named is None:
        assert found is None
    else:
        assert found is not None and named in found


def test_a_catch_all_rule_covers_an_image_named_by_id() -> None:
    rule = RuntimeRule.from_dict({"scope": ["**"], "privileged": False}, "rule")
    assert violation(RuntimeFacts(privileged=True), None, (rule,), ()) is not None
    assert violation(RuntimeFacts(privileged=True), None, (STRICT,), ()) is None


def test_a_rule_without_scope_is_refused_and_rules_round_trip() -> None:
    with pytest.raises(PolicyError, match="scope"):
        RuntimeRule.from_dict({"scope": []}, "rule")
    assert RuntimeRule.from_dict(STRICT.to_dict(), "rule") == STRICT
    layer = PolicyLayer.from_document({"version": 1, "runtime": [STRICT.to_dict()]})
    assert layer.runtime == (STRICT,)
    assert PolicyLayer.from_document(layer.to_document()) == layer


def test_an_allowlisted_image_started_privileged_is_blocked_and_the_decision_names_why() -> None:
    digest = Digest.of(b"app")
    container = ContainerFacts(
        "c1",
        "web",
        str(APP),
        digest,
        ((APP.with_digest(digest), digest),),
        "running",
        runtime=RuntimeFacts(privileged=True),
    )
    policy = EffectivePolicy(Enforcement(True, "enforce"), frozenset({digest}), (), runtime=(STRICT,))
    d = decide(container, policy)
    assert (d.verdict, d.reason) == ("blocked", Code.RUNTIME_CONSTRAINT) and "'privileged'" in d.detail
    audit = EffectivePolicy(Enforcement(True, "audit"), frozenset({digest}), (), runtime=(STRICT,))
    assert decide(container, audit).verdict == "would-block"
    plain = ContainerFacts(
        "c1", "web", str(APP), digest, ((APP.with_digest(digest), digest),), "running", runtime=RuntimeFacts()
    )
    assert decide(plain, policy).reason == Code.ALLOWLISTED


def test_plugin_slot_findings() -> None:
    from agent.core.plugins import ManagedPlugin, slot_findings

    ours = {"imageguard"}
    assert slot_findings(ours, ["imageguard"], []) == []
    taken = slot_findings(ours, ["imageguard"], [ManagedPlugin("imageguard:latest", False, ())])
    assert len(taken) == 1 and "carries the name" in taken[0]
    other = slot_findings(
        ours, ["imageguard", "opa"], [ManagedPlugin("x/authz", True, ("docker.authz/1.0",))]
    )
    assert len(other) == 2 and "x/authz" in other[0] and "opa" in other[1]
    assert (
        slot_findings(ours, [], [ManagedPlugin("vieux/sshfs:latest", True, ("docker.volumedriver/1.0",))])
        == []
    )
    assert ManagedPlugin.from_raw(
        {"Name": "a:1", "Enabled": True, "Config": {"Interface": {"Types": ["t"]}}}
    ) == (ManagedPlugin("a:1", True, ("t",)))
    assert ManagedPlugin.from_raw({"Name": 5}) is None
