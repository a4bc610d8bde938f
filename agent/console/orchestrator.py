"""Rollouts, driven: create, step through waves, pause/resume/abort/rollback, dry-run.

The state lives in the fleet database (agent/console/fleetdb.py), so a rollout goes on after a restart of
the service and any replica can drive it: the one that holds its lease (renewed every tick, taken over
when it lapses) does. What to do next is decided by :func:`agent.console.rollouts.next_step` (pure).

Delivery to a wave's devices is the ``PUT fleet/{group}`` request (agent/control/resources.py): the device
runs every check a retained fleet layer gets and answers; its ``.../policy`` acknowledgement, stored by the
ingest, answers the rollout too, whichever comes first. When the last wave of a whole-group rollout is
done, the layer is also published retained on the group's fleet topic, so devices that join later (or
were offline) get it from the broker.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, wait
from typing import Any

from agent.console.client import Reply
from agent.console.fleetdb import (
    ABORTED,
    ACTIVE,
    COMPLETED,
    HOLDS,
    OFFLINE,
    PAUSED,
    PENDING,
    REJECTED,
    RUNNING,
    SENT,
    STOPPED,
    Answer,
    FleetDbError,
    FleetStore,
)
from agent.console.requester import Requester
from agent.console.rollouts import DEFAULT_WAVES, Step, bump_version, next_step, parse_waves, plan_waves
from agent.core.envelope import ENVELOPE_SCHEMA, claimed_version, is_envelope
from agent.core.policy import PolicyLayer, group_layer
from agent.core.schemas import validate
from agent.errors import ImageGuardError, InputError

log = logging.getLogger(__name__)

LEASE_SECONDS = 10.0
#: between looks at the database when nothing wakes the loop (answers, births and changes do)
TICK_SECONDS = 1.0


class RolloutError(InputError):
    """A rollout request that cannot be carried out as asked (unknown, wrong state, bad document)."""


def check_layer_document(doc: Any, group: str) -> int:
    """A group layer document or signed envelope that a device could accept; returns its version."""
    if not isinstance(doc, Mapping):
        raise RolloutError("the layer must be a JSON object: a layer document or a signed envelope")
    inner = doc
    if is_envelope(doc):
        validate(doc, ENVELOPE_SCHEMA, "signed layer")
        inner = doc["document"]
    layer = PolicyLayer.from_document(inner, group_layer(group), "layer")
    if "enforcement" in inner:
        raise RolloutError("a group layer holds no enforcement settings (those are each device's own)")
    target = inner.get("target")
    if target is not None and target != {"group": group}:
        raise RolloutError(f"the layer's target {target} does not name group {group!r}")
    version = claimed_version(doc)
    if version is None or version != layer.version:
        raise RolloutError("the layer has no usable version")
    return version


class Orchestrator:
    """Drives every running rollout this replica holds the lease of, on its own thread."""

    def __init__(
        self,
        store: FleetStore,
        requester: Requester,
        *,
        owner: str,
        publish_layer: Callable[[str, Mapping[str, Any]], None],
        request_timeout: float = 10.0,
        default_wave_timeout: float = 60.0,
    ) -> None:
        self.store = store
        self.requester = requester
        self.owner = owner
        self.publish_layer = publish_layer
        self.request_timeout = request_timeout
        self.default_wave_timeout = default_wave_timeout
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._answers: list[Answer] = []
        self._answers_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="console-rollouts", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(10)

    def wake(self) -> None:
        self._wake.set()

    # --- operations (the web layer calls these; each is audited there) ---------------------------

    def create(
        self,
        *,
        group: str,
        document: Mapping[str, Any],
        user: str,
        name: str = "",
        targets: Sequence[str] | None = None,
        waves: str | Sequence[str] = DEFAULT_WAVES,
        max_rejections: int | None = 0,
        max_alerts: int | None = 0,
        wave_timeout: float | None = None,
        soak_seconds: float = 0.0,
        rollback_of: str | None = None,
        start: bool = True,
    ) -> dict[str, Any]:
        try:
            group = str(group)
            if not group or any(c in group for c in "/+#"):
                raise RolloutError(f"group {group!r} cannot be an MQTT topic level")
            version = check_layer_document(document, group)
            plan = parse_waves(waves)
        except ImageGuardError as exc:
            raise RolloutError(exc.message) from None
        held = self.store.latest_version(group)
        if version <= held:
            raise RolloutError(
                f"version {version} is not newer than {held}, the newest this console rolled out for group "
                f"{group!r}; devices refuse older or equal versions"
            )
        for label, limit in (("max_rejections", max_rejections), ("max_alerts", max_alerts)):
            if limit is not None and (not isinstance(limit, int) or limit < 0):
                raise RolloutError(f"{label} must be a whole number >= 0, or empty for no limit")
        if targets is not None:
            chosen = sorted({str(t) for t in targets if str(t).strip()})
            if not chosen:
                raise RolloutError("the device list is empty")
        else:
            chosen = [d["device"] for d in self.store.devices(group=group)]
        timeout = float(wave_timeout if wave_timeout is not None else self.default_wave_timeout)
        if not 1 <= timeout <= 86400:
            raise RolloutError("wave_timeout must be between 1 and 86400 seconds")
        soak = float(soak_seconds or 0)
        if not 0 <= soak <= 86400:
            raise RolloutError("soak_seconds must be between 0 and 86400 seconds")
        now = time.time()
        rollout_id = uuid.uuid4().hex[:12]
        row = {
            "id": rollout_id,
            "name": name or f"{group} v{version}",
            "group_name": group,
            "targets": None if targets is None else chosen,
            "version": version,
            "document": dict(document),
            "waves": list(plan),
            "max_rejections": max_rejections,
            "max_alerts": max_alerts,
            "wave_timeout": timeout,
            "soak_seconds": soak,
            "state": RUNNING if start else PAUSED,
            "wave": -1,
            "reason": "",
            "created_by": user,
            "created_at": now,
            "updated_at": now,
            "rollback_of": rollback_of,
            "lease_until": 0.0,
        }
        self.store.create_rollout(row, plan_waves(chosen, plan))
        self.wake()
        return self.store.rollout(rollout_id) or row

    def _get(self, rollout_id: str) -> dict[str, Any]:
        r = self.store.rollout(rollout_id)
        if r is None:
            raise RolloutError(f"no rollout {rollout_id!r}")
        return r

    def pause(self, rollout_id: str) -> None:
        if not self.store.update_rollout(rollout_id, expect=(RUNNING,), state=PAUSED):
            raise RolloutError(f"rollout {rollout_id} is {self._get(rollout_id)['state']}, not running")

    def resume(self, rollout_id: str) -> None:
        if not self.store.update_rollout(rollout_id, expect=(PAUSED,), state=RUNNING, reason=""):
            raise RolloutError(f"rollout {rollout_id} is {self._get(rollout_id)['state']}, not paused")
        self.wake()

    def abort(self, rollout_id: str, user: str) -> None:
        if not self.store.update_rollout(
            rollout_id, expect=ACTIVE, state=ABORTED, reason=f"aborted by {user}", finished_at=time.time()
        ):
            raise RolloutError(f"rollout {rollout_id} is {self._get(rollout_id)['state']}; it has ended")

    def rollback(
        self, rollout_id: str, user: str, document: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """A new rollout, one wave, that gives the devices which took this one the layer they held before
        (at a newer version: devices refuse older ones). Ends this rollout first if it still runs."""
        r = self._get(rollout_id)
        if r["state"] in ACTIVE:
            self.abort(rollout_id, user)
        holders = [d["device"] for d in self.store.rollout_devices(rollout_id) if d["state"] in HOLDS]
        if not holders:
            raise RolloutError(f"no device took rollout {rollout_id}: nothing to roll back")
        version = self.store.latest_version(r["group_name"]) + 1
        if document is None:
            before = self._previous(r)
            document = bump_version(before, version) if before is not None else {"version": version}
        return self.create(
            group=r["group_name"],
            document=document,
            user=user,
            name=f"rollback of {r['name']}",
            targets=holders,
            waves=("100%",),
            max_rejections=None,
            max_alerts=None,
            wave_timeout=r["wave_timeout"],
            rollback_of=rollout_id,
        )

    def _previous(self, rollout: Mapping[str, Any]) -> dict[str, Any] | None:
        """The layer the group held before ``rollout``: the newest older rollout that completed."""
        older = [
            o
            for o in self.store.rollouts(states=(COMPLETED,), limit=1000)
            if o["group_name"] == rollout["group_name"] and o["version"] < rollout["version"]
        ]
        if not older:
            return None
        doc = max(older, key=lambda o: o["version"])["document"]
        return dict(doc)

    def dry_run(self, rollout_id: str, wave: int | None = None) -> dict[str, Any]:
        """Ask the online devices of a wave (default: the next one) what the layer would block."""
        r = self._get(rollout_id)
        rows = self.store.rollout_devices(rollout_id)
        if wave is None:
            wave = max(0, int(r["wave"]) + (0 if r["wave"] < 0 else 1))
            if not any(x["wave"] == wave for x in rows):
                wave = max(0, int(r["wave"]))
        online = {d["device"] for d in self.store.devices(online=True)}
        chosen = [x["device"] for x in rows if x["wave"] == wave and x["device"] in online]
        asked: dict[str, Future[Reply]] = {
            d: self.requester.request(
                d,
                "EXEC",
                "policy/dry-run",
                {"layer": group_layer(r["group_name"]), "document": r["document"]},
                timeout=self.request_timeout,
            )
            for d in chosen
        }
        wait(list(asked.values()), timeout=self.request_timeout + 2)
        results: dict[str, Any] = {}
        for device, fut in asked.items():
            try:
                reply = fut.result(timeout=0)
                doc = reply.document()
                result = doc if reply.code == 200 else {"error": reply.message or f"code {reply.code}"}
            except Exception as exc:  # a timeout or a broker failure is one device's result
                result = {"error": str(exc) or type(exc).__name__}
            results[device] = result
            self.store.set_devices(rollout_id, [device], dry_run=_json(result))
        blocked = sum(int(v.get("would_block", 0)) for v in results.values() if isinstance(v, dict))
        return {
            "rollout": rollout_id,
            "wave": wave,
            "asked": len(asked),
            "would_block": blocked,
            "devices": results,
        }

    # --- driving ---------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except FleetDbError as exc:
                log.error("console rollouts: %s", exc)
            except Exception:
                log.exception("console rollouts: unexpected failure; going on")
            self._wake.wait(TICK_SECONDS)
            self._wake.clear()

    def tick(self, now: float | None = None) -> None:
        self._store_answers()
        for r in self.store.rollouts(states=(RUNNING,), limit=1000):
            now_ = time.time() if now is None else now
            if not self.store.lease(r["id"], self.owner, LEASE_SECONDS, now_):
                continue
            for _ in range(100):  # several steps at once (start, send...) but never forever
                r2 = self.store.rollout(r["id"])
                if r2 is None or r2["state"] != RUNNING:
                    break
                rows = self.store.rollout_devices(r["id"])
                step = next_step(r2, rows, self.store.alerts_after_apply(r["id"]), now_)
                if step.action == "wait" or not self._act(r2, step, now_):
                    break

    def _act(self, r: Mapping[str, Any], step: Step, now: float) -> bool:
        """Carry out one step; True if another step may follow at once."""
        rid = r["id"]
        if step.action == "start":
            log.info("rollout %s (%s): wave %d starts", rid, r["name"], step.wave + 1)
            return self.store.update_rollout(rid, expect=(RUNNING,), wave=step.wave, wave_started_at=now)
        if step.action == "send":
            self._send(r, step.devices, now)
            return True
        if step.action == "expire":
            self.store.set_devices(rid, step.devices, only=(SENT,), state=OFFLINE, reason=step.reason)
            return True
        if step.action == "stop":
            log.warning("rollout %s (%s) stopped: %s", rid, r["name"], step.reason)
            self.store.update_rollout(
                rid, expect=(RUNNING,), state=STOPPED, reason=step.reason, finished_at=now
            )
            self.store.record("service", "rollout.stopped", rid, {"reason": step.reason})
            return False
        if step.action == "complete":
            if r["targets"] is None:
                try:
                    self.publish_layer(r["group_name"], r["document"])
                except ImageGuardError as exc:
                    log.error("rollout %s: retained layer not published yet: %s", rid, exc)
                    return False  # tried again on the next tick
            self.store.update_rollout(
                rid, expect=(RUNNING,), state=COMPLETED, reason=step.reason, finished_at=now
            )
            log.info("rollout %s (%s) completed", rid, r["name"])
            return False
        return False

    def _send(self, r: Mapping[str, Any], devices: Sequence[str], now: float) -> None:
        rid = r["id"]
        online = {d["device"] for d in self.store.devices(online=True)}
        away = [d for d in devices if d not in online]
        here = [d for d in devices if d in online]
        self.store.set_devices(
            rid, away, only=(PENDING,), state=OFFLINE, reason="offline when its wave started"
        )
        self.store.set_devices(rid, here, only=(PENDING,), state=SENT, sent_at=now)
        resource = f"fleet/{r['group_name']}"
        for device in here:
            try:
                fut = self.requester.request(
                    device, "PUT", resource, r["document"], timeout=float(r["wave_timeout"])
                )
            except ImageGuardError as exc:
                self.store.set_devices(rid, [device], only=(SENT,), state=REJECTED, reason=exc.message)
                continue
            fut.add_done_callback(lambda f, device=device: self._answered(rid, device, f))  # type: ignore[misc]

    def _answered(self, rollout_id: str, device: str, fut: Future[Reply]) -> None:
        """A device's reply to its delivery (paho's or a timer's thread): kept for the orchestrator's thread,
        which stores every answer that came in since its last look in one statement."""
        try:
            reply = fut.result(timeout=0)
        except Exception:
            return  # no reply: the wave's timeout counts the device offline unless its ack arrives
        doc = reply.document()
        if reply.code == 200 and isinstance(doc, dict) and doc.get("status") in HOLDS:
            state, reason = str(doc["status"]), ""
        else:
            state, reason = REJECTED, reply.message or f"the device answered {reply.code}"
        with self._answers_lock:
            self._answers.append(Answer(rollout_id, device, state, reason[:2000], time.time()))
        self.wake()

    def _store_answers(self) -> None:
        with self._answers_lock:
            answers, self._answers = self._answers, []
        if not answers:
            return
        try:
            self.store.answer_devices(answers)
        except FleetDbError as exc:
            with self._answers_lock:  # kept for the next tick; the devices' acknowledgements may come first
                self._answers[:0] = answers
            log.error("rollouts: %d answers not stored yet: %s", len(answers), exc)


def _json(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)
