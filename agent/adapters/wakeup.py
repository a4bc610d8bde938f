"""Wake the running agent after the CLI changed the stored state (event-driven: no polling).

The message carries (almost) no data: the agent re-reads the database. The socket lives in the state
directory, which is 0700: only root (or the agent's own user) can reach it, unlike an abstract socket that
any local user, or a ``--network host`` container, could bind first or flood. It is reached through
``/proc/self/fd``, so a long state path does not hit the 108-byte limit of socket addresses.

If the channel cannot be served, the agent says so and watches the database files instead
(:class:`DatabaseWatch`): enforcement never depends on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SOCKET_NAME = "agent.sock"
MAX_MESSAGE = 64
MAX_BATCH = 256


class _DirPath:
    """A short path to ``name`` in ``directory`` through an open descriptor of the directory."""

    def __init__(self, directory: Path) -> None:
        self.fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)

    def path(self, name: str) -> str:
        return f"/proc/self/fd/{self.fd}/{name}"

    def close(self) -> None:
        os.close(self.fd)


def notify_agent(state_dir: Path, message: bytes = b"reload") -> bool:
    """Tell the agent using ``state_dir`` to reload. False if no agent listens (not an error)."""
    try:
        d = _DirPath(state_dir)
    except OSError:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            # never wait on a busy agent: a full queue already holds a reload
            s.sendto(message[:MAX_MESSAGE], socket.MSG_DONTWAIT, d.path(SOCKET_NAME))
    except BlockingIOError:
        return message == b"reload"
    except OSError:
        return False
    finally:
        d.close()
    return True


class Listener:
    """Receives wake-ups on a thread and calls ``on_message`` for each. Raises OSError if it cannot bind."""

    def __init__(self, state_dir: Path, on_message: Callable[[bytes], None]) -> None:
        self._dir = _DirPath(state_dir)
        self._path = self._dir.path(SOCKET_NAME)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)  # a socket file left by an agent that died: nobody listens on it
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.bind(self._path)
            os.chmod(self._path, 0o600)
        except OSError:
            self._sock.close()
            self._dir.close()
            raise
        self._on_message = on_message
        self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
        self._closed = False

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            try:
                batch = [self._sock.recv(MAX_MESSAGE)]
                # whatever queued up meanwhile is handled as one batch: a flood costs one re-read
                while len(batch) < MAX_BATCH:
                    batch.append(self._sock.recv(MAX_MESSAGE, socket.MSG_DONTWAIT))
            except BlockingIOError:
                pass
            except OSError:
                return
            if self._closed or b"close" in batch:
                return
            for data in dict.fromkeys(batch):  # duplicates once, in order
                try:
                    self._on_message(data)
                except Exception:
                    log.exception("handling a wake-up failed")

    def close(self) -> None:
        self._closed = True
        # recv() does not return on close(): send ourselves a last datagram, or (the socket file is gone
        # with its directory) shut the socket down, which ends the recv too
        try:
            self._sock.sendto(b"close", self._path)
        except OSError:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=2)
        self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self._path)
        self._dir.close()


class DatabaseWatch:
    """The fallback when the wake-up channel cannot be served: re-read when the database files change."""

    def __init__(self, files: list[Path], on_change: Callable[[], None], interval: float = 1.0) -> None:
        self.files = files
        self.on_change = on_change
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="db-watch", daemon=True)

    def _stamp(self) -> tuple[tuple[int, int], ...]:
        out = []
        for f in self.files:
            try:
                st = f.stat()
                out.append((st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((0, 0))
        return tuple(out)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        seen = self._stamp()
        while not self._stop.wait(self.interval):
            now = self._stamp()
            if now != seen:
                seen = now
                try:
                    self.on_change()
                except Exception:
                    log.exception("reloading after a database change failed")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
