"""The enforcement loop: engine facts -> decide (pure core) -> record -> act.

Work for one container always runs on the same lane (a single thread), so events for one container are
handled in order while different containers are handled in parallel. A container whose signature must be
checked leaves its lane while the registry answers (frozen meanwhile) and comes back to it for the verdict:
a slow registry never delays the containers that share the lane.

A start is gated twice. The moment the runtime makes the container's cgroup (:meth:`Enforcer.gate`, before
its entrypoint runs), it is frozen and decided on what is known without waiting for dockerd: a container
that cannot be allowed is killed before any of its code runs. Whatever that cannot settle (a signature to
check, runtime constraints not yet known) is thawed and decided at its start event, frozen again meanwhile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from agent.adapters.cgroups import CgroupError, ContainerCgroup
from agent.adapters.engine import Gone
from agent.adapters.store import Store
from agent.config import EnforcementConfig
from agent.core.decision import (
    Decision,
    Evidence,
    FailedVerification,
    VerificationOutcome,
    VerifiedDigest,
    VerifyTarget,
    conclude,
    decide,
)
from agent.core.digest import Digest
from agent.core.facts import ContainerEvent, ContainerFacts, facts_from_event
from agent.core.policy import EffectivePolicy
from agent.core.records import DecisionRecord, decision_record, decision_telemetry
from agent.errors import Code, EngineError, ImageGuardError
from agent.runtime.recorder import Recorder

log = logging.getLogger(__name__)

RETRY_MIN_SECONDS = 0.5
RETRY_MAX_SECONDS = 30.0


#: how long a start the authorization plugin allowed spares the monitor deciding again on its start event
AUTHORIZED_TTL = 30.0
#: triggers whose caller does not wait for the decision: their verification runs off the lanes
_OFF_LANE = ("start", "retry", "reconcile")


class Verifier(Protocol):
    """Checks signatures for pending decisions (see agent/runtime/verification.py)."""

    def verify(self, targets: tuple[VerifyTarget, ...], timeout: float) -> VerificationOutcome: ...


class ContainerEngine(Protocol):
    """What the enforcer needs of the engine (:class:`agent.adapters.engine.Engine` is the real one)."""

    def container_ids(self) -> list[str]: ...

    def container_facts(self, container_id: str) -> ContainerFacts: ...

    def listed_facts(self, container_id: str) -> ContainerFacts: ...

    def facts_for_create(self, request: dict[str, Any], name: str) -> ContainerFacts: ...

    def forget_image(self, image_id: str) -> bool: ...

    def stop_and_remove(self, container_id: str, grace_seconds: int) -> str: ...

    def pause(self, container_id: str) -> None: ...

    def unpause(self, container_id: str) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Handled:
    """The result of handling one container (what the CLI prints for a scan)."""

    record: DecisionRecord
    decision: Decision
    facts: ContainerFacts


@dataclass(frozen=True, slots=True)
class InFlight:
    """A decision under way: what it is made on, and how the container is held while it waits (frozen
    through its cgroup, or paused by the engine when the cgroup cannot be reached)."""

    facts: ContainerFacts
    decision: Decision
    policy: EffectivePolicy
    trigger: str
    frozen: ContainerCgroup | None
    paused: bool

    def concluded(self, decision: Decision) -> InFlight:
        return dataclasses.replace(self, decision=decision)


class Lanes:
    """N single-thread queues; a key always maps to the same lane."""

    def __init__(self, count: int, name: str = "lane") -> None:
        self._queues: list[queue.SimpleQueue[Callable[[], None] | None]] = [
            queue.SimpleQueue() for _ in range(count)
        ]
        self._threads = [
            threading.Thread(target=self._run, args=(q,), name=f"{name}-{i}", daemon=True)
            for i, q in enumerate(self._queues)
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _run(q: queue.SimpleQueue[Callable[[], None] | None]) -> None:
        while (job := q.get()) is not None:
            try:
                job()
            except Exception:
                log.exception("enforcement job failed")

    def submit(self, key: str, fn: Callable[[], Any]) -> Future[Any]:
        fut: Future[Any] = Future()

        def job() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        self._queues[zlib.crc32(key.encode()) % len(self._queues)].put(job)
        return fut

    def responsive(self, timeout: float) -> bool:
        """Every lane runs a no-op within ``timeout`` (none is stuck): the watchdog's health check."""
        done = [threading.Event() for _ in self._queues]
        for q, event in zip(self._queues, done, strict=True):
            q.put(event.set)
        end = time.monotonic() + timeout
        return all(event.wait(max(0.0, end - time.monotonic())) for event in done)

    def close(self) -> None:
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join(timeout=5)


class Enforcer:
    def __init__(
        self,
        engine: ContainerEngine,
        store: Store,
        policy: EffectivePolicy,
        settings: EnforcementConfig,
        *,
        device: str,
        verifier: Verifier | None = None,
        telemetry: bool = False,
        lanes: int = 8,
        clock: Callable[[], float] = time.time,
        cgroups: Callable[[str], ContainerCgroup | None] = ContainerCgroup.find,
        recorder: Recorder | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        #: every write goes through it: enforcement never waits on the database
        self.recorder = recorder if recorder is not None else Recorder(store)
        self._owns_recorder = recorder is None
        self.settings = settings
        self.device = device
        self.verifier = verifier
        self.telemetry = telemetry
        self.clock = clock
        #: a container's cgroup by id (freeze, thaw, kill without dockerd)
        self.cgroups = cgroups
        self._policy = policy
        self._verified = store.verified()
        self._failures: dict[Digest, tuple[FailedVerification, float]] = {}
        self._inflight: dict[tuple[Any, ...], Future[VerificationOutcome]] = {}
        #: container id -> (policy, time) of a start the authorization plugin just allowed
        self._authorized: dict[str, tuple[EffectivePolicy, float]] = {}
        #: containers frozen through their cgroup, waiting for their decision
        self._frozen: dict[str, ContainerCgroup] = {}
        #: containers held at their cgroup's creation (their start waits for the gate; an inspect of them
        #: would wait for the start)
        self._gated: dict[str, ContainerCgroup] = {}
        #: held containers whose start event came while they were held (a watch that saw the cgroup late,
        #: on a busy host): handed back to the start-event path if the gate does not settle them
        self._started_while_gated: set[str] = set()
        #: containers with a final decision acted on (bounded): the periodic check skips them
        self._decided: dict[str, None] = {}
        #: the facts of decided containers (bounded), to judge them when the engine does not answer
        self._known: dict[str, ContainerFacts] = {}
        #: failed attempts per container (retried with backoff until decided)
        self._attempts: dict[str, int] = {}
        #: failures and retries, also in the store's counters once it answers
        self.counters: dict[str, int] = {}
        #: container id -> facts being fetched right after its create (agent/runtime/authz.py)
        self._prefetch: dict[str, Future[ContainerFacts]] = {}
        #: containers allowed at some point (bounded): only these get a grace period when they lose that
        self._allowed_once: dict[str, None] = {}
        #: containers of this engine (bounded; from create events and listings): only their cgroups are gated,
        #: never those of another engine on the same host
        self._ours: dict[str, None] = {}
        #: the container cgroups there are now (set when the cgroup watch runs): the periodic check looks
        #: among them for starts left frozen
        self.held_cgroups: Callable[[], Iterable[tuple[str, ContainerCgroup]]] | None = None
        self._lock = threading.Lock()
        #: called with (seconds, verified) after each verification (metrics)
        self.on_verification: Callable[[float, bool], None] | None = None
        #: containers waiting off their lane for a verification (agent/runtime/verification.py)
        self._verifying: set[str] = set()
        self._lanes = Lanes(lanes)
        self._removals = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="remove")
        self._verifications = ThreadPoolExecutor(max_workers=32, thread_name_prefix="verify-wait")
        #: decisions on starts held at their cgroup's creation (Enforcer.gate)
        self._gates = ThreadPoolExecutor(max_workers=4, thread_name_prefix="gate")

    # -- state -------------------------------------------------------------------------------------

    @property
    def policy(self) -> EffectivePolicy:
        return self._policy

    def set_policy(self, policy: EffectivePolicy) -> None:
        with self._lock:
            self._policy = policy
            self._failures.clear()  # a new policy deserves a fresh look
        self.reload_verified()

    def reload_verified(self) -> None:
        verified = self.store.verified()
        with self._lock:
            self._verified = verified

    def _evidence(self) -> Evidence:
        now = self.clock()
        with self._lock:
            failures = {d: f for d, (f, exp) in self._failures.items() if exp > now}
            return Evidence(self._verified, failures)

    # -- entry points ------------------------------------------------------------------------------

    def submit(
        self, container_id: str, trigger: str, event: ContainerEvent | None = None
    ) -> Future[Handled | None]:
        """Queue a decision. A container just started and not known to be allowed is frozen here, before
        it waits for its lane: from now on it executes no instruction until it is thawed or killed."""
        if trigger == "start" and not self._authorized_now(container_id):
            self._freeze(container_id)
        return self._lanes.submit(container_id, lambda: self._handle_safely(container_id, trigger, event))

    # -- the gate at cgroup creation --------------------------------------------------------------

    def created(self, container_id: str) -> None:
        """A create event: the container is this engine's, and its facts are fetched now, while no start holds
        its lock, so that the gate can settle its start (allowed ones included) without asking dockerd."""
        self._know((container_id,))
        with self._lock:
            fetching = container_id in self._prefetch
        if not fetching and self._enforcing():
            self.prefetch(container_id)

    def destroyed(self, container_id: str) -> None:
        with self._lock:
            self._ours.pop(container_id, None)
            self._prefetch.pop(container_id, None)

    def _know(self, container_ids: Iterable[str]) -> None:
        with self._lock:
            for cid in container_ids:
                self._ours[cid] = None
            while len(self._ours) > 16384:  # bounded: drop the oldest
                del self._ours[next(iter(self._ours))]

    def _enforcing(self) -> bool:
        e = self._policy.enforcement
        return e.enabled and e.mode == "enforce"

    def gate(self, container_id: str, cgroup: ContainerCgroup) -> None:
        """The runtime just made this container's cgroup (agent/adapters/cgroups.py, on the watch thread):
        freeze it before the entrypoint runs, and decide on the container's lane.

        Only a container of this engine, not already allowed by the authorization plugin, in enforce mode.
        """
        if not self._enforcing() or self._authorized_now(container_id):
            return
        with self._lock:
            if container_id not in self._ours:
                return
        if self._freeze_now(container_id, cgroup) is None:
            return
        with self._lock:
            self._gated[container_id] = cgroup
        self._submit_gated(container_id)

    def _submit_gated(self, container_id: str) -> None:
        """Off the lanes: a held start must not wait behind a scan's inspects. Nothing else decides the
        container meanwhile (:meth:`handle` leaves a held one alone), and its start event cannot come before
        the gate lets it go."""
        with contextlib.suppress(RuntimeError):  # shutting down: the next agent settles it (recover_gated)
            self._gates.submit(self._decide_gated, container_id)

    def _decide_gated(self, container_id: str) -> Handled | None:
        """Settle a start held at its cgroup's creation: dockerd holds the container's lock until the start
        ends, which waits for us, so nothing here waits on an inspect. Blocked: killed before its entrypoint
        ran (the start fails) and removed. Allowed on full facts: thawed, and its start event is not decided
        again. Anything else: thawed, to be decided at its start event like any other start."""
        with self._lock:
            # from here on, whatever else looks at it waits at most until it is let go (an inspect waits
            # for the start); and its start event, once thawed, is handled as any other
            cgroup = self._gated.pop(container_id, None)
        if cgroup is None:
            return None  # decided meanwhile
        handled, let_go = self._settle_gated(container_id, cgroup)
        with self._lock:
            started = container_id in self._started_while_gated
            self._started_while_gated.discard(container_id)
        if let_go and started:  # its start event was set aside while it was held: decide it now
            self.submit(container_id, "start")
        return handled

    def _settle_gated(self, container_id: str, cgroup: ContainerCgroup) -> tuple[Handled | None, bool]:
        """The gate's decision, and whether the container was let go undecided (for its start event)."""
        policy = self._policy
        try:
            facts, decision = self._decide(container_id, policy, self._facts_before_start)
        except Gone:
            self._thaw(cgroup)  # not this engine's after all
            return None, False
        except Exception as exc:  # the start event decides it, frozen again meanwhile
            log.warning("could not decide on %s at its cgroup's creation: %s", container_id[:12], exc)
            self._thaw(cgroup)
            return None, True
        settled = decision.verdict == "blocked" or (
            decision.verdict == "allowed" and facts.runtime is not None
        )
        if not settled:
            log.debug(
                "container %s: not settled at its cgroup's creation (%s); decided at its start",
                container_id[:12],
                "signature to check" if decision.pending else "runtime facts not known yet",
            )
            self._thaw(cgroup)
            return None, True
        handled = self._finish(InFlight(facts, decision, policy, "start", cgroup, False))
        if decision.verdict == "allowed":
            with self._lock:
                self._authorized[container_id] = (policy, self.clock())
        else:
            self._count("killed_before_entrypoint")
        return handled, False

    def _facts_before_start(self, container_id: str) -> ContainerFacts:
        """The inspect made after the container's create if it has answered; otherwise the lock-free list."""
        with self._lock:
            fut = self._prefetch.get(container_id)
            if fut is not None and fut.done() and fut.exception() is None:
                del self._prefetch[container_id]
                return fut.result()
        return self.engine.listed_facts(container_id)

    def recover_gated(self, cgroups: Iterable[tuple[str, ContainerCgroup]]) -> int:
        """A container frozen at its cgroup's creation by an agent that stopped before deciding holds its start
        (and dockerd's lock on it) for good: decide each again (at start, and with every periodic check).
        Returns how many."""
        found = 0
        for cid, cgroup in cgroups:
            with self._lock:
                if cid in self._gated or cid in self._decided:
                    continue  # being decided now, or decided
            try:
                if not cgroup.frozen():
                    continue
                state = self.engine.listed_facts(cid).state
            except (CgroupError, Gone, EngineError):
                continue  # gone, or another engine's
            if state != "created":
                continue  # running ones are the scan's (it finds them frozen); paused ones are the user's
            with self._lock:
                if cid in self._gated:
                    continue  # the gate took it meanwhile
                self._gated[cid] = cgroup
            log.warning("container %s was left frozen before its start (an earlier agent stopped)", cid[:12])
            self._know((cid,))
            self._submit_gated(cid)
            found += 1
        return found

    def _handle_safely(self, container_id: str, trigger: str, event: ContainerEvent | None) -> Handled | None:
        """:meth:`handle`, and when the engine fails, a retry with backoff: nothing is left undecided."""
        try:
            handled = self.handle(container_id, trigger, event=event)
        except EngineError as exc:
            self._engine_failed(container_id, trigger, exc)
            return None
        except Exception:
            self._internal_error(container_id, "deciding on")
            return None
        with self._lock:
            self._attempts.pop(container_id, None)
        return handled

    def _engine_failed(self, container_id: str, trigger: str, exc: EngineError) -> None:
        """The engine did not answer about a container (slow, or holding its lock: an unfinished
        ``docker cp`` upload makes even an inspect wait). A container decided before is judged again on
        the facts known from then: if the policy now blocks it, its processes are killed through the
        cgroup at once. Either way the decision is retried until the engine answers."""
        self._count("engine_errors")
        with self._lock:
            facts = self._known.get(container_id)
        if facts is not None and trigger != "start":
            policy = self._policy
            decision = decide(facts, policy, self._evidence())
            if decision.verdict == "blocked" and policy.enforcement.mode == "enforce":
                log.warning(
                    "container %s: the engine does not answer (%s); blocked on what was known of it, killing "
                    "it through its cgroup",
                    facts.name or facts.short_id,
                    exc,
                )
                self._kill(facts, None)
        self._retry_later(container_id, f"could not decide on container {container_id[:12]}: {exc}")

    def _retry_later(self, container_id: str, why: str) -> None:
        with self._lock:
            attempt = self._attempts.get(container_id, 0) + 1
            self._attempts[container_id] = attempt
        delay = min(RETRY_MAX_SECONDS, RETRY_MIN_SECONDS * 2 ** (attempt - 1))
        self._count("retries")
        log.warning("%s; retry %d in %.1fs", why, attempt, delay)
        timer = threading.Timer(
            delay,
            lambda: self._lanes.submit(
                container_id, lambda: self._handle_safely(container_id, "retry", None)
            ),
        )
        timer.daemon = True
        timer.start()

    def _count(self, name: str) -> None:
        """Counted in memory at once (status, telemetry) and in the store when it answers."""
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + 1
        self.recorder.count(name)

    def _authorized_now(self, container_id: str) -> bool:
        with self._lock:
            entry = self._authorized.get(container_id)
        return entry is not None and entry[0] is self._policy

    def _freeze(self, container_id: str) -> None:
        if not self._enforcing():
            return
        if (cg := self._freeze_now(container_id)) is not None:
            with self._lock:
                self._frozen[container_id] = cg

    def reconcile(self) -> int:
        """Decide again on every container not known to be allowed (cheap: one list, set look-ups).

        Anything a lost event, a failed retry or a race let through is caught here. Returns how many.
        """
        if self.held_cgroups is not None:
            self.recover_gated(self.held_cgroups())
        with self._lock:
            known = set(self._decided) | set(self._frozen) | set(self._gated) | set(self._attempts)
            known |= self._verifying
        ids = self.engine.container_ids()
        self._know(ids)
        missed = [cid for cid in ids if cid not in known]
        for cid in missed:
            self.submit(cid, "reconcile")
        return len(missed)

    def scan(self, *, dry_run: bool = False, trigger: str = "scan") -> list[Handled]:
        """Decide (and unless ``dry_run``, act) on every container, running or stopped."""
        ids = self.engine.container_ids()
        self._know(ids)
        futures = [
            (cid, self._lanes.submit(cid, partial(self.handle, cid, trigger, dry_run=dry_run))) for cid in ids
        ]
        results = []
        for cid, fut in futures:
            try:
                if (handled := fut.result()) is not None:
                    results.append(handled)
            except EngineError as exc:
                log.error("scan: %s", exc)
                if not dry_run:  # never let go: decided from what is known, and retried
                    self._lanes.submit(cid, lambda cid=cid, exc=exc: self._engine_failed(cid, trigger, exc))  # type: ignore[misc]
            except ImageGuardError as exc:
                log.error("scan: %s", exc)
        return results

    @property
    def pending_retries(self) -> int:
        """Containers whose decision or removal failed and waits for its retry."""
        with self._lock:
            return len(self._attempts)

    def responsive(self, timeout: float) -> bool:
        """Whether decisions are being made (every lane answers within ``timeout``)."""
        return self._lanes.responsive(timeout)

    def close(self) -> None:
        self._gates.shutdown(wait=True)  # a held start is never left frozen by a clean stop
        self._verifications.shutdown(wait=False, cancel_futures=True)
        self._lanes.close()
        self._removals.shutdown(wait=True)
        if self._owns_recorder:
            self.recorder.close()

    # -- one container -----------------------------------------------------------------------------

    def handle(
        self, container_id: str, trigger: str, *, dry_run: bool = False, event: ContainerEvent | None = None
    ) -> Handled | None:
        with self._lock:
            if container_id in self._gated:
                # held at its cgroup's creation: the gate decides it, and an inspect would wait; a start
                # event that comes meanwhile is handed back if the gate lets it go undecided
                if trigger == "start":
                    self._started_while_gated.add(container_id)
                    self._frozen.pop(container_id, None)  # the same cgroup: the gate thaws or kills it
                return None
            frozen = self._frozen.pop(container_id, None)
        if trigger == "start" and self._just_authorized(container_id):
            log.debug("container %s was allowed before it started; not deciding again", container_id[:12])
            self._thaw(frozen)
            return None
        with self._lock:
            if container_id in self._verifying and not dry_run:
                if frozen is not None:
                    self._frozen[container_id] = frozen
                return None  # its verdict is on the way
        policy = self._policy
        try:
            facts, decision = self._decide(container_id, policy)
        except Gone:
            if event is None or dry_run:
                log.debug("container %s vanished before it could be inspected", container_id[:12])
                return None
            return self._vanished(event, policy)
        except BaseException:
            if frozen is not None:
                with self._lock:  # still frozen: the retry decides it
                    self._frozen[container_id] = frozen
            raise
        if (
            frozen is None
            and not dry_run
            and trigger in ("scan", "retry", "reconcile")
            and facts.state == "running"
        ):
            frozen = self._frozen_by_us(facts)  # an agent that crashed mid-verification left it frozen
        paused = False
        if decision.pending:
            if dry_run:
                decision = Decision(
                    None,
                    Code.NOT_ALLOWLISTED,
                    "would be verified against its trust anchors",
                    decision.digests,
                    verify=decision.verify,
                )
                return Handled(self._record(decision, facts, policy, trigger, "none"), decision, facts)
            if policy.enforcement.mode == "enforce" and facts.state == "running" and frozen is None:
                frozen = self._freeze_now(facts.id)
                paused = frozen is None and self._pause(facts)  # no cgroup access: the engine's pause
            if trigger in _OFF_LANE:
                self._verify_off_lane(InFlight(facts, decision, policy, trigger, frozen, paused))
                return None
            decision = conclude(decision, self._verify(decision.verify), policy)
        return self._finish(InFlight(facts, decision, policy, trigger, frozen, paused), dry_run=dry_run)

    def _verify_off_lane(self, job: InFlight) -> None:
        """Verify on another thread, then conclude on the container's lane again."""
        cid = job.facts.id
        with self._lock:
            self._verifying.add(cid)

        def verified(fut: Future[VerificationOutcome]) -> None:
            self._lanes.submit(cid, lambda: self._conclude_safely(fut, job))

        try:
            self._verifications.submit(self._verify, job.decision.verify).add_done_callback(verified)
        except RuntimeError:  # shutting down: the container stays frozen, the next start decides it
            with self._lock:
                self._verifying.discard(cid)

    def _conclude_safely(self, fut: Future[VerificationOutcome], job: InFlight) -> Handled | None:
        facts = job.facts
        with self._lock:
            self._verifying.discard(facts.id)
        try:
            outcome = fut.result()
        except Exception as exc:  # a verifier bug fails closed
            log.exception("verification of %s failed", facts.image)
            outcome = VerificationOutcome(None, Code.VERIFICATION_ERROR, f"verification failed: {exc}")
        try:
            if job.policy is not self._policy:
                # the policy changed while the registry answered: decide again under the new one
                if job.frozen is not None:
                    with self._lock:
                        self._frozen[facts.id] = job.frozen
                return self._handle_safely(facts.id, "retry", None)
            return self._finish(job.concluded(conclude(job.decision, outcome, job.policy)))
        except EngineError as exc:
            self._count("engine_errors")
            self._retry_later(facts.id, f"could not act on container {facts.short_id}: {exc}")
        except Exception:
            self._internal_error(facts.id, "acting on")
        return None

    def _internal_error(self, container_id: str, doing: str) -> None:
        """A bug fails closed: logged with its traceback, counted, and the container decided again later."""
        self._count("enforcement_errors")
        log.exception("%s container %s failed", doing, container_id[:12])
        self._retry_later(container_id, "internal error")

    def _finish(self, job: InFlight, *, dry_run: bool = False) -> Handled:
        """Record and act on a concluded decision."""
        facts, decision, policy, trigger, frozen, paused = (
            job.facts,
            job.decision,
            job.policy,
            job.trigger,
            job.frozen,
            job.paused,
        )
        action = "none"
        if decision.verdict == "blocked":
            action = "remove"
        elif paused:
            action = "unpause"
        record = self._record(decision, facts, policy, trigger, action)
        if dry_run:
            self._thaw(frozen)
            return Handled(record, decision, facts)
        # judged before this decision is stored: what counts is whether it was allowed until now
        grace = (
            0 if paused or frozen is not None or action != "remove" else self._grace_for(facts.id, trigger)
        )
        if action == "remove" and grace == 0:
            self._kill(facts, frozen)  # first, and without dockerd: its processes stop where they stand
        else:
            self._thaw(frozen)
        self._save(record)
        if decision.verdict == "allowed":
            self._remember_allowed(facts.id)
        with self._lock:
            self._decided[facts.id] = None
            if len(self._decided) > 16384:
                del self._decided[next(iter(self._decided))]
            # what is known of it, for when the engine stops answering about it (_engine_failed)
            self._known[facts.id] = facts
            if len(self._known) > 16384:
                del self._known[next(iter(self._known))]
        self._act(facts, decision, action, grace, wait=trigger not in _OFF_LANE)
        return Handled(record, decision, facts)

    def _freeze_now(self, container_id: str, cgroup: ContainerCgroup | None = None) -> ContainerCgroup | None:
        """Freeze the container (through ``cgroup`` when known); its cgroup, or None when it was not frozen."""
        try:
            cg = cgroup or self.cgroups(container_id)
            if cg is not None:
                cg.freeze()
            return cg
        except CgroupError as exc:
            log.debug("could not freeze %s: %s", container_id[:12], exc)
            return None

    def _thaw(self, cg: ContainerCgroup | None) -> None:
        if cg is None:
            return
        try:
            cg.thaw()
        except CgroupError as exc:
            self._count("thaw_failures")
            log.error("could not thaw container cgroup %s: %s", cg.path, exc)

    def _kill(self, facts: ContainerFacts, frozen: ContainerCgroup | None) -> None:
        try:
            cg = frozen or self.cgroups(facts.id)
            if cg is not None:
                cg.kill()
        except CgroupError as exc:
            log.debug("could not kill %s through its cgroup (the engine will): %s", facts.short_id, exc)

    def _frozen_by_us(self, facts: ContainerFacts) -> ContainerCgroup | None:
        """A running container whose cgroup is frozen although the engine does not call it paused."""
        try:
            cg = self.cgroups(facts.id)
            if cg is not None and cg.frozen():
                log.warning(
                    "container %s was left frozen (an earlier agent stopped mid-decision)", facts.short_id
                )
                return cg
        except CgroupError:
            pass
        return None

    def _vanished(self, event: ContainerEvent, policy: EffectivePolicy) -> Handled:
        """A container gone before it could be inspected (a fast ``--rm``) still leaves a record: decided on
        what the start event says of it, with an alert unless that alone shows its image allowed."""
        facts = facts_from_event(event)
        decision = decide(facts, policy, self._evidence())
        if decision.verdict != "allowed":
            decision = Decision(
                "would-block" if policy.enforcement.mode == "audit" else "blocked",
                Code.VANISHED,
                f"the container was gone before it could be inspected; its start event names image {event.image!r}",
                decision.digests,
            )
        record = self._record(decision, facts, policy, "start", "none")
        self._save(record)
        log.warning(
            "container %s (%s) was gone before it could be inspected",
            facts.name or facts.short_id,
            facts.image,
        )
        return Handled(record, decision, facts)

    def _remember_allowed(self, container_id: str) -> None:
        with self._lock:
            self._allowed_once[container_id] = None
            if len(self._allowed_once) > 16384:  # bounded: drop the oldest
                del self._allowed_once[next(iter(self._allowed_once))]

    def _grace_for(self, container_id: str, trigger: str) -> int:
        """The stop grace period: only for a container that was allowed before and loses that (an allowlist
        shrink, an anchor change), where a clean shutdown matters. What was never allowed is killed at once.
        """
        with self._lock:
            known = container_id in self._allowed_once
        if not known and trigger != "start":
            try:  # a container allowed before the agent (re)started; a start event can never be one
                last = self.store.last_decision_for(container_id)
                known = last is not None and last.get("verdict") == "allowed"
            except Exception:  # storage trouble never delays a kill: treat as never allowed
                known = False
        return self.settings.stop_grace_seconds if known else 0

    def _decide(
        self,
        container_id: str,
        policy: EffectivePolicy,
        fetch: Callable[[str], ContainerFacts] | None = None,
    ) -> tuple[ContainerFacts, Decision]:
        """Facts (image details may come from the cache) and the decision on them.

        A cached image may lack registry digests added since (a later pull or push), so anything short of
        "allowed" is decided again on a fresh look before it counts.
        """
        if fetch is None:
            facts = self._prefetched_facts(container_id) or self.engine.container_facts(container_id)
            fetch = self.engine.container_facts
        else:
            facts = fetch(container_id)
        decision = decide(facts, policy, self._evidence())
        stale = decision.verdict != "allowed" and facts.image_id is not None
        if stale and self.engine.forget_image(str(facts.image_id)):
            facts = fetch(container_id)
            decision = decide(facts, policy, self._evidence())
        return facts, decision

    def authorize(self, container_id: str) -> Handled:
        """Decide before the engine starts a container (the authorization plugin): record, never act.

        A pending verification gets ``verify_timeout_seconds`` of wall time, then the start is refused
        (the verification itself runs on and its result is cached for the next attempt). Raises Gone or
        EngineError when the container cannot be looked up: the caller refuses the start then.
        """
        policy = self._policy
        facts, decision = self._decide(container_id, policy)
        if decision.pending:
            decision = conclude(decision, self._verify_within(decision.verify), policy)
        action = "deny" if decision.verdict == "blocked" else "none"
        record = self._record(decision, facts, policy, "prevented", action)
        self._save(record)
        if decision.verdict == "allowed":
            self._remember_allowed(facts.id)
            with self._lock:
                self._authorized[facts.id] = (policy, self.clock())
                if len(self._authorized) > 4096:  # bounded: drop the oldest
                    del self._authorized[next(iter(self._authorized))]
        return Handled(record, decision, facts)

    def prefetch(self, container_id: str) -> None:
        """Look a just-created container up in the background, so that the start that usually follows is
        decided without waiting for the engine (a container's image and options never change after create;
        a rename drops what was fetched)."""
        fut: Future[ContainerFacts] = Future()
        with self._lock:
            self._prefetch[container_id] = fut
            while len(self._prefetch) > 256:
                del self._prefetch[next(iter(self._prefetch))]

        def run() -> None:
            try:
                fut.set_result(self.engine.container_facts(container_id))
            except BaseException as exc:
                fut.set_exception(exc)
            finally:
                self.engine.close()  # this thread's connection

        threading.Thread(target=run, name="prefetch", daemon=True).start()

    def forget_prefetched(self) -> None:
        with self._lock:
            self._prefetch.clear()

    def _prefetched_facts(self, container_id: str) -> ContainerFacts | None:
        with self._lock:
            fut = self._prefetch.pop(container_id, None)
        if fut is None:
            return None
        try:
            facts = fut.result(timeout=self.settings.verify_timeout_seconds)
        except Exception:  # a failed or slow prefetch: look it up again
            return None
        log.debug("container %s: decided on the facts fetched after its create", container_id[:12])
        return facts

    def authorize_create(self, facts: ContainerFacts) -> Decision:
        """Judge a container before it is created (the authorization plugin): refuse what is known to be
        disallowed, so that a refused ``docker run`` leaves nothing behind. A refusal is recorded; a create
        that needs a signature check passes (its start is judged, the policy may change in between)."""
        policy = self._policy
        decision = decide(facts, policy, self._evidence())
        if decision.verdict == "blocked":
            self._save(self._record(decision, facts, policy, "prevented", "deny"))
        return decision

    def _just_authorized(self, container_id: str) -> bool:
        """Whether the start event follows a start the plugin allowed under the policy still in force.

        Consumed once: a later start (a restart policy, which asks no plugin) is decided again.
        """
        with self._lock:
            entry = self._authorized.pop(container_id, None)
        return entry is not None and entry[0] is self._policy and self.clock() - entry[1] < AUTHORIZED_TTL

    def _verify_within(self, targets: tuple[VerifyTarget, ...]) -> VerificationOutcome:
        timeout = self.settings.verify_timeout_seconds
        fut: Future[VerificationOutcome] = Future()

        def run() -> None:
            try:
                fut.set_result(self._verify(targets))
            except BaseException as exc:
                fut.set_exception(exc)

        threading.Thread(target=run, name="authz-verify", daemon=True).start()
        try:
            return fut.result(timeout)
        except TimeoutError:
            return VerificationOutcome(
                None,
                Code.VERIFICATION_TIMEOUT,
                f"signature verification did not finish within {timeout:g}s",
            )

    def _record(
        self, decision: Decision, facts: ContainerFacts, policy: EffectivePolicy, trigger: str, action: str
    ) -> DecisionRecord:
        return decision_record(
            decision, facts, policy, device=self.device, trigger=trigger, action=action, now=self.clock()
        )

    def _save(self, record: DecisionRecord) -> None:
        self.recorder.decision(record, decision_telemetry(record) if self.telemetry else ())

    def _act(self, facts: ContainerFacts, decision: Decision, action: str, grace: int, *, wait: bool) -> None:
        name = facts.name or facts.short_id
        if action == "remove":
            # the processes are already dead (or frozen) when removal starts: for a start event the engine's
            # part runs off the lanes, so that no decision on another container waits for it (nor for a grace
            # period); a scan waits, so that "scan done" means done
            removal = self._removals.submit(self._remove, facts, decision, grace)
            if wait:
                removal.result()
        elif action == "unpause":
            try:
                self.engine.unpause(facts.id)
            except (Gone, EngineError) as exc:
                log.warning("could not unpause verified container %s: %s", name, exc)
            log.info("allowed container %s (%s): %s", name, facts.image, decision.reason.value)
        elif decision.verdict == "would-block":
            log.warning("audit: container %s (%s) would be blocked: %s", name, facts.image, decision.detail)
        else:
            log.info("allowed container %s (%s): %s", name, facts.image, decision.reason.value)

    def _remove(self, facts: ContainerFacts, decision: Decision, grace: int) -> None:
        name = facts.name or facts.short_id
        try:
            # grace 0 kills at once; a paused (frozen) container is killed where it stands, never thawed
            outcome = self.engine.stop_and_remove(facts.id, grace)
        except EngineError as exc:
            self._count("removal_failures")
            # dockerd is slow or holds the container's lock (an unfinished `docker cp` upload): its processes
            # are killed through the cgroup now, and the removal is retried until dockerd answers
            self._kill(facts, None)
            self._retry_later(facts.id, f"could not remove blocked container {name}: {exc}")
            return
        log.warning("blocked container %s (%s): %s; %s", name, facts.image, decision.reason.value, outcome)

    def _pause(self, facts: ContainerFacts) -> bool:
        try:
            self.engine.pause(facts.id)
            return True
        except (Gone, EngineError) as exc:
            log.debug("could not pause %s before verification: %s", facts.short_id, exc)
            return False

    # -- verification ------------------------------------------------------------------------------

    def _verify(self, targets: tuple[VerifyTarget, ...]) -> VerificationOutcome:
        """Verify once per (targets, anchors) even when a burst of containers asks at the same time."""
        key = tuple((str(t.ref), tuple(a.fingerprint for a in t.anchors)) for t in targets)
        with self._lock:
            fut = self._inflight.get(key)
            owner = fut is None
            if fut is None:
                # a verification may have finished since decide() looked (the pause sits in between)
                if (recent := self._recent_outcome(targets)) is not None:
                    return recent
                fut = self._inflight[key] = Future()
        if not owner:
            return fut.result()
        try:
            outcome = self._run_verifier(targets)
            fut.set_result(outcome)
            return outcome
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def _recent_outcome(self, targets: tuple[VerifyTarget, ...]) -> VerificationOutcome | None:
        """A result already known for these targets (caller holds the lock), or None."""
        now = self.clock()
        for t in targets:
            fingerprints = {a.fingerprint for a in t.anchors}
            for record in self._verified.get(t.ref.digest, ()) if t.ref.digest else ():
                if record.anchor_fingerprint in fingerprints:
                    return VerificationOutcome(record)
        names = [frozenset(a.name for a in t.anchors) for t in targets]
        found = [self._failures.get(t.ref.digest) if t.ref.digest else None for t in targets]
        if all(f is not None and f[1] > now and f[0].anchors == n for f, n in zip(found, names, strict=True)):
            first = found[0][0]  # type: ignore[index]
            return VerificationOutcome(None, first.reason, first.detail + " (cached result)")
        return None

    def _run_verifier(self, targets: tuple[VerifyTarget, ...]) -> VerificationOutcome:
        started = time.monotonic()
        outcome = self._call_verifier(targets)
        if self.on_verification is not None:
            self.on_verification(time.monotonic() - started, outcome.verified is not None)
        return outcome

    def _call_verifier(self, targets: tuple[VerifyTarget, ...]) -> VerificationOutcome:
        if self.verifier is None:
            outcome = VerificationOutcome(
                None, Code.VERIFICATION_ERROR, "signature verification is not available"
            )
        else:
            try:
                outcome = self.verifier.verify(targets, self.settings.verify_timeout_seconds)
            except Exception as exc:  # a verifier bug must fail closed, never crash enforcement
                log.exception("verifier failed")
                outcome = VerificationOutcome(None, Code.VERIFICATION_ERROR, f"verifier failed: {exc}")
        if outcome.verified is not None:
            self._remember(outcome.verified)
        else:
            expires = self.clock() + self.settings.negative_cache_seconds
            with self._lock:
                for t in targets:
                    if t.ref.digest is not None:
                        anchors = frozenset(a.name for a in t.anchors)
                        self._failures[t.ref.digest] = (
                            FailedVerification(outcome.reason, outcome.detail, anchors),
                            expires,
                        )
        return outcome

    def _remember(self, v: VerifiedDigest) -> None:
        self.recorder.verified(v)
        with self._lock:
            others = tuple(r for r in self._verified.get(v.digest, ()) if r.anchor != v.anchor)
            self._verified = {**self._verified, v.digest: (*others, v)}
