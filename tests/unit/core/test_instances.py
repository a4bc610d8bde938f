"""Managed instances, the pure part: spec parsing (field paths), pins, container identity, planning."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from agent.core.anchors import TrustAnchor
from agent.core.decision import rescan_reason
from agent.core.digest import Digest
from agent.core.imageref import ImageRef
from agent.core.instances import (
    LABEL_CONFIG,
    LABEL_INSTANCE,
    LABEL_MANAGED,
    InstanceFailure,
    InstanceSpec,
    InstanceState,
    Observed,
    ObservedContainer,
    Step,
    UpdateOutcome,
    container_config,
    current_pin_key,
    docker_create_args,
    enabled_pins,
    next_check,
    pin_key,
    plan,
    remote_problem,
    update_due,
)
from agent.core.policy import EffectivePolicy, Enforcement, PolicyLayer
from agent.core.schemas import validate
from agent.errors import Code, PolicyError, SchemaError

D1, D2, D3 = (Digest.of(bytes([i])) for i in range(3))
PEM = "-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----\n"
TEAM = TrustAnchor("team", "key", PEM, scope=("registry.example:5000/acme/*",))
TEAM2 = TrustAnchor("team", "key", PEM + "\n")  # same name, other material
ANCHORS = {"team": TEAM}

BASE: dict[str, Any] = {
    "name": "web",
    "image": "registry.example:5000/acme/web",
    "tag": "stable",
    "trust_anchor": "team",
    "run": {
        "command": ["serve", "--port", "80"],
        "environment": {"MODE": "prod"},
        "ports": [
            {"container": 80, "host": 8080},
            {"container": 53, "protocol": "udp", "host_ip": "127.0.0.1"},
        ],
        "volumes": [{"source": "/srv/data", "target": "/data", "read_only": True}],
        "restart": "unless-stopped",
        "network": "host",
        "labels": {"team": "edge"},
        "stop_timeout_seconds": 3,
    },
}


def spec(**changes: Any) -> InstanceSpec:
    doc = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return InstanceSpec.from_document(doc)


def test_full_spec_parses() -> None:
    s = spec()
    assert s.name == "web" and s.repository == "registry.example:5000/acme/web"
    assert s.image.tag == "stable" and s.image.digest is None and s.enabled
    assert s.anchor_name == "team" and s.inline_anchor is None and s.enforcement_digest is None
    assert s.run.command == ("serve", "--port", "80") and s.run.restart == "unless-stopped"
    assert s.run.ports[1].protocol == "udp" and s.run.volumes[0].read_only
    assert s.to_document() == BASE


def test_digest_and_inline_anchor_and_enforcement_digest() -> None:
    s = spec(
        tag=None,
        digest=str(D1).upper().replace("SHA256", "sha256"),
        trust_anchor={"pem": PEM, "require_tlog": True},
    )
    assert s.image.digest == D1 and s.image.tag is None
    assert (
        s.inline_anchor is not None
        and s.inline_anchor.require_tlog
        and s.inline_anchor.name == "instance-web"
    )
    vouched = spec(trust_anchor=None, enforcement_digest=str(D2))
    assert vouched.enforcement_digest == D2 and vouched.trust_anchor(ANCHORS.get) is None


@pytest.mark.parametrize(
    ("change", "pointer"),
    [
        ({"bogus": 1}, "/bogus"),
        ({"run": {"bogus": 1}}, "/run/bogus"),
        ({"run": {"ports": [{"container": 80, "hots": 1}]}}, "/run/ports/0/hots"),
        ({"run": {"ports": [{"container": 70000}]}}, "/run/ports/0/container"),
        ({"run": {"ports": [{"container": 80}, {"container": 80}]}}, "/run/ports/1/container"),
        ({"run": {"volumes": [{"source": "x", "target": "relative"}]}}, "/run/volumes/0/target"),
        ({"run": {"restart": "sometimes"}}, "/run/restart"),
        ({"run": {"environment": {"1BAD": "x"}}}, "/run/environment"),
        ({"run": {"labels": {"dev.imageguard.instance": "x"}}}, "/run/labels/dev.imageguard.instance"),
        ({"trust_anchor": {"pem": PEM, "kind": "key", "extra": 1}}, "/trust_anchor/extra"),
        ({"trust_anchor": {"kind": "key"}}, "/trust_anchor/pem"),
        ({"trust_anchor": None}, "/trust_anchor"),
        ({"digest": str(D1)}, "/digest"),
        ({"tag": "bad tag"}, "/tag"),
        ({"image": "registry.example:5000/acme/web:1"}, "/image"),
        ({"image": "Not/Valid"}, "/image"),
        ({"name": "-web"}, "/name"),
        ({"name": "w" * 41}, "/name"),
        ({"enforcement_digest": "sha256:nope"}, "/enforcement_digest"),
        ({"update_interval_seconds": 1}, "/update_interval_seconds"),
        ({"enabled": "yes"}, "/enabled"),
        ({"image": None}, "/image"),
        ({"run": {"volumes": [{"target": "/x"}]}}, "/run/volumes/0/source"),
    ],
)
def test_bad_specs_name_the_field(change: dict[str, Any], pointer: str) -> None:
    with pytest.raises(SchemaError) as exc:
        spec(**change)
    assert exc.value.pointer == pointer, exc.value
    assert f"at {pointer}:" in str(exc.value)


def test_enforcement_digest_must_match_a_given_digest() -> None:
    with pytest.raises(SchemaError) as exc:
        spec(tag=None, digest=str(D1), enforcement_digest=str(D2))
    assert exc.value.pointer == "/enforcement_digest"
    assert spec(tag=None, digest=str(D1), enforcement_digest=str(D1)).enforcement_digest == D1


def test_not_an_object() -> None:
    with pytest.raises(SchemaError):
        InstanceSpec.from_document(["web"])


# ---- in the policy -----------------------------------------------------------------------------------


def test_device_layer_carries_instances_and_round_trips() -> None:
    doc = {"version": 3, "instances": [BASE, dict(BASE, name="api")]}
    layer = PolicyLayer.from_document(doc)
    assert [i.name for i in layer.instances] == ["web", "api"]
    assert PolicyLayer.from_document(layer.to_document()).instances == layer.instances
    assert layer.bumped().instances == layer.instances
    assert "instances" not in PolicyLayer.from_document({"version": 1}).to_document()


def test_fleet_layers_and_duplicates_are_refused() -> None:
    with pytest.raises(
        PolicyError, match="at /instances: instances can only be declared in the device layer"
    ):
        PolicyLayer.from_document({"version": 1, "instances": [BASE]}, "group:plant")
    with pytest.raises(SchemaError) as exc:
        PolicyLayer.from_document({"version": 1, "instances": [BASE, BASE]})
    assert exc.value.pointer == "/instances/1/name"
    with pytest.raises(SchemaError) as exc:
        PolicyLayer.from_document({"version": 1, "instances": [BASE, dict(BASE, name="x", bogus=1)]})
    assert exc.value.pointer == "/instances/1/bogus"


# ---- anchors, pins and identity ------------------------------------------------------------------------


def test_trust_anchor_resolution_failures() -> None:
    with pytest.raises(InstanceFailure) as exc:
        spec().trust_anchor({}.get)
    assert exc.value.reason is Code.ANCHOR_MISSING
    with pytest.raises(InstanceFailure) as exc:
        spec(image="registry.example:5000/other/web").trust_anchor(ANCHORS.get)
    assert exc.value.reason is Code.ANCHOR_SCOPE
    assert spec().trust_anchor(ANCHORS.get) is TEAM
    assert current_pin_key(spec(), {}.get) is None


def test_pin_key_follows_image_and_anchor_not_run_options() -> None:
    base = pin_key(spec(), TEAM)
    assert pin_key(spec(run={"restart": "always"}), TEAM) == base
    assert pin_key(spec(enabled=False), TEAM) == base
    for other in (
        pin_key(spec(tag="next"), TEAM),
        pin_key(spec(image="registry.example:5000/acme/api"), TEAM),
        pin_key(spec(), TEAM2),
        pin_key(spec(trust_anchor=None, enforcement_digest=str(D1)), None),
    ):
        assert other != base


def test_container_config_follows_run_options_and_digest() -> None:
    base = container_config(spec(), D1)
    assert container_config(spec(), D1) == base
    assert container_config(spec(), D2) != base
    assert container_config(spec(run={"restart": "always"}), D1) != base
    assert container_config(spec(tag="other"), D1) == base  # the digest is what runs, not the tag


def test_docker_create_args() -> None:
    create, host = docker_create_args(spec(), D1)
    assert create["image"] == f"registry.example:5000/acme/web@{D1}" and create["name"] == "web"
    assert create["command"] == ["serve", "--port", "80"] and create["environment"] == ["MODE=prod"]
    assert create["labels"] == {
        "team": "edge",
        LABEL_MANAGED: "true",
        LABEL_INSTANCE: "web",
        LABEL_CONFIG: container_config(spec(), D1),
    }
    assert create["ports"] == [(80, "tcp"), (53, "udp")] and create["stop_timeout"] == 3
    assert host == {
        "port_bindings": {"80/tcp": 8080, "53/udp": ("127.0.0.1", None)},
        "binds": ["/srv/data:/data:ro"],
        "restart_policy": {"Name": "unless-stopped"},
        "network_mode": "host",
    }
    minimal, minimal_host = docker_create_args(spec(run=None), D1)
    assert "command" not in minimal and minimal["environment"] is None and minimal_host == {}


def pinned(
    s: InstanceSpec, digest: Digest = D1, anchor: TrustAnchor | None = TEAM, **kw: Any
) -> InstanceState:
    return InstanceState(s.name, "running", pinned_digest=digest, pin_key=pin_key(s, anchor), **kw)


def test_enabled_pins() -> None:
    web, api = spec(), spec(name="api", image="registry.example:5000/acme/api")
    states = {"web": pinned(web, D1), "api": pinned(api, D2)}
    assert enabled_pins([web, api], states, ANCHORS.get) == {D1, D2}
    assert enabled_pins([web, api.with_enabled(False)], states, ANCHORS.get) == {D1}
    assert enabled_pins([web], states, ANCHORS.get) == {D1}  # deleted: its pin counts no more
    assert enabled_pins([web, api], states, {}.get) == frozenset()  # anchor gone
    assert enabled_pins([web, api], states, {"team": TEAM2}.get) == frozenset()  # anchor changed
    assert enabled_pins([spec(tag="next")], states, ANCHORS.get) == frozenset()  # re-declared
    assert enabled_pins([web], {"web": InstanceState("web", "failed")}, ANCHORS.get) == frozenset()


def test_withdrawn_pin_asks_for_a_rescan() -> None:
    def policy(pins: frozenset[Digest]) -> EffectivePolicy:
        return EffectivePolicy(Enforcement(), frozenset(), (TEAM,), {}, pins)

    assert rescan_reason(policy(frozenset({D1})), policy(frozenset())) == "an instance digest was withdrawn"
    assert (
        rescan_reason(policy(frozenset({D1})), policy(frozenset({D2}))) == "an instance digest was withdrawn"
    )
    assert rescan_reason(policy(frozenset()), policy(frozenset({D1}))) is None


# ---- planning --------------------------------------------------------------------------------------------

S = spec()
KEY = pin_key(S, TEAM)
GOOD = ObservedContainer("c1", True, container_config(S, D1))
STOPPED = ObservedContainer("c1", False, container_config(S, D1))
STALE = ObservedContainer("c0", True, container_config(S, D2))


@pytest.mark.parametrize(
    ("s", "state", "observed", "update", "step"),
    [
        (None, None, Observed(), False, Step.NOTHING),
        (None, pinned(S), Observed((GOOD,), True), False, Step.REMOVE),
        (S.with_enabled(False), pinned(S), Observed((GOOD,), True), False, Step.REMOVE),
        (S.with_enabled(False), pinned(S), Observed((), True), False, Step.NOTHING),
        (S, None, Observed(), False, Step.PIN),
        (S, InstanceState("web", "pending"), Observed(), False, Step.PIN),
        (S, pinned(S, anchor=TEAM2), Observed((GOOD,), True), False, Step.PIN),  # pin for other material
        (S, pinned(S), Observed((GOOD,), True), True, Step.PIN),  # update requested
        (S, pinned(S), Observed((), False), False, Step.FETCH),
        (S, pinned(S), Observed((), True), False, Step.CREATE),
        (S, pinned(S), Observed((STALE,), True), False, Step.CREATE),
        (S, pinned(S), Observed((GOOD, STALE), True), False, Step.CREATE),
        (S, pinned(S), Observed((STOPPED,), True), False, Step.START),
        (S, pinned(S), Observed((GOOD,), True), False, Step.NOTHING),
        # a failure that retrying the same declaration cannot fix waits for a change ...
        (
            S,
            InstanceState("web", "failed", reason="signature-invalid", attempt_key=KEY),
            Observed(),
            False,
            Step.WAIT,
        ),
        # ... unless something changed or an update is asked for; network failures are retried
        (
            S,
            InstanceState("web", "failed", reason="signature-invalid", attempt_key="x"),
            Observed(),
            False,
            Step.PIN,
        ),
        (
            S,
            InstanceState("web", "failed", reason="signature-invalid", attempt_key=KEY),
            Observed(),
            True,
            Step.PIN,
        ),
        (
            S,
            InstanceState("web", "failed", reason="image-unavailable-offline", attempt_key=KEY),
            Observed(),
            False,
            Step.PIN,
        ),
    ],
)
def test_plan(
    s: InstanceSpec | None, state: InstanceState | None, observed: Observed, update: bool, step: Step
) -> None:
    assert plan(s, state, observed, KEY, update=update) is step


def test_periodic_checks() -> None:
    periodic = spec(update_interval_seconds=60)
    state = pinned(periodic, last_check=1000.0)
    assert not update_due(periodic, state, 1059.0) and update_due(periodic, state, 1060.0)
    assert not update_due(spec(), state, 5000.0)  # no interval
    assert not update_due(periodic, None, 5000.0)  # nothing pinned yet: the first pin is not an update
    assert not update_due(spec(tag=None, digest=str(D1), update_interval_seconds=60), state, 5000.0)
    assert next_check([periodic, spec(name="x")], {"web": state}) == 1060.0
    assert next_check([spec()], {"web": state}) is None


def test_state_row_round_trip() -> None:
    state = InstanceState(
        "web",
        "running",
        reason="update-rejected",
        detail="no signatures",
        pinned_digest=D1,
        pin_key="k",
        container_id="c1",
        updated_at="t",
        last_update=UpdateOutcome("1", "t", "rejected"),
        last_check=12.5,
    )
    import json

    row = ("web", json.dumps(state.meta()), "running", str(D1), "c1", "update-rejected", "t")
    assert InstanceState.from_row(*row) == state
    assert state.to_dict()["last_update"] == {"id": "1", "time": "t", "result": "rejected"}


@pytest.mark.parametrize(
    "outcome",
    [
        UpdateOutcome(
            "t1",
            "2024-01-01T00:00:00.000Z",
            "updated",
            digest=str(Digest.of(b"a")),
            previous=str(Digest.of(b"b")),
        ),
        UpdateOutcome("t1", "2024-01-01T00:00:00.000Z", "unchanged", digest=str(Digest.of(b"a"))),
        UpdateOutcome(
            "t1", "2024-01-01T00:00:00.000Z", "rejected", reason=Code.SIGNATURE_INVALID, detail="bad"
        ),
        UpdateOutcome(None, "2024-01-01T00:00:00.000Z", "failed", reason=Code.NOT_FOUND),
    ],
)
def test_update_outcome_round_trips_and_matches_the_reply_schema(outcome: UpdateOutcome) -> None:
    assert UpdateOutcome.from_dict(outcome.to_dict()) == outcome
    validate({"name": "web", **outcome.to_dict()}, "control/exec-instance-update.reply", "update reply")


# -- specs that arrive over MQTT ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("run", "granted", "words"),
    [
        ({"network": "host"}, (), "network 'host' is not permitted"),
        ({"volumes": [{"source": "/", "target": "/host"}]}, (), "exposes / of the host"),
        ({"volumes": [{"source": "/etc/ssl", "target": "/ssl"}]}, (), "exposes /etc"),
        ({"volumes": [{"source": "/var/run/docker.sock", "target": "/s"}]}, (), "exposes /var/run"),
        ({"volumes": [{"source": "/var/../etc", "target": "/x"}]}, (), "exposes /etc"),
        ({"volumes": [{"source": "/var/lib/imageguard", "target": "/x"}]}, (), "exposes /var/lib"),
        ({"network": "host"}, ("host_network",), None),
        ({"volumes": [{"source": "/etc", "target": "/x"}]}, ("sensitive_binds",), None),
        ({"volumes": [{"source": "/srv/data", "target": "/data"}], "network": "bridge"}, (), None),
        ({"volumes": [{"source": "appdata", "target": "/data"}]}, (), None),
    ],
)
def test_what_a_remote_spec_may_ask_for(
    run: dict[str, Any], granted: tuple[str, ...], words: str | None
) -> None:
    problem = remote_problem(spec(run=run), granted)
    if words is None:
        assert problem is None
    else:
        assert problem is not None and words in problem


def test_a_protected_path_is_refused_to_remote_specs_whatever_the_grants_say_about_others() -> None:
    s = spec(run={"volumes": [{"source": "/data/imageguard", "target": "/x"}]})
    assert remote_problem(s, ("host_network",), ["/data/imageguard/state"]) is not None


def test_an_inline_anchor_covers_its_own_repository_only() -> None:
    s = spec(trust_anchor={"pem": PEM})
    assert s.inline_anchor is not None
    assert s.inline_anchor.covers(ImageRef.parse("registry.example:5000/acme/web:any"))
    assert not s.inline_anchor.covers(ImageRef.parse("registry.example:5000/acme/other:1"))
    assert not s.inline_anchor.covers(ImageRef.parse("evil.example/x:1"))
