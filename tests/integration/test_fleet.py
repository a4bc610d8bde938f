"""Fleet rollout end to end: real agent processes (own state directories, one shared private engine), a real
mosquitto, and ``imageguard console rollout`` publishing the retained group layer and collecting the acks."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.mosquitto import MosquittoBroker
from tests.support.agentproc import REPO, AgentProcess, cli, wait_for, write_config
from tests.support.dockerd import Dockerd

pytestmark = pytest.mark.integration

ACCOUNT = "acme"
ALLOWED = "ig-test/allowed:1"
OTHER = "ig-test/other:1"


@dataclass
class Fleet:
    """Starts agents and runs console commands; stops every agent it started."""

    tmp: Path
    broker: MosquittoBroker
    engine: Dockerd
    agents: dict[str, AgentProcess] = field(default_factory=dict)
    configs: dict[str, Path] = field(default_factory=dict)

    def agent_config(self, device: str, groups: list[str], mode: str, **mqtt: Any) -> Path:
        directory = self.tmp / device
        directory.mkdir()
        config = write_config(
            directory / "config.toml",
            {
                "device": {"id": device, "groups": groups},
                "engine": {"url": self.engine.url},
                "state": {"dir": str(directory / "state")},
                "enforcement": {"mode": mode, "stop_grace_seconds": 0},
                "mqtt": {
                    "url": self.broker.url,
                    "account": ACCOUNT,
                    "reconnect_min_seconds": 0.2,
                    "reconnect_max_seconds": 1.0,
                    **mqtt,
                },
            },
        )
        self.configs[device] = config
        return config

    def start(self, *specs: tuple[str, list[str], str], **mqtt: Any) -> None:
        """Start agents in parallel: (device, groups, mode) each; wait until each is connected."""
        started = []
        for device, groups, mode in specs:
            config = self.agent_config(device, groups, mode, **mqtt)
            proc = AgentProcess(config, config.parent / "agent.log").start(wait_scan=False)
            self.agents[device] = proc
            started.append(proc)
        for proc in started:
            proc.wait_log("scan done", timeout=60)
            proc.wait_log("mqtt: connected", timeout=30)

    def stop_all(self) -> None:
        for device, proc in self.agents.items():
            if proc.proc is not None:
                assert proc.stop() == 0, f"{device}:\n{proc.log()}"

    @property
    def console_config(self) -> Path:
        path = self.tmp / "console.toml"
        if not path.exists():
            write_config(
                path,
                {
                    "device": {"id": "console-1"},
                    "state": {"dir": str(self.tmp / "console-state")},
                    "mqtt": {"url": self.broker.url, "account": ACCOUNT},
                },
            )
        return path

    def console(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return cli(self.console_config, "console", *args, timeout=timeout)

    def request(self, device: str, method: str, resource: str, body: Any = None) -> tuple[int, Any]:
        args = [device, method, resource, "--json"]
        if body is not None:
            path = self.tmp / f"body-{device}-{method}.json"
            path.write_text(json.dumps(body))
            args += ["--body", str(path)]
        out = self.console("request", *args)
        reply = json.loads(out.stdout)
        return reply["response.code"], reply.get("body") or reply.get("response.exception.message")

    def rollout(self, group: str, policy: dict[str, Any], *extra: str) -> tuple[int, dict[str, Any]]:
        path = (
            self.tmp
            / f"policy-{group}-{policy.get('version', policy.get('document', {}).get('version'))}.json"
        )
        path.write_text(json.dumps(policy))
        out = self.console("rollout", "--group", group, "--policy", str(path), "--json", *extra)
        assert out.stdout, out.stderr
        return out.returncode, json.loads(out.stdout)

    def decisions(self, device: str) -> list[dict[str, Any]]:
        out = cli(self.configs[device], "decisions", "--limit", "100", "--json", check=True)
        records: list[dict[str, Any]] = json.loads(out.stdout)["decisions"]
        return records


@pytest.fixture
def fleet(
    tmp_path: Path, mosquitto: MosquittoBroker, engine: Dockerd, busybox_images: dict[str, str]
) -> Iterator[Fleet]:
    f = Fleet(tmp_path, mosquitto, engine)
    try:
        yield f
    finally:
        f.stop_all()


def statuses(report: dict[str, Any]) -> dict[str, tuple[str, int | None, str]]:
    return {r["device"]: (r["status"], r["version"], r["reason"]) for r in report["devices"]}


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
