"""Fleet rollout end to end: real agent processes (own state directories, one shared private engine), a real
mosquitto, and ``imageguard console rollout`` publishing the retained group layer and collecting the acks."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.support.agentproc import REPO, wait_for
from tests.support.fixtures.docker import OTHER
from tests.support.fleet import Fleet, statuses

pytestmark = pytest.mark.integration


def test_rollout_acknowledged_by_the_group_a_late_device_gets_the_retained_layer_and_older_is_refused(
    fleet: Fleet, busybox_images: dict[str, str]
) -> None:
    other = busybox_images[OTHER]
    fleet.start(
        ("line-1", ["plant"], "enforce"),
        ("line-2", ["plant"], "audit"),
        ("line-3", ["plant", "lab"], "audit"),
    )
    layer = {"version": 5, "allowlist": [{"digest": other, "comment": "fleet image"}]}

    code, report = fleet.rollout("plant", layer, "--expect", "3", "--timeout", "30")
    assert code == 0, report
    assert statuses(report) == {d: ("applied", 5, "") for d in ("line-1", "line-2", "line-3")}
    assert report["ok"] and report["version"] == 5

    # a fourth device comes online later: the broker hands it the retained layer
    fleet.start(("line-4", ["plant"], "enforce"))
    wait_for(
        lambda: fleet.request("line-4", "GET", "policy", {"layer": "group:plant"})[1]["version"] == 5, 20
    )
    code, held = fleet.request("line-4", "GET", "policy", {"layer": "group:plant"})
    assert code == 200 and held["allowlist"] == [{"digest": other, "comment": "fleet image"}]
    code, device_layer = fleet.request("line-4", "GET", "policy")
    assert code == 200 and device_layer["allowlist"] == []  # only the fleet layer allows OTHER

    # and decides with it: a container of OTHER keeps running on this enforcing device
    fleet.engine.docker("run", "-d", "--name", "fleet-allowed", OTHER)
    wait_for(lambda: any(d["container"]["name"] == "fleet-allowed" for d in fleet.decisions("line-4")), 20)
    decision = next(d for d in fleet.decisions("line-4") if d["container"]["name"] == "fleet-allowed")
    assert (decision["verdict"], decision["reason"]) == ("allowed", "allowlisted")
    assert decision["policy_layers"]["group:plant"] == 5
    running = fleet.engine.docker("inspect", "--format", "{{.State.Running}}", "fleet-allowed")
    assert running.stdout.strip() == "true"

    # the console will not replace the retained layer with an older one (a new device would take it) ...
    code, _ = fleet.rollout("plant", {"version": 4, "allowlist": []}, "--expect", "4", "--timeout", "5")
    assert code == 2
    # ... and when forced, the older version is refused by every device, and each keeps version 5
    code, report = fleet.rollout(
        "plant", {"version": 4, "allowlist": []}, "--expect", "4", "--timeout", "30", "--force"
    )
    assert code == 1
    assert statuses(report) == {
        d: ("rejected", 4, report["devices"][i]["reason"]) for i, d in enumerate(sorted(fleet.agents))
    }
    assert all(r["reason"].startswith("policy-rollback") for r in report["devices"]), report
    assert report["withdrawn"], "a stale layer is never left retained"
    for device in fleet.agents:
        assert fleet.request(device, "GET", "policy", {"layer": "group:plant"})[1]["version"] == 5

    # the same version again is nothing new: unchanged, which still counts as holding it
    code, report = fleet.rollout("plant", layer, "--expect", "4", "--timeout", "30", "--force")
    assert code == 0 and {s for s, _, _ in statuses(report).values()} == {"unchanged"}


def test_rollout_to_a_group_nobody_is_in_times_out_with_exit_1(fleet: Fleet) -> None:
    fleet.start(("solo-1", ["plant"], "audit"))
    code, report = fleet.rollout("empty-group", {"version": 1}, "--timeout", "2")
    assert code == 1 and report["devices"] == [] and not report["ok"]


def test_devices_lists_births_and_disconnects(fleet: Fleet) -> None:
    proc = subprocess.Popen(
        [*_console_argv(fleet), "devices", "--wait", "12", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        wait_for(lambda: "console-1-" in fleet.broker.log(), 15, what="the console to connect")
        fleet.start(("dev-a", ["plant"], "audit"), ("dev-b", [], "audit"))
        fleet.agents["dev-b"].stop()
        out, err = proc.communicate(timeout=40)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    seen = {d["device"]: d for d in json.loads(out)}
    assert seen["dev-a"]["online"] and seen["dev-a"]["groups"] == ["plant"]
    assert not seen["dev-b"]["online"]
    # the registry file remembers them for the next rollout
    registry = json.loads((fleet.tmp / "console-state" / "console-devices.json").read_text())
    assert {d["device"] for d in registry["devices"]} == {"dev-a", "dev-b"}


def _console_argv(fleet: Fleet) -> list[str]:
    import sys

    (fleet.tmp / "console-state").mkdir(exist_ok=True)
    return [sys.executable, "-m", "agent", "--config", str(fleet.console_config), "console"]


def test_devices_already_online_are_found_and_dead_ones_are_not(fleet: Fleet) -> None:
    """Issue 14: births are retained and the will clears them, so a console that starts after the devices
    sees exactly the ones online now, without waiting for their next birth."""
    fleet.start(("early-a", ["plant"], "audit"), ("early-b", [], "audit"), ("early-c", [], "audit"))
    fleet.agents["early-b"].stop()  # a clean stop clears its birth
    fleet.agents["early-c"].kill9()  # a crash: the broker's will clears it
    wait_for(lambda: "early-c" in fleet.broker.log(), 5, what="the broker to notice")
    out = subprocess.run(
        [*_console_argv(fleet), "devices", "--wait", "2", "--json", "--registry", "none"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    seen = {d["device"]: d["online"] for d in json.loads(out.stdout)}
    assert seen.get("early-a") is True
    assert not seen.get("early-b") and not seen.get("early-c"), seen
