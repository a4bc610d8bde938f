"""``imageguard console serve``: the composition root of the fleet console service.

Parts, each behind its own small adapter:

* :class:`~agent.console.fleetdb.FleetStore` - SQLite (default) or PostgreSQL, migrated by Alembic at start;
* :class:`~agent.console.ingest.Ingestor` - shared-subscription ingest, acknowledged after commit;
* :class:`~agent.console.requester.Requester` - request/response to devices (rollout waves, dry runs, the
  device page's live data);
* :class:`~agent.console.orchestrator.Orchestrator` - rollouts, leased per replica;
* :func:`~agent.console.web.create_app` - the dashboard and JSON API, served by waitress.

Several replicas may run against one PostgreSQL database and one broker: give each its own
``[console] replica`` name and the same ``share_group``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.config import Config, is_loopback
from agent.console.client import Console, ConsoleClient
from agent.console.fleetdb import FleetStore, Stored, default_url
from agent.console.ingest import Ingestor
from agent.console.orchestrator import Orchestrator
from agent.console.requester import Requester
from agent.console.web import WebContext, create_app
from agent.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Listen:
    host: str
    port: int


def parse_listen(text: str, allow_remote: bool) -> Listen:
    """``host:port``; anything but loopback needs ``allow_remote`` (fail closed: nothing exposed by accident)."""
    host, _, port_text = text.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError(f"console listen address {text!r}: expected host:port") from None
    if not allow_remote and not is_loopback(host):
        raise ConfigError(
            f"console listen address {text!r} is not loopback; set [console] allow_remote = true "
            "(and put a TLS-terminating proxy in front, see the README) to serve beyond this host"
        )
    return Listen(host, port)


def _replica(config: Config) -> str:
    name = config.console.replica or socket.gethostname() or "console"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:64]


class FleetService:
    """The running service: :meth:`start`, then :meth:`serve_forever` (or :meth:`stop`)."""

    def __init__(self, config: Config, *, database: str | None = None, listen: str | None = None) -> None:
        if config.mqtt is None:
            raise ConfigError(f"configuration {config.source}: the console service needs an [mqtt] section")
        cc = config.console
        if not cc.users and not cc.tokens:
            raise ConfigError(
                f"configuration {config.source}: the console service needs at least one [[console.users]] "
                "entry (make its password_hash with 'imageguard console hash-password') or one "
                "[[console.tokens]] entry ('imageguard console new-token'); it never runs without sign-in"
            )
        self.config = config
        self.listen = parse_listen(listen or cc.listen, cc.allow_remote)
        self.replica = _replica(config)
        url = database or cc.database or os.environ.get("IMAGEGUARD_CONSOLE_DATABASE")
        if url is None:
            config.state_dir.mkdir(parents=True, exist_ok=True)
            url = default_url(config.state_dir)
        self.store = FleetStore(url)
        base_id = config.device.id
        self.requester = Requester(config.mqtt, f"{base_id}-{self.replica}")
        self._publisher = ConsoleClient(config.mqtt, f"{base_id}-{self.replica}-pub")
        self._console = Console(config, self._publisher)
        self.orchestrator = Orchestrator(
            self.store,
            self.requester,
            owner=self.replica,
            publish_layer=self._publish_layer,
            request_timeout=cc.request_timeout_seconds,
            default_wave_timeout=cc.wave_timeout_seconds,
        )
        self.ctx = WebContext(
            config=cc,
            store=self.store,
            orchestrator=self.orchestrator,
            requester=self.requester,
            health=self.health,
        )
        self.ingest = Ingestor(
            config.mqtt,
            self.store,
            client_id=f"{base_id}-{self.replica}-ingest",
            share_group=cc.share_group,
            replica=self.replica,
            on_stored=self._stored,
        )
        self._server: Any = None
        self._stopped = threading.Event()
        self.started_at = time.time()

    def _publish_layer(self, group: str, document: Mapping[str, Any]) -> None:
        self._console.publish_layer(group, document)

    def _alerts_arrived(self) -> None:
        with self.ctx.alerts_changed:
            self.ctx.alerts_changed.notify_all()

    def _stored(self, batch: list[Stored]) -> None:
        if any(m.kind == "alerts" for m in batch):
            self._alerts_arrived()
        if any(m.kind in ("policy", "BIRTH", "DC", "LWT") for m in batch):
            self.orchestrator.wake()

    def health(self) -> dict[str, Any]:
        return {
            "ok": self.ingest.connected,
            "replica": self.replica,
            "database": self.store.dialect,
            "mqtt_connected": self.ingest.connected,
            "ingest": self.ingest.stats.to_dict(),
            "uptime_seconds": round(time.time() - self.started_at, 1),
        }

    def start(self) -> None:
        from waitress.server import create_server

        revision = self.store.migrate()
        log.info("console database %s at revision %s", self.store.dialect, revision)
        app = create_app(self.ctx)
        # bind first: a port in use is a start-up error, before anything talks to the broker
        self._server = create_server(
            app, host=self.listen.host, port=self.listen.port, threads=16, ident="imageguard-console"
        )
        self._publisher.connect()
        self.requester.start()
        self.ingest.start()
        self.orchestrator.start()
        if self.store.dialect == "postgresql":  # alerts stored by the other replicas wake our long polls too
            threading.Thread(
                target=self.store.listen_alerts,
                args=(self._alerts_arrived, self._stopped),
                name="console-alert-listener",
                daemon=True,
            ).start()
        log.info("console serving http://%s:%d/ (replica %s)", self.listen.host, self.port, self.replica)

    @property
    def port(self) -> int:
        return int(self._server.effective_port) if self._server is not None else self.listen.port

    def serve_forever(self) -> None:
        def leave(*_: object) -> None:
            raise SystemExit(0)  # out of waitress's loop; the finally below stops the rest in order

        signal.signal(signal.SIGTERM, leave)
        signal.signal(signal.SIGINT, leave)
        try:
            self._server.run()
        finally:
            self.stop()

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._server is not None:
            self._server.close()
        self.orchestrator.stop()
        self.ingest.stop()
        self.requester.stop()
        self._publisher.close()
        self.store.close()
