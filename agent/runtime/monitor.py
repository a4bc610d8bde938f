"""Follows the engine's event stream; survives dockerd restarts and socket errors.

After every (re)connect it replays events since the last one seen and asks for a rescan, so a container
started while the stream was down is still caught.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from agent.adapters.engine import Engine, EventStream
from agent.core.facts import ContainerEvent, PluginEvent
from agent.logs import Quiet

log = logging.getLogger(__name__)


def _since(time_nano: int) -> str:
    return f"{time_nano // 1_000_000_000}.{time_nano % 1_000_000_000:09d}"


class Monitor:
    def __init__(
        self,
        engine: Engine,
        on_event: Callable[[ContainerEvent], None],
        on_connected: Callable[[bool], None],
        *,
        on_plugin: Callable[[PluginEvent], None] | None = None,
        min_backoff: float = 0.2,
        max_backoff: float = 5.0,
    ) -> None:
        self.engine = engine
        self.on_event = on_event
        #: called after each successful (re)connect; the argument is True for a reconnect
        self.on_connected = on_connected
        self.on_plugin = on_plugin
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._stream: EventStream | None = None
        self._lock = threading.Lock()
        #: an engine that stays down is logged once, then every few minutes with a count
        self._quiet = Quiet(log)
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self.reconnects = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.close()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        since: str | None = None
        last: tuple[str, int] | None = None
        backoff = self.min_backoff
        first = True
        while not self._stop.is_set():
            opened_at = time.time_ns()
            try:
                stream = self.engine.open_events(since)
            except Exception as exc:
                self._quiet.log(
                    logging.WARNING,
                    "open",
                    "cannot follow engine events (%s); retrying in %.1fs",
                    exc,
                    backoff,
                )
                self.connected.clear()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            self._quiet.ok("following engine events again")
            with self._lock:
                self._stream = stream
            if self._stop.is_set():
                stream.close()
                break
            if since is None:
                since = _since(opened_at)
            self.connected.set()
            backoff = self.min_backoff
            log.info("following engine events%s", "" if first else f" again (replaying since {since})")
            try:
                self.on_connected(not first)
            except Exception:
                log.exception("rescan request failed")
            first = False
            try:
                for event in stream:
                    if isinstance(event, PluginEvent):
                        if self.on_plugin is not None:
                            self.on_plugin(event)
                        continue
                    key = (event.container_id, event.time_nano)
                    if key == last:
                        continue  # the replay repeats the event at the 'since' boundary
                    last = key
                    if event.time_nano:
                        since = _since(event.time_nano)
                    self.on_event(event)
            except Exception as exc:
                if not self._stop.is_set():
                    log.warning("engine event stream broke: %s", exc)
            finally:
                stream.close()
                with self._lock:
                    self._stream = None
            if not self._stop.is_set():
                self.connected.clear()
                self.reconnects += 1
                log.warning("engine event stream ended; reconnecting")
                self._stop.wait(self.min_backoff)
