"""Issue 14: the plugin socket can be socket-activated. systemd's own tool (systemd-socket-activate) holds the
socket and starts the agent on the first connection; that request waits in the backlog and is answered by
the agent, from the socket it was handed, instead of failing."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from tests.support.agentproc import AgentProcess, wait_for, write_config
from tests.support.dockerd import Dockerd

pytestmark = pytest.mark.integration


def _activate(path: Path) -> dict[str, object]:
    """``POST /Plugin.Activate`` over the Unix socket, as dockerd sends it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(str(path))
        s.sendall(
            b"POST /Plugin.Activate HTTP/1.1\r\nHost: plugin\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], head
    doc: dict[str, object] = json.loads(body)
    return doc


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd's socket-activate")
def test_the_first_request_waits_for_the_agent_and_is_answered(tmp_path: Path, engine: Dockerd) -> None:
    sock = tmp_path / "plugins" / "imageguard.sock"
    sock.parent.mkdir()
    config = write_config(
        tmp_path / "config.toml",
        {
            "device": {"id": "activated"},
            "engine": {"url": engine.url},
            "state": {"dir": str(tmp_path / "state")},
            "preventive": {"enabled": True, "socket": str(sock)},
        },
    )
    proc = AgentProcess(
        config, tmp_path / "agent.log", wrapper=["systemd-socket-activate", "-l", str(sock)]
    ).start(wait_scan=False)
    try:
        wait_for(sock.exists, 10, what="systemd-socket-activate to listen")
        assert sock.is_socket() and "ImageGuard" not in proc.log(), "the agent is not running yet"
        assert _activate(sock) == {"Implements": ["authz"]}  # waited for the agent, then answered
        proc.wait_log("socket from systemd")
    finally:
        assert proc.stop() == 0, proc.log()
    assert sock.is_socket(), "the socket is systemd's: the agent leaves it in place when it stops"
