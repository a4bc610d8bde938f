"""The wake-up channel: a socket in the 0700 state directory, long paths, floods, and its fallback."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from agent.adapters.wakeup import DatabaseWatch, Listener, notify_agent


def wait(pred: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_messages_arrive_also_on_a_path_too_long_for_a_socket_address(tmp_path: Path) -> None:
    state = tmp_path / ("x" * 100) / "state"
    state.mkdir(parents=True, mode=0o700)
    got: list[bytes] = []
    listener = Listener(state, got.append)
    listener.start()
    try:
        assert notify_agent(state, b"iu:web:t1")
        assert wait(lambda: got == [b"iu:web:t1"])
    finally:
        listener.close()
    assert not (state / "agent.sock").exists()  # cleaned up
    assert notify_agent(state) is False  # nobody listens: not an error


def test_a_flood_is_handled_in_batches_without_duplicates(tmp_path: Path) -> None:
    got: list[bytes] = []
    gate = threading.Event()

    def slow(data: bytes) -> None:
        gate.wait(5)
        got.append(data)

    listener = Listener(tmp_path, slow)
    listener.start()
    try:
        assert notify_agent(tmp_path, b"iu:web:t1")
        for _ in range(200):  # the CLI never blocks on a busy agent: a full queue holds a reload already
            assert notify_agent(tmp_path)
        gate.set()
        assert wait(lambda: b"iu:web:t1" in got and b"reload" in got)
    finally:
        listener.close()
    assert got.count(b"reload") <= 3  # not 200 re-reads


def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    first = Listener(tmp_path, lambda _d: None)
    first._sock.close()  # an agent that died without cleaning up leaves the file
    got: list[bytes] = []
    second = Listener(tmp_path, got.append)
    second.start()
    try:
        assert notify_agent(tmp_path) and wait(lambda: got == [b"reload"])
    finally:
        second.close()


def test_the_database_watch_sees_a_change(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    db.write_text("a")
    changes: list[int] = []
    watch = DatabaseWatch([db, tmp_path / "state.db-wal"], lambda: changes.append(1), interval=0.05)
    watch.start()
    try:
        time.sleep(0.1)
        db.write_text("bb")
        assert wait(lambda: changes)
    finally:
        watch.close()
