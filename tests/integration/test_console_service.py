"""The fleet console service end to end: real agent processes on the private engine, the real mosquitto,
``imageguard console serve`` as a process (SQLite), driven over its JSON API as an operator's script would."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.agentproc import REPO, wait_for
from tests.support.consolesvc import ConsoleService
from tests.support.fixtures.docker import ALLOWED, OTHER
from tests.support.fixtures.mosquitto import MosquittoBroker
from tests.support.fleet import Fleet

pytestmark = pytest.mark.integration


@pytest.fixture
def service(
    request: pytest.FixtureRequest, tmp_path: Path, mosquitto: MosquittoBroker
) -> Iterator[ConsoleService]:
    """SQLite, or with ``indirect`` parametrization "postgresql", a fresh database of the test cluster."""
    database = (
        request.getfixturevalue("postgres_url")
        if getattr(request, "param", "sqlite") == "postgresql"
        else None
    )
    svc = ConsoleService(tmp_path, mosquitto, database=database)
    try:
        yield svc
    finally:
        svc.stop()


def _openapi_check(doc: Any, component: str) -> None:
    """A response checked against the API's own published schema."""
    import jsonschema

    spec = json.loads((REPO / "agent" / "schemas" / "console-api.openapi.json").read_text())
    schema = {"$ref": f"#/components/schemas/{component}", "components": spec["components"]}
    jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)


def _rollout(service: ConsoleService, rid: str) -> dict[str, Any]:
    doc: dict[str, Any] = service.get(f"/api/rollouts/{rid}")
    return doc


def _wait_state(service: ConsoleService, rid: str, *states: str, timeout: float = 60) -> dict[str, Any]:
    wait_for(lambda: _rollout(service, rid)["state"] in states, timeout, 0.2, what=f"rollout {rid} {states}")
    return _rollout(service, rid)


def test_inventory_discovers_online_devices_and_follows_their_lifecycle(
    fleet: Fleet, service: ConsoleService
) -> None:
    fleet.start(("gw-a", ["plant"], "enforce"), ("gw-b", ["plant", "lab"], "audit"))
    service.start()  # after the devices: their retained births tell the service they are online

    def both_online() -> bool:
        return sum(d["online"] for d in service.get("/api/devices")["devices"]) == 2

    wait_for(both_online, 30, 0.2, what="both devices discovered")
    devices = {d["device"]: d for d in service.get("/api/devices")["devices"]}
    _openapi_check(service.get("/api/devices"), "DeviceList")
    assert devices["gw-a"]["groups"] == ["plant"] and devices["gw-b"]["groups"] == ["plant", "lab"]
    assert devices["gw-a"]["enforcement"] == "enforce" and devices["gw-b"]["enforcement"] == "audit"
    assert devices["gw-a"]["agent_version"] and devices["gw-a"]["policy_version"] == "0"

    fleet.agents["gw-b"].stop()  # a clean stop: MQTT/DC, and the retained birth cleared
    wait_for(lambda: not service.get("/api/devices/gw-b")["online"], 30, 0.2, what="gw-b offline")
    assert service.get("/api/devices/gw-a")["online"]
    fleet_doc = service.get("/api/fleet")
    _openapi_check(fleet_doc, "Fleet")
    assert (fleet_doc["devices"], fleet_doc["online"], fleet_doc["offline"]) == (2, 1, 1)
    assert {g["group"]: g["devices"] for g in fleet_doc["groups"]} == {"lab": 1, "plant": 2}

    # the device page's live data comes from the device itself
    live = service.get("/api/devices/gw-a/live/status")
    _openapi_check(live, "Live")
    assert live["code"] == 200 and live["body"]["enforcement"]["mode"] == "enforce"
    assert service.api("GET", "/api/devices/gw-a/live/nonsense").status_code == 404
    assert service.api("GET", "/api/devices/nobody/live/status").status_code == 404


@pytest.mark.parametrize("service", ["sqlite", "postgresql"], indirect=True)
def test_rollout_in_waves_converges_and_a_blocked_container_raises_an_alert(
    fleet: Fleet, service: ConsoleService, busybox_images: dict[str, str]
) -> None:
    other = busybox_images[OTHER]
    fleet.start(
        ("gw-1", ["plant"], "enforce"), ("gw-2", ["plant"], "enforce"), ("gw-3", ["plant"], "enforce")
    )
    service.start()
    wait_for(lambda: len(service.get("/api/devices?online=true")["devices"]) == 3, 30, 0.2)

    layer = {"version": 7, "allowlist": [{"digest": other, "comment": "fleet image"}]}
    r = service.api("POST", "/api/rollouts", {"group": "plant", "document": layer, "waves": "1,100%"})
    assert r.status_code == 201, r.text
    _openapi_check(r.json(), "Rollout")
    rid = r.json()["id"]
    done = _wait_state(service, rid, "completed", "stopped")
    _openapi_check(done, "RolloutDetail")
    assert done["state"] == "completed", done
    rows = {d["device"]: d for d in done["devices"]}
    assert {d: (row["wave"], row["state"]) for d, row in rows.items()} == {
        "gw-1": (0, "applied"),  # the canary: the first device by name
        "gw-2": (1, "applied"),
        "gw-3": (1, "applied"),
    }
    assert rows["gw-1"]["answered_at"] <= min(rows["gw-2"]["sent_at"], rows["gw-3"]["sent_at"])
    assert done["progress"]["converged"] == 100.0
    for device in ("gw-1", "gw-2", "gw-3"):
        code, held = fleet.request(device, "GET", "policy", {"layer": "group:plant"})
        assert code == 200 and held["version"] == 7
    # the whole group took it: the layer is retained on the broker too, for devices that come later
    fleet.start(("gw-4", ["plant"], "enforce"))
    wait_for(lambda: fleet.request("gw-4", "GET", "policy", {"layer": "group:plant"})[1]["version"] == 7, 30)

    # a container no layer allows: every enforcing device blocks it and the alert reaches the console
    before = service.get("/api/alerts")["cursor"]
    fleet.engine.run_untrusted("-d", "--name", "not-on-the-list", ALLOWED)
    got: list[dict[str, Any]] = []

    def alerted() -> bool:
        got[:] = service.get(f"/api/alerts?after={before}&wait=5")["alerts"]
        return any((a["data"].get("container") or {}).get("name") == "not-on-the-list" for a in got)

    wait_for(alerted, 60, 0.1, what="the blocked container's alert")
    _openapi_check(service.get("/api/alerts"), "Alerts")
    alert_devices = {a["device"] for a in got}
    assert alert_devices <= {"gw-1", "gw-2", "gw-3", "gw-4"} and alert_devices
    assert service.get("/api/fleet")["alerts_total"] >= 1
    # the inventory keeps the last decision and alert of each device
    device = service.get(f"/api/devices/{next(iter(alert_devices))}")
    assert device["last_alert"] is not None and device["alerts"] >= 1


def test_rollout_stops_on_rejections_and_never_reaches_the_next_wave(
    fleet: Fleet, service: ConsoleService, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from agent.verify.cosign.keys import public_key_pem
    from agent.verify.policy_signature import sign_policy

    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "policy.pub").write_bytes(public_key_pem(key.public_key()))
    # the canary (first by name) requires signed policy: an unsigned layer is rejected there
    fleet.start(("a-strict", ["edge"], "enforce"), policy_signing_key=str(tmp_path / "policy.pub"))
    fleet.start(("b-open", ["edge"], "enforce"), ("c-open", ["edge"], "enforce"))
    service.start()
    wait_for(lambda: len(service.get("/api/devices?online=true")["devices"]) == 3, 30, 0.2)

    r = service.api("POST", "/api/rollouts", {"group": "edge", "document": {"version": 3}, "waves": "1,100%"})
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    stopped = _wait_state(service, rid, "stopped", "completed")
    assert stopped["state"] == "stopped" and "rejected" in stopped["reason"], stopped
    rows = {d["device"]: d for d in stopped["devices"]}
    assert rows["a-strict"]["state"] == "rejected" and rows["a-strict"]["reason"]
    assert rows["b-open"]["state"] == rows["c-open"]["state"] == "pending"  # never sent
    for device in ("b-open", "c-open"):
        assert fleet.request(device, "GET", "policy", {"layer": "group:edge"})[1]["version"] == 0
    # a stopped rollout cannot be resumed or aborted
    assert service.api("POST", f"/api/rollouts/{rid}/resume").status_code == 409
    assert service.api("POST", f"/api/rollouts/{rid}/abort").status_code == 409

    # the same change, signed (imageguard console sign-policy): every device takes it
    signed = sign_policy({"version": 4, "target": {"group": "edge"}}, key)
    r = service.api("POST", "/api/rollouts", {"group": "edge", "document": signed, "waves": "1,100%"})
    assert r.status_code == 201, r.text
    done = _wait_state(service, r.json()["id"], "completed", "stopped")
    assert done["state"] == "completed" and {d["state"] for d in done["devices"]} == {"applied"}, done
    # a signed envelope for another group is refused before anything is sent
    wrong = sign_policy({"version": 5, "target": {"group": "other"}}, key)
    r = service.api("POST", "/api/rollouts", {"group": "edge", "document": wrong})
    assert r.status_code == 400 and "target" in r.json()["error"]


def test_dry_run_pause_abort_and_rollback(
    fleet: Fleet, service: ConsoleService, busybox_images: dict[str, str]
) -> None:
    other = busybox_images[OTHER]
    fleet.start(("gw-x", ["shop"], "enforce"), ("gw-y", ["shop"], "enforce"))
    service.start()
    wait_for(lambda: len(service.get("/api/devices?online=true")["devices"]) == 2, 30, 0.2)
    v1 = {"version": 1, "allowlist": [{"digest": other, "comment": "shop image"}]}
    rid = service.api("POST", "/api/rollouts", {"group": "shop", "document": v1, "waves": "100%"}).json()[
        "id"
    ]
    assert _wait_state(service, rid, "completed", "stopped")["state"] == "completed"
    fleet.engine.docker("run", "-d", "--name", "shop-app", OTHER)
    wait_for(lambda: any(d["container"]["name"] == "shop-app" for d in fleet.decisions("gw-x")), 20)

    # v2 drops the image: created paused, and asked first what it would block
    v2 = {"version": 2, "allowlist": []}
    r = service.api(
        "POST", "/api/rollouts", {"group": "shop", "document": v2, "waves": "1,100%", "start": False}
    )
    rid2 = r.json()["id"]
    assert r.json()["state"] == "paused"
    dry = service.api("POST", f"/api/rollouts/{rid2}/dry-run").json()
    _openapi_check(dry, "DryRun")
    assert dry["asked"] == 1 and dry["would_block"] == 1, dry
    answer = next(iter(dry["devices"].values()))
    assert [c["name"] for c in answer["containers"] if c["then"] != "allowed"] == ["shop-app"]
    assert fleet.request("gw-x", "GET", "policy", {"layer": "group:shop"})[1]["version"] == 1  # unchanged
    stored = {d["device"]: d for d in _rollout(service, rid2)["devices"]}
    assert stored["gw-x"]["dry_run"]["would_block"] == 1
    assert service.api("POST", f"/api/rollouts/{rid2}/abort").status_code == 200
    assert _rollout(service, rid2)["state"] == "aborted"
    assert service.api("POST", f"/api/rollouts/{rid2}/resume").status_code == 409
    assert fleet.request("gw-y", "GET", "policy", {"layer": "group:shop"})[1]["version"] == 1

    # v3 (version 3, since the aborted one holds 2) goes out; rolling it back re-issues v1's content as v4
    v3 = {"version": 3, "allowlist": [{"digest": other, "comment": "v3"}, {"digest": "sha256:" + "e" * 64}]}
    rid3 = service.api("POST", "/api/rollouts", {"group": "shop", "document": v3, "waves": "100%"}).json()[
        "id"
    ]
    assert _wait_state(service, rid3, "completed", "stopped")["state"] == "completed"
    back = service.api("POST", f"/api/rollouts/{rid3}/rollback")
    assert back.status_code == 200, back.text
    rb = _wait_state(service, back.json()["id"], "completed", "stopped")
    assert rb["state"] == "completed" and rb["rollback_of"] == rid3 and rb["version"] == 4
    for device in ("gw-x", "gw-y"):
        code, held = fleet.request(device, "GET", "policy", {"layer": "group:shop"})
        assert (
            code == 200
            and held["version"] == 4
            and held["allowlist"] == [{"digest": other, "comment": "shop image"}]
        )
    # every change is in the audit log with who made it
    actions = [(e["user"], e["action"]) for e in service.get("/api/audit")["audit"]]
    assert ("token:ci", "rollout.rollback") in actions and ("token:ci", "rollout.abort") in actions
    assert ("token:ci", "rollout.dry-run") in actions and ("token:ci", "rollout.create") in actions
    # an older or equal version is refused up front
    r = service.api("POST", "/api/rollouts", {"group": "shop", "document": {"version": 4}})
    assert r.status_code == 400 and "not newer" in r.json()["error"]


def test_rollout_state_survives_a_service_restart(fleet: Fleet, service: ConsoleService) -> None:
    fleet.start(("gw-r", ["line"], "enforce"))
    service.start()
    wait_for(lambda: len(service.get("/api/devices?online=true")["devices"]) == 1, 30, 0.2)
    r = service.api("POST", "/api/rollouts", {"group": "line", "document": {"version": 2}, "start": False})
    rid = r.json()["id"]
    assert service.stop() == 0
    service.start()
    assert _rollout(service, rid)["state"] == "paused"
    assert service.get("/api/devices/gw-r")["device"] == "gw-r"
    assert service.api("POST", f"/api/rollouts/{rid}/resume").status_code == 200
    assert _wait_state(service, rid, "completed", "stopped")["state"] == "completed"


def test_an_offline_device_is_shown_offline_and_catches_up_from_the_retained_layer(
    fleet: Fleet, service: ConsoleService
) -> None:
    fleet.start(("gw-on", ["yard"], "enforce"), ("gw-off", ["yard"], "enforce"))
    service.start()
    wait_for(lambda: len(service.get("/api/devices?online=true")["devices"]) == 2, 30, 0.2)
    fleet.agents["gw-off"].stop()
    wait_for(lambda: not service.get("/api/devices/gw-off")["online"], 30, 0.2)

    rid = service.api("POST", "/api/rollouts", {"group": "yard", "document": {"version": 6}}).json()["id"]
    done = _wait_state(service, rid, "completed", "stopped")
    rows = {d["device"]: d for d in done["devices"]}
    assert done["state"] == "completed"
    assert (rows["gw-on"]["state"], rows["gw-off"]["state"]) == ("applied", "offline")
    assert "offline" in rows["gw-off"]["reason"]
    assert done["progress"]["converged"] == 50.0

    # back online: the broker hands it the retained layer, its acknowledgement completes the picture
    fleet.agents["gw-off"].start(wait_scan=False)
    fleet.agents["gw-off"].wait_log("mqtt: connected", timeout=30)

    def caught_up() -> bool:
        return {d["device"]: d["state"] for d in _rollout(service, rid)["devices"]}["gw-off"] == "applied"

    wait_for(caught_up, 30, 0.2, what="gw-off acknowledged the retained layer")
    assert _rollout(service, rid)["progress"]["converged"] == 100.0
    assert service.get("/api/devices/gw-off")["online"]


def test_new_alerts_during_the_soak_stop_the_rollout_before_the_next_wave(
    fleet: Fleet, service: ConsoleService, busybox_images: dict[str, str]
) -> None:
    fleet.start(("a-canary", ["alarm"], "enforce"), ("b-rest", ["alarm"], "enforce"))
    service.start()
    wait_for(lambda: len(service.get("/api/devices?online=true")["devices"]) == 2, 30, 0.2)
    layer = {"version": 1, "allowlist": [{"digest": busybox_images[OTHER]}]}
    body = {"group": "alarm", "document": layer, "waves": "1,100%", "soak_seconds": 60, "max_alerts": 0}
    rid = service.api("POST", "/api/rollouts", body).json()["id"]

    def canary_took_it() -> bool:
        return {d["device"]: d["state"] for d in _rollout(service, rid)["devices"]}["a-canary"] == "applied"

    wait_for(canary_took_it, 30, 0.2, what="the canary applied the layer")
    assert _rollout(service, rid)["state"] == "running"  # watching the canary, not yet the next wave
    # something the layer does not allow starts: the canary blocks it and says so
    fleet.engine.run_untrusted("-d", "--name", "after-the-canary", ALLOWED)
    stopped = _wait_state(service, rid, "stopped", "completed")
    assert stopped["state"] == "stopped" and "alert" in stopped["reason"], stopped
    assert stopped["alerts_after_apply"] >= 1
    rows = {d["device"]: d["state"] for d in stopped["devices"]}
    assert rows == {"a-canary": "applied", "b-rest": "pending"}
    assert fleet.request("b-rest", "GET", "policy", {"layer": "group:alarm"})[1]["version"] == 0
    # the canary's inventory shows the version it took (its acknowledgement, and its birth published again)
    wait_for(lambda: "group:alarm=1" in service.get("/api/devices/a-canary")["policy_layers"], 20, 0.2)


def test_a_paused_rollout_starts_no_wave_until_resumed(fleet: Fleet, service: ConsoleService) -> None:
    fleet.start(("p-1", ["hold"], "enforce"), ("p-2", ["hold"], "enforce"))
    service.start()
    wait_for(lambda: len(service.get("/api/devices?online=true")["devices"]) == 2, 30, 0.2)
    body = {"group": "hold", "document": {"version": 2}, "waves": "1,100%", "soak_seconds": 2}
    rid = service.api("POST", "/api/rollouts", body).json()["id"]
    wait_for(lambda: _rollout(service, rid)["progress"]["holding"] == 1, 30, 0.2, what="the canary")
    assert service.api("POST", f"/api/rollouts/{rid}/pause").status_code == 200
    assert service.api("POST", f"/api/rollouts/{rid}/pause").status_code == 409  # already paused
    time.sleep(4)  # longer than the soak: a running rollout would have started wave 2 by now
    paused = _rollout(service, rid)
    assert (
        paused["state"] == "paused"
        and {d["device"]: d["state"] for d in paused["devices"]}["p-2"] == "pending"
    )
    assert service.api("POST", f"/api/rollouts/{rid}/resume").status_code == 200
    done = _wait_state(service, rid, "completed", "stopped")
    assert done["state"] == "completed" and done["progress"]["holding"] == 2
