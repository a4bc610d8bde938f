"""Composition root: wires adapters and core together and owns start-up and shutdown.

No other module knows every other one.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import signal
import threading
import time
import urllib.parse
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from agent import __version__, logs
from agent import config as config_mod
from agent.adapters.cgroups import CgroupError, CgroupWatch
from agent.adapters.engine import Engine
from agent.adapters.store import Store
from agent.adapters.systemd import Notifier, inherited_unix_socket
from agent.adapters.wakeup import DatabaseWatch, Listener, notify_agent
from agent.config import Config, MqttConfig, is_loopback
from agent.control.service import Service
from agent.core.decision import VerificationOutcome, VerifyTarget, rescan_reason
from agent.core.facts import ContainerEvent
from agent.core.records import plugin_slot_alert
from agent.errors import ConfigError, EngineError, ImageGuardError, StateError
from agent.runtime.enforcer import Enforcer, Handled, Verifier
from agent.runtime.instances import InstanceManager
from agent.runtime.monitor import Monitor
from agent.runtime.recorder import Recorder
from agent.runtime.statewatch import StateWatch

if TYPE_CHECKING:
    from agent.adapters.httpd import LocalHttpServer
    from agent.control.cloud import CloudConnection
    from agent.runtime.authz import AuthzServer

log = logging.getLogger(__name__)
LOCK_NAME = "agent.lock"


#: telemetry messages in flight at once (QoS 1, at least once)
TELEMETRY_WINDOW = 64


class AgentLock:
    """One agent per state directory; the lock file also tells ``status`` who holds it."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None
        self._started = time.time()
        self._disabled: dict[str, str] = {}

    def acquire(self, store: Store | None = None) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateError(
                f"another ImageGuard agent is already running on {self.path.parent} ({read_lock(self.path)})"
            ) from None
        self._fd = fd
        self.describe(store)

    def describe(self, store: Store | None = None, *, disabled: dict[str, str] | None = None) -> None:
        """Write who holds the lock, which database file it has open (the CLI checks it edits that one),
        and which optional parts are disabled (``status`` shows them)."""
        if self._fd is None:
            return
        if disabled is not None:
            self._disabled = dict(disabled)
        info: dict[str, Any] = {"pid": os.getpid(), "started": self._started, "version": __version__}
        if store is not None:
            info.update(db_id=store.db_id, inode=store.inode)
        if self._disabled:
            info["disabled"] = self._disabled
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps(info).encode(), 0)
        except OSError as exc:  # a full disk: the lock holds all the same
            log.warning("cannot write %s: %s", self.path, exc.strerror)

    def reacquire(self, store: Store) -> None:
        """After the state directory was deleted under us: a new lock file at the same path."""
        self.release()
        self.acquire(store)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_lock(path: Path) -> dict[str, Any] | None:
    """The running agent's pid and start time, or None if no agent holds the lock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                info: dict[str, Any] = json.loads(os.read(fd, 4096) or b"{}")
                return info
            except ValueError:
                return {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class Scanner:
    """Runs requested rescans on its own thread; requests made during a scan coalesce into one more."""

    def __init__(self, enforcer: Enforcer, reconcile_seconds: float = 30.0) -> None:
        self.enforcer = enforcer
        self.reconcile_seconds = reconcile_seconds
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._reasons: list[str] = []
        self._lock = threading.Lock()
        self.idle = threading.Event()
        self.idle.set()
        self.scans = 0
        self._thread = threading.Thread(target=self._run, name="scanner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _reconcile(self) -> None:
        try:
            missed = self.enforcer.reconcile()
        except Exception as exc:
            log.warning("periodic check of the containers failed: %s", exc)
            return
        if missed:
            log.warning("periodic check: %d containers had no decision in force; deciding them now", missed)

    def request(self, reason: str) -> None:
        with self._lock:
            self._reasons.append(reason)
            self.idle.clear()
        self._wanted.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._wanted.wait(self.reconcile_seconds):
                self._reconcile()  # nothing asked for a scan meanwhile: the cheap periodic check
                continue
            if self._stop.is_set():
                return
            self._wanted.clear()
            with self._lock:
                reasons, self._reasons = self._reasons, []
            log.info("scanning every container (%s)", ", ".join(dict.fromkeys(reasons)))
            try:
                results = self.enforcer.scan(trigger="scan")
                blocked = sum(1 for r in results if r.decision.verdict != "allowed")
                log.info("scan done: %d containers, %d not allowed", len(results), blocked)
            except Exception as exc:
                log.error("scan failed: %s (will scan again after the engine is back)", exc)
            self.scans += 1
            with self._lock:
                if not self._reasons:
                    self.idle.set()

    def stop(self) -> None:
        self._stop.set()
        self._wanted.set()
        self._thread.join(timeout=10)


class LazyVerifier:
    """Builds the real verifier on first use.

    A policy without trust anchors never needs it, and importing it (cryptography, the registry client) costs
    about 10 MB of RSS and 60 ms of start-up (bench/footprint.py).
    """

    def __init__(self, config: Config) -> None:
        self._config = config
        self._real: Verifier | None = None
        self._lock = threading.Lock()

    def configure(self, config: Config) -> None:
        """A reloaded configuration (registries): the next verification builds a verifier with it."""
        with self._lock:
            self._config = config
            old, self._real = self._real, None
        if (close := getattr(old, "close", None)) is not None:
            close()

    def verify(self, targets: tuple[VerifyTarget, ...], timeout: float) -> VerificationOutcome:
        with self._lock:
            if self._real is None:
                from agent.runtime.verification import build_verifier

                self._real = build_verifier(self._config)
        return self._real.verify(targets, timeout)

    def close(self) -> None:
        with self._lock:
            close = getattr(self._real, "close", None)
        if close is not None:
            close()


class Agent:
    def __init__(self, config: Config, *, verifier: Verifier | None = None) -> None:
        self.config = config
        self._verifier = verifier
        self._stopping = threading.Event()
        self._reload_lock = threading.Lock()
        self.lock = AgentLock(config.state_dir)
        # short lock waits (a CLI edit holds the lock for milliseconds), and read-only on a full disk: the
        # agent enforces from its last good state; its writes go through the recorder, which never blocks
        self.store = Store(
            config.state_dir,
            outbox_limit=config.mqtt.outbox_limit if config.mqtt else 10_000,
            busy_timeout=2.0,
            read_only_fallback=True,
        )
        self.recorder = Recorder(self.store)
        self.statewatch = StateWatch(self.store, on_restored=self._state_restored, count=self.recorder.count)
        self.service = Service(config, self.store, telemetry=config.mqtt is not None, on_change=self.reload)
        self.engine = Engine(config.engine.url, config.engine.timeout_seconds)
        self.enforcer: Enforcer | None = None
        self.monitor: Monitor | None = None
        self.cgroup_watch: CgroupWatch | None = None
        self.scanner: Scanner | None = None
        self.listener: Listener | DatabaseWatch | None = None
        self.authz: AuthzServer | None = None
        self.instances: InstanceManager | None = None
        self.cloud: CloudConnection | None = None
        #: optional parts that could not start, and why (shown by ``status``)
        self.disabled: dict[str, str] = {}
        self.systemd = Notifier()
        self.metrics_server: LocalHttpServer | None = None
        self._reload_wanted = threading.Event()

    def _make_cloud(self) -> CloudConnection:
        # paho and the control plane load only with [mqtt]
        from agent.adapters.mqtt.codec import PayloadCodec
        from agent.adapters.mqtt.connection import MqttConnection, device_subscriptions
        from agent.adapters.mqtt.requests import Dispatcher
        from agent.adapters.mqtt.topics import Topics
        from agent.control.cloud import CloudConnection
        from agent.control.resources import ControlContext, routes
        from agent.runtime.outbox import OutboxDrainer

        mqtt = self.config.mqtt
        assert mqtt is not None
        check_transport(mqtt)
        codec = PayloadCodec.from_config(mqtt)
        topics = Topics(mqtt.account, self.config.device.id, control_prefix=mqtt.control_prefix)
        ctx = ControlContext(self.config, self.service, self.engine, running=self)
        cloud = CloudConnection(self.config, self.service, ctx, codec, topics)
        dispatcher = Dispatcher(topics, routes(ctx), cloud.reply, codec=codec)
        connection = MqttConnection(
            mqtt,
            topics,
            subscriptions=device_subscriptions(
                topics, self.config.device.groups, dispatcher.handle, cloud.on_fleet_policy
            ),
            birth=cloud.birth,
            disconnect=cloud.disconnect,
            codec=codec,
            max_in_flight=max(100, TELEMETRY_WINDOW + 8),
        )
        drainer = OutboxDrainer(
            self.service.store,
            topics,
            codec,
            connection,
            device=self.config.device.id,
            policy_version=lambda: self.service.effective().version,
            window=TELEMETRY_WINDOW,
        )
        cloud.attach(connection, dispatcher, drainer)
        return cloud

    def start(self) -> None:
        self.lock.acquire(self.store)
        if self.store.problem is not None:
            log.error("%s", self.store.problem)
        if self.config.mqtt is not None:
            # an optional part: bad TLS files, credentials or a policy-signing key disable the cloud
            # connection (loudly), never enforcement
            try:
                self.cloud = self._make_cloud()
            except Exception as exc:
                self.disable("mqtt", exc)
        policy = self.service.effective()
        self.enforcer = Enforcer(
            self.engine,
            self.store,
            policy,
            self.config.enforcement,
            device=self.config.device.id,
            verifier=self._verifier,
            telemetry=self.config.mqtt is not None,
            recorder=self.recorder,
        )
        self.statewatch.start()
        if self.config.preventive.enabled:
            # served whatever the mode (dockerd refuses every request while its plugin is unreachable);
            # it judges starts only while the live policy says enforce
            from agent.runtime.authz import AuthzServer, Gate  # http.server & co load only in preventive mode

            gate = Gate(self.enforcer, self.config.preventive)
            self.authz = AuthzServer(self.config.preventive.socket, gate, on_thread_end=gate.thread_done)
            try:
                self.authz.start(inherited_unix_socket(str(self.config.preventive.socket)))
            except Exception:
                self.enforcer.close()
                self.statewatch.stop()
                self.lock.release()
                raise
        if self.config.enforcement.freeze_on_create:
            self._start_cgroup_watch(self.enforcer)
        self.scanner = Scanner(self.enforcer, self.config.enforcement.reconcile_seconds)
        self.scanner.start()
        self.instances = InstanceManager(self.config, self.service, self.engine, on_pins_changed=self.reload)
        self.instances.start()
        listener: Listener | DatabaseWatch
        try:
            listener = Listener(self.config.state_dir, self._on_notify)
        except OSError as exc:
            # enforcement does not depend on it: watch the database instead
            log.error(
                "cannot serve the wake-up socket in %s (%s): CLI changes are picked up by watching the "
                "database, within about a second",
                self.config.state_dir,
                exc.strerror or exc,
            )
            listener = DatabaseWatch(
                [self.store.path, self.store.path.with_name(self.store.path.name + "-wal")], self.reload
            )
        self.listener = listener
        listener.start()
        self.monitor = Monitor(
            self.engine, self._on_event, self._on_connected, on_plugin=lambda _e: self._check_plugin_slot()
        )
        self.monitor.start()
        if self.cloud is not None:  # after the enforcer: requests and fleet layers may act at once
            self.cloud.start()
        if self.config.metrics.enabled:
            try:
                self._start_metrics()
            except Exception as exc:  # an optional part: never stops enforcement
                self.disable("metrics", exc)
        if self.service.first_run and not self.config.enforcement.mode_configured:
            log.warning(
                "no policy has been set on this device yet: running in AUDIT mode, nothing is stopped; allow "
                "what should run (imageguard allowlist add --from-running, --from-decisions or --image REF), "
                "then enforce with "
                "'imageguard enforcement --mode enforce'"
            )
        e = policy.enforcement
        log.info(
            "ImageGuard %s started: device %s, policy version %d, %d allowlisted digests, %d trust anchors, %s",
            __version__,
            self.config.device.id,
            policy.version,
            len(policy.allowlist),
            len(policy.trust_anchors),
            f"mode {e.mode}" if e.enabled else "enforcement off",
        )
        if e.enabled and not policy.allowlist and not policy.trust_anchors:
            log.warning(
                "the allowlist is empty and no trust anchor is configured: every container will be blocked"
            )

    def _start_cgroup_watch(self, enforcer: Enforcer) -> None:
        """Gate every start at its cgroup's creation; then settle the starts an earlier agent left frozen
        there (before the monitor and the first scan, which would wait on those containers' locks)."""
        watch = CgroupWatch(enforcer.gate)
        try:
            watch.start()
        except CgroupError as exc:  # an optional part: starts are still frozen at their start event
            self.disable("freeze on create", exc)
            return
        self.cgroup_watch = watch
        enforcer.held_cgroups = watch.existing
        enforcer.cgroups = watch.find  # a container under its own --cgroup-parent is found too
        try:
            if found := enforcer.recover_gated(watch.existing()):
                log.warning("%d container starts were left frozen by an earlier agent; deciding them", found)
        except Exception as exc:  # the periodic check tries again
            log.warning("could not look for starts left frozen: %s", exc)

    def _start_metrics(self) -> None:
        # prometheus-client loads only when the endpoint is on (bench/footprint.py measures both)
        from agent.adapters.httpd import LocalHttpServer
        from agent.runtime.metrics import AgentMetrics, Sources

        assert self.enforcer is not None and self.monitor is not None
        monitor, cloud = self.monitor, self.cloud
        metrics = AgentMetrics(
            Sources(
                store=self.store,
                enforcer=self.enforcer,
                recorder=self.recorder,
                engine_connected=monitor.connected.is_set,
                mqtt_connected=(lambda: cloud.connection.is_connected)
                if cloud is not None
                else (lambda: None),
            )
        )
        self.metrics_server = LocalHttpServer(
            self.config.metrics.listen, {"/metrics": metrics.render, "/healthz": metrics.health}
        )
        self.metrics_server.start()
        log.info("metrics on http://%s/metrics, health on /healthz", self.metrics_server.address)

    def disable(self, part: str, exc: BaseException) -> None:
        """An optional part cannot start: say so loudly, record it for ``status``, keep enforcing."""
        detail = str(exc) if isinstance(exc, ImageGuardError) else f"{type(exc).__name__}: {exc}"
        self.disabled[part] = detail
        log.error(
            "%s is DISABLED: %s; the agent enforces without it until this is fixed and it is restarted",
            part.upper(),
            detail,
        )
        self.lock.describe(self.store, disabled=self.disabled)

    def _state_restored(self) -> None:
        """The state directory's files were put back: so are the lock and the wake-up socket in it."""
        self.lock.reacquire(self.store)
        if isinstance(self.listener, Listener):
            self.listener.close()
            try:
                self.listener = Listener(self.config.state_dir, self._on_notify)
                self.listener.start()
            except OSError as exc:
                log.error("cannot serve the wake-up socket again (%s); watching the database", exc)
                self.listener = DatabaseWatch(
                    [self.store.path, self.store.path.with_name(self.store.path.name + "-wal")], self.reload
                )
                self.listener.start()
        self.reload()

    def _on_event(self, event: ContainerEvent) -> None:
        assert self.enforcer is not None
        if event.action == "create":
            self.enforcer.created(event.container_id)
            return
        if event.action == "start":
            self.enforcer.submit(event.container_id, "start", event)
            return
        if event.action == "destroy":
            self.enforcer.destroyed(event.container_id)
        if self.instances is not None and event.instance:  # a managed instance's container ended: recreate it
            self.instances.container_gone(event.instance, event.container_id, event.action)

    def _on_connected(self, reconnect: bool) -> None:
        assert self.scanner is not None
        self.scanner.request("engine events resumed" if reconnect else "agent start")
        self._check_plugin_slot()

    def _check_plugin_slot(self) -> None:
        """In preventive mode: say loudly (log and alert) when another plugin could answer for ImageGuard."""
        if not self.config.preventive.enabled:
            return
        from agent.runtime.authz import plugin_slot_findings

        try:
            findings = plugin_slot_findings(self.engine, self.config.preventive.socket)
        except EngineError as exc:
            log.warning("cannot check who else answers dockerd's authorization questions: %s", exc)
            return
        for finding in findings:
            log.error("authorization plugin slot: %s", finding)
        if findings and self.service.telemetry:
            self.service.queue_telemetry([plugin_slot_alert(self.config.device.id, findings)])

    def _on_notify(self, message: bytes) -> None:
        if self.instances is not None and self.instances.on_message(message):
            return
        self.reload()

    def reload(self) -> None:
        """Re-read the policy store (after a CLI or control-plane change) and rescan if needed."""
        if self.cloud is not None:  # another process may have queued telemetry
            self.cloud.drainer.wake()
        if self.enforcer is None:
            return
        with self._reload_lock:
            old = self.enforcer.policy
            try:
                new = self.service.effective()
            except Exception:
                log.exception("cannot read the policy store; keeping the current policy")
                return
            self.enforcer.set_policy(new)
        if new.versions != old.versions:
            log.info("policy reloaded: versions %s", dict(new.versions))
            self.statewatch.want_backup()
            if self.cloud is not None:  # the birth names the policy versions: a console sees the change
                self.cloud.connection.publish_birth()
        if (reason := rescan_reason(old, new)) is not None and self.scanner is not None:
            self.scanner.request(reason)
        if self.instances is not None:
            self.instances.wake()  # declared instances may have changed: reconcile

    def stop(self) -> None:
        self._stopping.set()
        if self.cloud is not None:  # first: waits for in-flight telemetry acks, then MQTT/DC
            self.cloud.stop()
        if self.metrics_server is not None:
            self.metrics_server.close()
        for part in (self.instances, self.monitor, self.scanner, self.cgroup_watch):
            if part is not None:
                part.stop()
        if self.listener is not None:
            self.listener.close()
        if self.enforcer is not None:
            self.enforcer.close()
        self.recorder.close()
        self.statewatch.stop()
        if (close_verifier := getattr(self._verifier, "close", None)) is not None:
            close_verifier()
        if self.authz is not None:  # last: the parts above still talk to dockerd, which asks the plugin
            self.authz.close()
        self.store.close()
        self.lock.release()
        log.info("ImageGuard stopped")

    def run_forever(self) -> None:
        """Run until SIGTERM or SIGINT; SIGHUP reloads the configuration. Under systemd (``Type=notify``)
        it reports readiness once it enforces, and pings the watchdog while its lanes answer."""

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            self._stopping.set()

        def on_hup(_signum: int, _frame: FrameType | None) -> None:
            self._reload_wanted.set()
            self._stopping.set()  # wakes the main loop, which tells a reload from a stop

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, on_hup)
        self.start()
        self.systemd.ready(self._status_line())
        if self.enforcer is not None:
            self.systemd.start_watchdog(self.enforcer.responsive)
        try:
            while True:
                self._stopping.wait()
                if not self._reload_wanted.is_set():
                    break
                self._reload_wanted.clear()
                self._stopping.clear()
                self.reload_config()
        finally:
            self.systemd.stopping()
            self.systemd.stop()
            self.stop()

    def _status_line(self) -> str:
        policy = self.enforcer.policy if self.enforcer is not None else self.service.effective()
        e = policy.enforcement
        mode = f"mode {e.mode}" if e.enabled else "enforcement off"
        return f"{mode}, policy version {policy.version}, {len(policy.allowlist)} allowlisted digests" + (
            f"; DISABLED: {', '.join(self.disabled)}" if self.disabled else ""
        )

    def reload_config(self) -> None:
        """SIGHUP: read the configuration again. Logging, the enforcement settings and the registries
        change at once; what needs a restart (engine, state, MQTT, preventive mode) is named in the log.
        A configuration that does not load changes nothing."""
        self.systemd.reloading()
        path = None if self.config.source == "<embedded default>" else Path(self.config.source)
        try:
            new = config_mod.load(path)
        except ImageGuardError as exc:
            log.error("configuration not reloaded, the running one stays: %s", exc)
            self.systemd.ready(self._status_line())
            return
        old = self.config
        needs_restart = [
            name
            for name, a, b in (
                ("engine", old.engine, new.engine),
                ("state", old.state_dir, new.state_dir),
                ("mqtt", old.mqtt, new.mqtt),
                ("preventive", old.preventive, new.preventive),
                ("device", old.device, new.device),
            )
            if a != b
        ]
        logs.setup(new.logging.level, new.logging.format)
        self.config = dataclasses.replace(
            new,
            engine=old.engine,
            state_dir=old.state_dir,
            mqtt=old.mqtt,
            preventive=old.preventive,
            device=old.device,
        )
        self.service.config = self.config
        if self.enforcer is not None:
            self.enforcer.settings = self.config.enforcement
        if isinstance(self._verifier, LazyVerifier):
            self._verifier.configure(self.config)
        log.info(
            "configuration reloaded from %s%s",
            self.config.source,
            f"; restart to apply the changes to: {', '.join(needs_restart)}" if needs_restart else "",
        )
        self.reload()
        self.systemd.ready(self._status_line())


# -- parts for one-shot commands (the CLI): built here too, so that nothing else wires the agent --------


def check_transport(mqtt: MqttConfig) -> None:
    """Plaintext MQTT only to this host, unless the configuration says ``allow_plaintext = true``."""
    parsed = urllib.parse.urlsplit(mqtt.url)
    if parsed.scheme != "mqtt" or mqtt.allow_plaintext:
        return
    if not is_loopback(parsed.hostname or ""):
        raise ConfigError(
            f"[mqtt] url {mqtt.url}: plaintext MQTT to a broker on another host would carry the credentials "
            "and every policy change readable and forgeable on the network; use mqtts://, or set "
            "allow_plaintext = true if the network itself is protected"
        )


def policy_service(config: Config, *, reading: bool = False) -> Service:
    """The policy service a CLI command edits through; it wakes the running agent after a change.

    ``reading``: the command only reads, and creates no state directory or database when there is none.
    """
    store = Store(
        config.state_dir,
        outbox_limit=config.mqtt.outbox_limit if config.mqtt else 10_000,
        read_only_fallback=True,  # a full disk: reading commands work, edits say why they cannot
        create=not reading,
    )
    held = read_lock(config.state_dir / LOCK_NAME)
    if held and "db_id" in held and (held.get("db_id"), held.get("inode")) != (store.db_id, store.inode):
        store.close()
        raise StateError(
            f"the running agent (pid {held.get('pid')}) has another state database open than {store.path}: "
            "this one was deleted or replaced under it. The agent puts its own back within seconds; run the "
            "command again then (a change made here would not reach the agent)"
        )
    return Service(
        config, store, telemetry=config.mqtt is not None, on_change=lambda: notify_agent(config.state_dir)
    )


def scan_once(config: Config, *, dry_run: bool) -> list[Handled]:
    """Decide on every container now, with an enforcer of its own (``imageguard scan``)."""
    from agent.runtime.verification import build_verifier

    service = policy_service(config)
    enforcer = Enforcer(
        Engine(config.engine.url, config.engine.timeout_seconds),
        service.store,
        service.effective(),
        config.enforcement,
        device=config.device.id,
        verifier=build_verifier(config),
        telemetry=config.mqtt is not None,
    )
    try:
        return enforcer.scan(dry_run=dry_run)
    finally:
        enforcer.close()
        service.store.close()


def preview_policy(config: Config, doc: Any, layer_name: str = "device") -> dict[str, Any]:
    """What importing ``doc`` as ``layer_name`` would do (``policy diff`` / ``policy import --dry-run``):
    the changes, the version verdict, the verified digests revoked, and the containers that would be
    removed. Changes nothing."""
    from agent.core.decision import Evidence, decide
    from agent.core.policy import PolicyLayer, layer_diff
    from agent.errors import ImageGuardError

    service = policy_service(config, reading=True)
    try:
        new = PolicyLayer.from_document(doc, layer_name, what="policy document")
        current = service.layer(layer_name)
        try:
            verdict = "applies" if current.check_successor(new) else "unchanged"
        except ImageGuardError as exc:
            verdict = f"refused: {exc}"
        after = service.effective(replacing=new)
        fingerprints = {a.name: a.fingerprint for a in after.trust_anchors}
        verified = service.store.verified()
        kept = {
            d: tuple(v for v in vs if fingerprints.get(v.anchor) == v.anchor_fingerprint)
            for d, vs in verified.items()
        }
        revoked = sum(len(vs) for vs in verified.values()) - sum(len(vs) for vs in kept.values())
        affected: list[dict[str, Any]] = []
        containers: list[dict[str, Any]] | None = affected
        note = ""
        try:
            engine = Engine(config.engine.url, min(config.engine.timeout_seconds, 10))
            for cid in engine.container_ids():
                try:
                    facts = engine.container_facts(cid)
                except ImageGuardError:
                    continue
                d = decide(facts, after, Evidence({k: v for k, v in kept.items() if v}, {}))
                if d.verdict != "allowed":
                    outcome = "would need a signature check" if d.pending else "would be removed"
                    affected.append(
                        {
                            "id": facts.id,
                            "name": facts.name,
                            "image": facts.image,
                            "outcome": outcome,
                            "reason": d.reason.value,
                            "detail": d.detail,
                        }
                    )
            engine.close()
        except ImageGuardError as exc:
            containers, note = None, f"containers not checked: {exc}"
        return {
            "layer": layer_name,
            "version": {"held": current.version, "new": new.version, "verdict": verdict},
            "changes": layer_diff(current, new),
            "verified_revoked": revoked,
            "containers": containers,
            "note": note,
        }
    finally:
        service.store.close()
