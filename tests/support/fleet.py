"""A fleet of real agent processes (own state directories, one engine, one broker) and the
``imageguard console`` commands that drive them."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.agentproc import AgentProcess, cli, write_config
from tests.support.cloud import ACCOUNT
from tests.support.dockerd import Dockerd
from tests.support.fixtures.mosquitto import MosquittoBroker


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
                    "allow_unsigned_policy": "policy_signing_key" not in mqtt,
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
        (self.tmp / "console-state").mkdir(exist_ok=True)  # the console keeps its device list there
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


def statuses(report: dict[str, Any]) -> dict[str, tuple[str, int | None, str]]:
    return {r["device"]: (r["status"], r["version"], r["reason"]) for r in report["devices"]}
