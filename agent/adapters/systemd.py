"""systemd's notification protocol (sd_notify(3)): readiness, status, watchdog, stopping.

The protocol is one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named by ``$NOTIFY_SOCKET``; the
standard library's socket module speaks it in a few lines (docs/adr/0007-sd-notify.md says why this is not
a dependency). Without ``$NOTIFY_SOCKET`` (not started by systemd, ``Type=simple``) every call is a no-op.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        # an abstract socket is named with a leading "@" (a NUL byte on the wire)
        self._address = "\0" + path[1:] if path.startswith("@") else path
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watchdog_for_us = not pid or pid == str(os.getpid())
        #: how often systemd wants a WATCHDOG=1 (None: no watchdog)
        self.watchdog_seconds: float | None = (
            int(usec) / 1_000_000 if usec.isdigit() and int(usec) > 0 and watchdog_for_us else None
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` lines; False if there is no socket or it did not take them."""
        if not self._address:
            return False
        with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)) as sock:
            try:
                sock.sendto("\n".join(lines).encode(), self._address)
            except OSError as exc:
                log.debug("sd_notify %s failed: %s", lines, exc)
                return False
        return True

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def reloading(self) -> None:
        self.notify("RELOADING=1", "STATUS=reloading the configuration")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping")

    def start_watchdog(self, healthy: Callable[[float], bool]) -> None:
        """Ping the watchdog at half its interval while ``healthy(timeout)`` says the agent works; a stuck
        agent stops pinging and systemd restarts it."""
        if self.watchdog_seconds is None or not self._address:
            return
        interval = self.watchdog_seconds / 2

        def run() -> None:
            while not self._stop.wait(interval):
                if healthy(interval / 2):
                    self.notify("WATCHDOG=1")
                else:
                    log.error("watchdog: the enforcement lanes did not answer within %.1fs", interval / 2)

        self._thread = threading.Thread(target=run, name="watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)


SD_LISTEN_FDS_START = 3


def listen_fds(environ: dict[str, str] | None = None) -> list[int]:
    """Sockets systemd passed to this process (socket activation, sd_listen_fds(3)); the variables are
    removed so that children do not take them for theirs."""
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    if pid != str(os.getpid()) or not count.isdigit():
        return []
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)))


def inherited_unix_socket(path: str, environ: dict[str, str] | None = None) -> socket.socket | None:
    """The listening AF_UNIX socket systemd passed for ``path``, if any."""
    for fd in listen_fds(environ):
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        if sock.family == socket.AF_UNIX and sock.getsockname() == path:
            return sock
        sock.detach()  # not ours to close
    return None
