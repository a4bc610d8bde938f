"""Wake the running agent after the CLI changed the stored state (event-driven: no polling).

The message carries no data: the agent re-reads the database. An abstract Unix socket (named after the
state directory) avoids the 108-byte path limit and leaves nothing on disk; anyone who can send to it can
only make the agent re-read its own database.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def _address(state_dir: Path) -> bytes:
    tag = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:24]
    return b"\0imageguard-" + tag.encode()


def notify_agent(state_dir: Path, message: bytes = b"reload") -> bool:
    """Tell the agent using ``state_dir`` to reload. False if no agent listens (not an error)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(message, _address(state_dir))
        except OSError:
            return False
    return True


class Listener:
    """Receives wake-ups on a thread and calls ``on_message`` for each."""

    def __init__(self, state_dir: Path, on_message: Callable[[bytes], None]) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(_address(state_dir))
        self._on_message = on_message
        self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
        self._closed = False

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(64)
            except OSError:
                return
            if self._closed or data == b"close":
                return
            try:
                self._on_message(data)
            except Exception:
                log.exception("handling a wake-up failed")

    def close(self) -> None:
        self._closed = True
        # recv() does not return on close(): send ourselves a last datagram
        with contextlib.suppress(OSError):
            self._sock.sendto(b"close", self._sock.getsockname())
        self._thread.join(timeout=2)
        self._sock.close()
