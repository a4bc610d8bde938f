"""Issue 14: the optional metrics endpoint against a running agent: Prometheus text, a health check, and a
port that cannot be bound disables the endpoint without stopping enforcement."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.agentproc import AgentProcess, wait_for, write_config
from tests.support.dockerd import Dockerd
from tests.support.fixtures.docker import OTHER
from tests.support.ports import free_port

pytestmark = pytest.mark.integration


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _config(tmp_path: Path, engine: Dockerd, port: int) -> Path:
    return write_config(
        tmp_path / "config.toml",
        {
            "device": {"id": "metrics-device"},
            "engine": {"url": engine.url},
            "state": {"dir": str(tmp_path / "state")},
            "enforcement": {"stop_grace_seconds": 0},
            "metrics": {"enabled": True, "listen": f"127.0.0.1:{port}"},
        },
    )


def test_metrics_and_health(tmp_path: Path, engine: Dockerd, busybox_images: dict[str, str]) -> None:
    port = free_port()
    proc = AgentProcess(_config(tmp_path, engine, port), tmp_path / "agent.log").start()
    base = f"http://127.0.0.1:{port}"
    try:
        engine.run_untrusted("-d", "--name", "counted", OTHER)
        proc.wait_log("blocked container counted")
        status, text = _get(base + "/metrics")
        assert status == 200
        assert 'imageguard_decisions_total{reason="not-allowlisted",verdict="blocked"} 1.0' in text
        for name in (
            "imageguard_engine_connected 1.0",
            "imageguard_outbox_queued",
            "imageguard_retry_queue 0.0",
            "imageguard_storage_ok 1.0",
            'imageguard_info{version="',
        ):
            assert name in text, name
        status, body = _get(base + "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        assert _get(base + "/nothing")[0] == 404
    finally:
        assert proc.stop() == 0, proc.log()


def test_a_port_in_use_disables_the_endpoint_not_enforcement(
    tmp_path: Path, engine: Dockerd, busybox_images: dict[str, str]
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        config = _config(tmp_path, engine, taken.getsockname()[1])
        proc = AgentProcess(config, tmp_path / "agent.log").start()
        try:
            proc.wait_log("METRICS is DISABLED")
            engine.run_untrusted("-d", "--name", "still-enforced", OTHER)
            wait_for(
                lambda: "still-enforced" not in engine.docker("ps", "-a", "--format", "{{.Names}}").stdout,
                15,
                what="removal",
            )
        finally:
            assert proc.stop() == 0, proc.log()
    finally:
        taken.close()
