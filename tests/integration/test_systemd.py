"""Issue 14: the agent as a systemd service: readiness and watchdog over a real notify socket (the
protocol systemd speaks, from a socket the test serves as systemd would), and SIGHUP reloads."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agentproc import AgentProcess, write_config
from tests.support.dockerd import Dockerd

pytestmark = pytest.mark.integration


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(20)

    def next_with(self, key: str) -> dict[str, str]:
        """Messages until one carries ``key``; returns that one."""
        while True:
            data = self.sock.recv(4096).decode()
            fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
            if key in fields:
                return fields

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(tmp_path / "notify.sock")
    yield s
    s.close()


def _config(path: Path, engine: Dockerd, tmp_path: Path, level: str = "info") -> Path:
    return write_config(
        path,
        {
            "device": {"id": "sd-device"},
            "engine": {"url": engine.url},
            "state": {"dir": str(tmp_path / "state")},
            "logging": {"level": level},
        },
    )


def test_ready_watchdog_reload_and_stopping(tmp_path: Path, engine: Dockerd, notify: NotifySocket) -> None:
    config = _config(tmp_path / "config.toml", engine, tmp_path)
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}
    proc = AgentProcess(config, tmp_path / "agent.log", env=env).start(wait_scan=False)
    try:
        ready = notify.next_with("READY")
        assert ready["READY"] == "1" and "policy version" in ready["STATUS"]
        assert proc.proc is not None and ready["MAINPID"] == str(proc.proc.pid)
        assert notify.next_with("WATCHDOG")["WATCHDOG"] == "1"
        # SIGHUP: a new logging level takes effect without a restart
        _config(config, engine, tmp_path, level="debug")
        proc.proc.send_signal(signal.SIGHUP)
        assert notify.next_with("RELOADING")["RELOADING"] == "1"
        assert notify.next_with("READY")["READY"] == "1"
        proc.wait_log("configuration reloaded")
        # a configuration that does not load changes nothing
        config.write_text("[logging]\nlevel = 7\n")
        proc.proc.send_signal(signal.SIGHUP)
        proc.wait_log("configuration not reloaded, the running one stays")
        assert proc.proc.poll() is None
    finally:
        assert proc.stop() == 0, proc.log()
    assert notify.next_with("STOPPING")["STOPPING"] == "1"
