"""Managed instances, the I/O side: reconcile the declared instances with the engine on one thread.

The CLI and the control plane only change the device layer (``put_instance`` / ``delete_instance``) and wake
the agent; the agent's :class:`InstanceManager` then pulls, verifies, pins and runs. A reconcile pass is
idempotent: it observes the engine, asks :func:`agent.core.instances.plan` for the next step, does it, and
observes again, so a pass after a crash or restart picks up wherever the last one stopped.

Order of a pin: resolve the tag at the registry, verify that digest (or compare it with the enforcement
digest), then pull ``repo@digest``. Nothing unverified is pulled, and what runs is by construction the
content that was verified.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from agent.adapters.dockerhost import DockerHost
from agent.adapters.engine import Engine, Gone
from agent.adapters.store import Store
from agent.config import Config, RegistryConfig
from agent.core.anchors import TrustAnchor
from agent.core.digest import Digest
from agent.core.instances import (
    LABEL_CONFIG,
    LABEL_INSTANCE,
    LABEL_MANAGED,
    RETRYABLE,
    InstanceFailure,
    InstanceSpec,
    InstanceState,
    Observed,
    ObservedContainer,
    Step,
    UpdateOutcome,
    UpdateResult,
    current_pin_key,
    docker_create_args,
    next_check,
    plan,
    update_due,
)
from agent.core.policy import DEVICE_LAYER, EffectivePolicy, PolicyLayer
from agent.core.records import InstanceAlert, InstanceEvent, OutboxMessage, utc_now
from agent.errors import (
    Code,
    EngineError,
    ImageGuardError,
    RegistryError,
    RegistryUnreachable,
)
from agent.logs import Quiet

log = logging.getLogger(__name__)


class PolicySource(Protocol):
    """What the reconciler needs of the policy service: read the declared instances, queue telemetry."""

    store: Store
    telemetry: bool

    def layer(self, name: str = ...) -> PolicyLayer: ...

    def effective(self) -> EffectivePolicy: ...

    def queue_telemetry(self, messages: Iterable[OutboxMessage]) -> None: ...


UPDATE_PREFIX = b"iu:"
RETRY_MIN_SECONDS = 2.0
RETRY_MAX_SECONDS = 60.0
#: a container that ends again within this long of the last time counts as a crash loop (backoff)
FLAP_WINDOW_SECONDS = 60.0
#: after a container's die, before its instance is looked at (a destroy usually follows at once)
DIE_SETTLE_SECONDS = 0.5
MAX_STEPS = 8  # per instance and pass: a plan converges in at most five


def update_message(name: str, ticket: str) -> bytes:
    """The wake-up datagram that asks the agent to update ``name`` (fits the 64-byte notify buffer)."""
    return UPDATE_PREFIX + f"{name}:{ticket}".encode()


def parse_update_message(data: bytes) -> tuple[str, str] | None:
    if not data.startswith(UPDATE_PREFIX):
        return None
    name, sep, ticket = data[len(UPDATE_PREFIX) :].decode("utf-8", "replace").partition(":")
    return (name, ticket) if sep and name and ticket else None


# ---- the manager -----------------------------------------------------------------------------------------


@dataclass
class Ticket:
    """An update request; ``result`` is the instance's ``last_update`` once the agent has handled it."""

    name: str
    id: str
    done: threading.Event
    result: UpdateOutcome | None = None

    def wait(self, timeout: float) -> UpdateOutcome | None:
        self.done.wait(timeout)
        return self.result


class InstanceManager:
    def __init__(
        self,
        config: Config,
        service: PolicySource,
        engine: Engine,
        *,
        on_pins_changed: Callable[[], object],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.service = service
        self.store = service.store
        self.engine = engine
        self.on_pins_changed = on_pins_changed
        self.clock = clock
        self._wake = threading.Event()
        self._wake.set()  # the first pass runs at start
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._tickets: dict[str, list[Ticket]] = {}
        self._retry_at: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        #: instance -> (times its containers ended within FLAP_WINDOW_SECONDS of each other, when last, which)
        self._flaps: dict[str, tuple[int, float, str]] = {}
        self._asked = True  # the first pass runs at start
        self._quiet = Quiet(log)
        #: managed containers were seen in the last pass (they are looked at until none is left)
        self._containers_seen = True
        self.passes = 0
        self._thread = threading.Thread(target=self._run, name="instances", daemon=True)

    # -- control -----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        with self._lock:
            for tickets in self._tickets.values():
                for t in tickets:
                    t.done.set()

    def wake(self) -> None:
        self._asked = True
        self._wake.set()

    def container_gone(self, name: str, container_id: str = "", action: str = "destroy") -> None:
        """A container of instance ``name`` died or was removed: recreate it now, or, when it keeps ending
        (a crash loop), after a backoff that doubles up to RETRY_MAX_SECONDS.

        A container's die and destroy count as one end. After a die the pass waits a moment, so that the
        destroy of a ``docker rm -f`` (which follows at once) finds the container gone rather than racing it.
        """
        now = self.clock()
        with self._lock:
            count, last, last_id = self._flaps.get(name, (-1, 0.0, ""))
            if container_id and container_id == last_id:
                pass  # the same container's second event: not another end
            else:
                count = count + 1 if now - last < FLAP_WINDOW_SECONDS else 0
            self._flaps[name] = (count, now, container_id)
        if count == 0:
            if action == "destroy":
                self.wake()
            else:
                self._retry_at[name] = now + DIE_SETTLE_SECONDS
                self._wake.set()
            return
        delay = min(RETRY_MAX_SECONDS, RETRY_MIN_SECONDS * 2 ** (count - 1))
        if container_id != last_id:
            log.warning(
                "instance %s: its container ended again (%d times); recreating in %.1fs",
                name,
                count + 1,
                delay,
            )
        self._retry_at[name] = max(self._retry_at.get(name, 0.0), now + delay)
        self._wake.set()  # only the schedule changed: the loop computes its next deadline again

    def request_update(self, name: str, ticket_id: str | None = None) -> Ticket:
        ticket = Ticket(name, ticket_id or uuid.uuid4().hex[:8], threading.Event())
        with self._lock:
            self._tickets.setdefault(name, []).append(ticket)
        self.wake()
        return ticket

    def on_message(self, data: bytes) -> bool:
        """Handle an update datagram from the CLI; False if ``data`` is not one."""
        parsed = parse_update_message(data)
        if parsed is None:
            return False
        self.request_update(*parsed)
        return True

    # -- the loop ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            timeout = self._next_deadline() - self.clock()
            # at least a second between deadline-driven passes: a deadline that stays in the past
            # (an engine that keeps failing) must not spin
            fired = self._wake.wait(timeout=max(1.0, min(timeout, 3600.0)))
            if self._stop.is_set():
                return
            self._wake.clear()
            if fired and not self._asked and self._next_deadline() > self.clock():
                continue  # a new deadline was set (container_gone): wait for it
            self._asked = False
            try:
                self.reconcile()
                self._quiet.ok("managed instances: reconciling works again")
            except Exception as exc:  # engine or store down: try again later
                self._quiet.log(
                    logging.ERROR,
                    type(exc).__name__,
                    "reconciling managed instances failed: %s (retrying)",
                    exc,
                )
                self._retry_at["*"] = self.clock() + RETRY_MIN_SECONDS * 5
            self.passes += 1

    def _next_deadline(self) -> float:
        times = list(self._retry_at.values())
        try:
            specs = self.service.layer(DEVICE_LAYER).instances
            if (t := next_check(specs, self.store.instance_states())) is not None:
                times.append(t)
        except Exception:
            log.debug("cannot read instances to schedule checks", exc_info=True)
        return min(times) if times else self.clock() + 3600.0

    def reconcile(self) -> None:
        """One pass over every declared, stored or running instance."""
        now = self.clock()
        # deadlines reached are handled by this pass (a failure sets a new one)
        self._retry_at = {k: t for k, t in self._retry_at.items() if t > now}
        specs = {s.name: s for s in self.service.layer(DEVICE_LAYER).instances}
        states = self.store.instance_states()
        with self._lock:
            asked = bool(self._tickets)
        if not specs and not states and not asked and not self._containers_seen:
            return  # nothing declared, stored or asked: the engine need not be asked either
        policy = self.service.effective()
        running = {
            c.labels.get(LABEL_INSTANCE, "") for c in self.engine.labelled_containers(f"{LABEL_MANAGED}=true")
        }
        self._containers_seen = bool(running - {""})
        with self._lock:
            tickets, self._tickets = self._tickets, {}
        for name in sorted(set(specs) | set(states) | (running - {""}) | set(tickets)):
            spec = specs.get(name)
            explicit = tickets.get(name, [])
            wanted = bool(explicit) or (spec is not None and update_due(spec, states.get(name), now))
            state = self._reconcile_one(name, spec, states.get(name), policy, wanted, explicit)
            answered = (
                state is not None
                and state.last_update is not None
                and state.last_update.id == explicit[-1].id
                if explicit
                else True
            )
            if explicit and state is not None and not answered:
                # nothing was resolved (disabled, or removed meanwhile): the asker still gets an answer
                why = Code.DISABLED if spec is not None and not spec.enabled else Code.NOT_FOUND
                outcome = UpdateOutcome(
                    explicit[-1].id, utc_now(), "failed", reason=why, detail=f"instance {name} is {why.value}"
                )
                state = self._set(name, spec, state, last_update=outcome)
            for t in explicit:
                t.result = (
                    state.last_update
                    if state is not None
                    else UpdateOutcome(t.id, utc_now(), "failed", reason=Code.NOT_FOUND)
                )
                t.done.set()

    def _reconcile_one(
        self,
        name: str,
        spec: InstanceSpec | None,
        state: InstanceState | None,
        policy: EffectivePolicy,
        update: bool,
        tickets: list[Ticket],
    ) -> InstanceState | None:
        ticket = tickets[-1].id if tickets else None
        if spec is not None and update and ticket is None:
            ticket = "periodic"
        key = current_pin_key(spec, policy.anchor) if spec is not None else ""
        if key is None and (spec is None or not spec.enabled):
            key = ""  # nothing to pin: a disabled instance's anchor need not exist
        step = Step.NOTHING
        for _ in range(MAX_STEPS):
            observed = self._observe(name, spec, state, key)
            if spec is not None and spec.enabled and key is None:
                try:
                    spec.trust_anchor(policy.anchor)
                except InstanceFailure as failure:
                    self._remove(observed, spec)
                    return self._failed(name, spec, state, failure, None, ticket)
            assert key is not None
            step = plan(spec, state, observed, key, update=update)
            if step in (Step.NOTHING, Step.WAIT):
                break
            try:
                state = self._do(step, name, spec, state, observed, key, policy, ticket if update else None)
            except (InstanceFailure, EngineError, Gone) as exc:
                failed = (
                    exc if isinstance(exc, InstanceFailure) else InstanceFailure(Code.ENGINE_ERROR, str(exc))
                )
                if state is None or state.pin_key != key:
                    # nothing pinned answers the spec: no container of an older declaration stays
                    self._remove_quietly(name, spec)
                return self._failed(name, spec, state, failed, key, ticket if update else None)
            update = False
            if state is None:
                return None
        else:
            log.error("instance %s did not settle in %d steps; will look again", name, MAX_STEPS)
            self._retry_at[name] = self.clock() + RETRY_MAX_SECONDS
        if spec is None:
            if state is not None:
                self._delete(name, state)
            return None
        if not spec.enabled:
            return self._set(name, spec, state, status="disabled", reason=None, detail="")
        if state is not None and state.status == "failed" and step is Step.WAIT:
            return state
        self._retry_at.pop(name, None)
        self._backoff.pop(name, None)
        return self._set(name, spec, state, status="running", reason=state.reason if state else None)

    # -- observing and acting ------------------------------------------------------------------------------

    def _observe(
        self, name: str, spec: InstanceSpec | None, state: InstanceState | None, key: str | None
    ) -> Observed:
        containers = tuple(
            ObservedContainer(id=c.id, running=c.running, config=c.labels.get(LABEL_CONFIG, ""))
            for c in self.engine.labelled_containers(f"{LABEL_INSTANCE}={name}")
            if c.labels.get(LABEL_MANAGED) == "true"
        )
        present = False
        if (
            spec is not None
            and state is not None
            and state.pinned_digest is not None
            and state.pin_key == key
        ):
            present = self.engine.image_present(f"{spec.repository}@{state.pinned_digest}")
        return Observed(containers, present)

    def _do(
        self,
        step: Step,
        name: str,
        spec: InstanceSpec | None,
        state: InstanceState | None,
        observed: Observed,
        key: str,
        policy: EffectivePolicy,
        ticket: str | None,
    ) -> InstanceState | None:
        if step is Step.REMOVE:
            self._remove(observed, spec)
            if spec is None:
                self._delete(name, state)
                return None
            return self._set(name, spec, state, status="disabled", reason=None, detail="")
        assert spec is not None
        if step is Step.PIN:
            return self._pin(spec, state, key, policy, ticket)
        assert state is not None and state.pinned_digest is not None
        digest = state.pinned_digest
        if step is Step.FETCH:
            state = self._set(name, spec, state, status="pulling")
            self._pull(spec, digest)
            return state
        if step is Step.CREATE:
            self._remove(observed, spec)
            create, host = docker_create_args(spec, digest)
            container_id = self.engine.run_container(create, host)
            log.info("instance %s: started container %s from %s", name, container_id[:12], create["image"])
            return self._set(name, spec, state, status="running", container_id=container_id)
        if step is Step.START:
            self.engine.start(observed.containers[0].id)
            return self._set(name, spec, state, status="running", container_id=observed.containers[0].id)
        raise AssertionError(f"unexpected step {step}")

    def _remove(self, observed: Observed, spec: InstanceSpec | None) -> None:
        grace = (
            spec.run.stop_timeout_seconds if spec is not None else self.config.enforcement.stop_grace_seconds
        )
        for c in observed.containers:
            try:
                self.engine.stop_and_remove(c.id, grace)
            except EngineError as exc:
                raise InstanceFailure(
                    Code.ENGINE_ERROR, f"cannot remove container {c.id[:12]}: {exc}"
                ) from None

    def _remove_quietly(self, name: str, spec: InstanceSpec | None) -> None:
        try:
            self._remove(self._observe(name, None, None, None), spec)
        except (InstanceFailure, EngineError, Gone) as exc:
            log.warning("instance %s: cannot remove its containers: %s", name, exc)

    def _registries(self, spec: InstanceSpec) -> tuple[list[RegistryConfig], dict[str, str] | None]:
        """Registry entries for the lookup client, and the engine's auth for the pull."""
        host = spec.registry_credentials or spec.image.registry
        if (problem := credentials_problem(self.config, spec)) is not None:
            raise InstanceFailure(Code.CREDENTIALS_MISSING, problem)
        cfg = self.config.registry(host)
        if cfg is None and (found := DockerHost().credentials(host)) is not None:
            # what `docker login` stored: the engine pulls with it, as `docker pull` would
            return [], {"username": found[0], "password": found[1]}
        if cfg is None or cfg.username is None:
            return [], None
        try:
            auth = {"username": cfg.username, "password": cfg.password() or ""}
        except ImageGuardError as exc:
            raise InstanceFailure(Code.CREDENTIALS_MISSING, str(exc)) from None
        extra = []
        if host != spec.image.registry:
            # a declared mirror gets the credentials, never the connection settings: plain HTTP or a
            # private CA apply only where the configuration names them for that host
            base = self.config.registry(spec.image.registry)
            extra.append(
                replace(
                    cfg,
                    host=spec.image.registry,
                    mirrors=(),
                    ca_bundle=base.ca_bundle if base else None,
                    insecure=base.insecure if base else False,
                )
            )
        return extra, auth

    def _pull(self, spec: InstanceSpec, digest: Digest) -> None:
        _, auth = self._registries(spec)
        try:
            self.engine.pull(spec.repository, str(digest), auth)
        except EngineError as exc:
            if self._registry_unreachable(spec, digest):
                raise InstanceFailure(
                    Code.IMAGE_UNAVAILABLE_OFFLINE,
                    f"{spec.repository}@{digest} is not on this device and the registry is unreachable",
                ) from None
            raise InstanceFailure(Code.PULL_FAILED, str(exc)) from None

    def _registry_unreachable(self, spec: InstanceSpec, digest: Digest) -> bool:
        from agent.adapters.registry import RegistryClient, Repository

        extra, _ = self._registries(spec)
        try:
            with RegistryClient(
                self.config, registries=extra, timeout=5.0, deadline=10.0, docker_host=DockerHost()
            ) as client:
                client.head_manifest(Repository.of(spec.image), digest)
        except RegistryUnreachable:
            return True
        except ImageGuardError:
            return False
        return False

    def _pin(
        self,
        spec: InstanceSpec,
        state: InstanceState | None,
        key: str,
        policy: EffectivePolicy,
        ticket: str | None,
    ) -> InstanceState:
        """Resolve, verify and pull; on success the new digest is pinned (and allows containers)."""
        from agent.adapters.registry import RegistryClient

        name = spec.name
        anchor = spec.trust_anchor(policy.anchor)
        have_pin = state is not None and state.pinned_digest is not None and state.pin_key == key
        old = state.pinned_digest if have_pin and state is not None else None
        extra, _ = self._registries(spec)
        if not have_pin:
            state = self._set(name, spec, state, status="pulling", reason=None, detail="")
        now = self.clock()
        try:
            with RegistryClient(
                self.config, registries=extra, timeout=10.0, deadline=30.0, docker_host=DockerHost()
            ) as client:
                digest = client.resolve(spec.image)
                if have_pin and digest == old:
                    log.info("instance %s: %s still resolves to the pinned %s", name, spec.image, digest)
                    outcome = UpdateOutcome(ticket, utc_now(), "unchanged", digest=str(digest))
                    return self._set(name, spec, state, last_update=outcome, last_check=now)
                self._vouch(spec, digest, anchor, client, state, have_pin)
        except RegistryUnreachable as exc:
            failure = InstanceFailure(
                Code.IMAGE_UNAVAILABLE_OFFLINE, f"registry {spec.image.registry} unreachable: {exc}"
            )
            return self._update_failed(spec, state, failure, ticket, now) if have_pin else _raise(failure)
        except RegistryError as exc:
            failure = InstanceFailure(Code.REGISTRY_ERROR, f"registry {spec.image.registry}: {exc}")
            return self._update_failed(spec, state, failure, ticket, now) if have_pin else _raise(failure)
        except InstanceFailure as failure:
            if not have_pin:
                raise
            return self._update_failed(spec, state, failure, ticket, now)
        if not have_pin:
            state = self._set(name, spec, state, status="pulling")
        try:
            self._pull(spec, digest)
        except InstanceFailure as failure:
            if not have_pin:
                raise
            return self._update_failed(spec, state, failure, ticket, now)
        if old is not None:
            # the old container goes before its digest is withdrawn: the rescan that follows finds nothing
            # of ours to block
            self._remove_quietly(name, spec)
        outcome = UpdateOutcome(
            ticket, utc_now(), "updated", digest=str(digest), previous=str(old) if old is not None else None
        )
        if old is not None:
            log.info("instance %s: updated from %s to %s", name, old, digest)
        else:
            log.info("instance %s: pinned %s@%s", name, spec.repository, digest)
        state = self._set(
            name,
            spec,
            state,
            pinned_digest=digest,
            pin_key=key,
            attempt_key=None,
            reason=None,
            detail="",
            last_update=outcome if ticket or old else (state.last_update if state else None),
            last_check=now,
        )
        self.on_pins_changed()  # the enforcer must allow the new digest before its container starts
        return state

    def _vouch(
        self,
        spec: InstanceSpec,
        digest: Digest,
        anchor: TrustAnchor | None,
        client: Any,
        state: InstanceState | None,
        have_pin: bool,
    ) -> None:
        """The enforcement digest or the anchor must vouch for ``digest``; raises InstanceFailure."""
        from agent.runtime.verification import verify_reference

        if spec.enforcement_digest is not None:
            if digest != spec.enforcement_digest:
                raise InstanceFailure(
                    Code.DIGEST_MISMATCH,
                    f"{spec.image} resolves to {digest}, not to the enforcement digest {spec.enforcement_digest}",
                )
            log.info(
                "instance %s: %s vouched for by its enforcement digest (no verification)", spec.name, digest
            )
            return
        assert anchor is not None
        if not have_pin:
            self._set(spec.name, spec, state, status="verifying")
        result = verify_reference(client, spec.image.with_digest(digest), [anchor], now=self.clock())
        if result.verified is None:
            if result.unreachable:
                raise RegistryUnreachable("; ".join(result.reasons))
            raise InstanceFailure(Code.SIGNATURE_INVALID, "; ".join(result.reasons))
        log.info("instance %s: %s verified with trust anchor %r", spec.name, digest, anchor.name)

    # -- state, telemetry, alerts ---------------------------------------------------------------------------

    def _set(
        self,
        name: str,
        spec: InstanceSpec | None,
        state: InstanceState | None,
        **changes: Any,
    ) -> InstanceState:
        base = state or InstanceState(name)
        new = replace(base, **changes)
        if new == base and state is not None:
            return state
        new = replace(new, updated_at=utc_now())
        telemetry = []
        if (new.status, new.reason, new.pinned_digest) != (
            base.status,
            base.reason,
            base.pinned_digest,
        ) or state is None:
            self._log_status(new)
            if self.service.telemetry:
                telemetry.append(self._status_message(spec, new))
        self.store.put_instance_state(new, telemetry)
        return new

    def _delete(self, name: str, state: InstanceState | None) -> None:
        log.info("instance %s: removed", name)
        telemetry = []
        if self.service.telemetry and state is not None:
            telemetry.append(self._status_message(None, replace(state, status="disabled", reason="deleted")))
        self.store.delete_instance_state(name, telemetry, utc_now())

    def _log_status(self, state: InstanceState) -> None:
        if state.status == "failed":
            log.warning("instance %s failed (%s): %s", state.name, state.reason, state.detail)
        else:
            log.info("instance %s: %s", state.name, state.status)

    def _status_message(self, spec: InstanceSpec | None, state: InstanceState) -> OutboxMessage:
        image = str(spec.image) if spec is not None else None
        return InstanceEvent(self.config.device.id, self._policy_version(), state, image).message()

    def _failed(
        self,
        name: str,
        spec: InstanceSpec | None,
        state: InstanceState | None,
        failure: InstanceFailure,
        key: str | None,
        ticket: str | None,
    ) -> InstanceState:
        if failure.reason in RETRYABLE:
            delay = min(RETRY_MAX_SECONDS, self._backoff.get(name, RETRY_MIN_SECONDS / 2) * 2)
            self._backoff[name] = delay
            self._retry_at[name] = self.clock() + delay
        last = UpdateOutcome(ticket, utc_now(), "failed", reason=failure.reason, detail=failure.detail)
        return self._set(
            name,
            spec,
            state,
            status="failed",
            reason=failure.reason.value,
            detail=failure.detail,
            attempt_key=key,
            container_id=None,
            last_update=last if ticket else (state.last_update if state else None),
        )

    def _update_failed(
        self,
        spec: InstanceSpec,
        state: InstanceState | None,
        failure: InstanceFailure,
        ticket: str | None,
        now: float,
    ) -> InstanceState:
        """An update did not go through: the pinned digest and its container stay; say why."""
        assert state is not None
        rejected = failure.reason in (Code.SIGNATURE_INVALID, Code.DIGEST_MISMATCH)
        result: UpdateResult = "rejected" if rejected else "failed"
        log.warning(
            "instance %s: update %s (%s), keeping %s: %s",
            spec.name,
            result,
            failure.reason.value,
            state.pinned_digest,
            failure.detail,
        )
        if rejected:
            self.service.queue_telemetry([self._alert(spec, state, failure)])
        elif failure.reason in RETRYABLE and ticket == "periodic":
            pass  # the next periodic check retries
        outcome = UpdateOutcome(ticket, utc_now(), result, reason=failure.reason, detail=failure.detail)
        return self._set(
            spec.name,
            spec,
            state,
            reason=Code.UPDATE_REJECTED.value if rejected else state.reason,
            detail=failure.detail if rejected else state.detail,
            last_update=outcome,
            last_check=now,
        )

    def _policy_version(self) -> int:
        return self.service.layer(DEVICE_LAYER).version

    def _alert(self, spec: InstanceSpec, state: InstanceState, failure: InstanceFailure) -> OutboxMessage:
        return InstanceAlert(
            self.config.device.id,
            self._policy_version(),
            spec.name,
            str(spec.image),
            str(state.pinned_digest),
            failure.reason,
            failure.detail,
        ).message()


def _raise(failure: InstanceFailure) -> InstanceState:
    raise failure


def credentials_problem(config: Config, spec: InstanceSpec) -> str | None:
    """Why ``spec.registry_credentials`` may not be used for its image, or None.

    Credentials go only to the host they are configured for, or to a mirror that host's own
    ``[[registries]]`` entry declares (``mirrors``): a spec (maybe from MQTT) cannot send them elsewhere.
    """
    host = spec.registry_credentials
    if host is None:
        return None
    cfg = config.registry(host)
    if cfg is None:
        return f"no [[registries]] entry for host {host!r} in {config.source}"
    if host != spec.image.registry and spec.image.registry not in cfg.mirrors:
        return (
            f"the credentials for {host} go only to {host}, not to {spec.image.registry}; if that host "
            f'mirrors {host}, say so in its [[registries]] entry: mirrors = ["{spec.image.registry}"]'
        )
    return None
