"""imageguard doctor: the checks that need no engine (state directory, clock, broker, flag parsing)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from agent import config as config_mod
from agent.cli.diagnose import CLOCK_FLOOR, Facts, _flag_values, check_broker, check_clock, check_state_dir


@pytest.mark.parametrize(
    ("args", "flag", "expected"),
    [
        (
            ["dockerd", "--authorization-plugin=a", "--authorization-plugin", "b"],
            "--authorization-plugin",
            ["a", "b"],
        ),
        (["dockerd", "-H", "unix:///x.sock"], "-H", ["unix:///x.sock"]),
        (["dockerd", "--authorization-plugin"], "--authorization-plugin", [""]),
        (["dockerd", "--authorization-plugins=a"], "--authorization-plugin", []),
    ],
)
def test_flag_values(args: list[str], flag: str, expected: list[str]) -> None:
    assert _flag_values(args, flag) == expected


def test_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert check_state_dir(state).status == "warn"  # not created yet
    state.mkdir(mode=0o700)
    (state / "state.db").write_text("")
    os.chmod(state / "state.db", 0o600)
    assert check_state_dir(state).status == "ok"
    os.chmod(state, 0o755)
    bad = check_state_dir(state)
    assert bad.status == "fail" and "0755" in bad.detail and "chmod 700" in bad.hint
    os.chmod(state, 0o700)
    os.chmod(state / "state.db", 0o666)
    assert "state.db is writable by others" in check_state_dir(state).detail


JAN_2_2025 = 1735776000.0  # 2025-01-02T00:00:00Z


@pytest.mark.parametrize(
    ("now", "engine_time", "status"),
    [
        (CLOCK_FLOOR - 86400, None, "fail"),
        (JAN_2_2025, None, "ok"),
        (JAN_2_2025, "2025-01-02T00:00:05.123456Z", "ok"),
        (JAN_2_2025, "2025-01-02T00:10:00Z", "warn"),
        (JAN_2_2025, "garbage", "ok"),
    ],
)
def test_clock(now: float, engine_time: str | None, status: str) -> None:
    facts = Facts(engine_info={"SystemTime": engine_time} if engine_time else None)
    assert check_clock(facts, now).status == status


def test_broker(tmp_path: Path) -> None:
    assert check_broker(config_mod.from_dict({})).status == "skip"
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        cfg = config_mod.from_dict({"mqtt": {"url": f"mqtt://127.0.0.1:{port}"}})
        assert check_broker(cfg).status == "ok"
    closed = check_broker(cfg)
    assert closed.status == "fail" and f"127.0.0.1:{port}" in closed.detail


def test_a_state_directory_this_user_cannot_read_is_a_hint_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a non-root user sees (root reads any directory, so the refusal is simulated here)."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)

    def refuse(self: Path) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", refuse)
    check = check_state_dir(state)
    assert check.status == "warn" and "not readable by this user" in check.detail
    assert check.hint and "as root" in check.hint


def test_a_socket_this_user_may_not_use_gets_the_group_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.cli.diagnose import check_engine

    path = tmp_path / "docker.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != path)  # as a user outside its group
    cfg = config_mod.from_dict({"engine": {"url": f"unix://{path}", "timeout_seconds": 1}})
    try:
        check = check_engine(cfg, Facts())
    finally:
        server.close()
    assert check.status == "fail" and check.hint and "docker" in check.hint and "may not use" in check.hint
