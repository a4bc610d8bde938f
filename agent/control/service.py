"""Library calls shared by the CLI, the agent and the MQTT control plane: they change the policy store.

The control side only writes here; the enforcement loop reads snapshots (``effective()``) after a change.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from agent import __version__
from agent.adapters.store import Store
from agent.config import Config
from agent.core.anchors import TrustAnchor
from agent.core.digest import Digest
from agent.core.instances import enabled_pins
from agent.core.policy import DEVICE_LAYER, AllowlistEntry, EffectivePolicy, Enforcement, PolicyLayer
from agent.core.records import OutboxMessage, policy_event, utc_now
from agent.errors import ImageGuardError, NotFound, PolicyError

log = logging.getLogger(__name__)

ApplyStatus = Literal["applied", "unchanged"]


@dataclass(frozen=True)
class ApplyResult:
    layer: str
    version: int
    status: ApplyStatus
    revoked: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "version": self.version, "status": self.status, "revoked": self.revoked}


def check_anchors(layer: PolicyLayer) -> None:
    """Refuse a layer whose anchors cannot be used (bad PEM, unsupported key or scheme) before storing it."""
    if not layer.trust_anchors:
        return
    from agent.verify.schemes import validator_for  # the crypto stack loads only when anchors exist

    for i, anchor in enumerate(layer.trust_anchors):
        try:
            validator_for(anchor).check_anchor(anchor)
        except ImageGuardError as exc:
            raise PolicyError(
                f"policy layer {layer.name!r}: at /trust_anchors/{i}: {exc}", code=exc.code
            ) from None


class Service:
    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        telemetry: bool = False,
        on_change: Callable[[], object] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        #: write policy acknowledgements to the outbox (only when a broker is configured)
        self.telemetry = telemetry
        self.on_change = on_change

    # -- reading -----------------------------------------------------------------------------------

    @property
    def default_enforcement(self) -> Enforcement:
        e = self.config.enforcement
        if not e.mode_configured and self.first_run:
            return Enforcement(enabled=e.enabled, mode="audit")
        return Enforcement(enabled=e.enabled, mode=e.mode)

    @property
    def first_run(self) -> bool:
        """No policy was ever set on this device (every stored layer is at version 0). A layer set aside as
        undecodable was a policy all the same: never a first run's audit mode then (fail closed)."""
        layers = self.store.layers()  # reading them sets aside what cannot be decoded
        return all(lyr.version == 0 for lyr in layers) and not self.store.poison_rows().get("policy_layers")

    def effective(self, replacing: PolicyLayer | None = None) -> EffectivePolicy:
        """The policy in force; with ``replacing``, the one that would be in force with that layer."""
        groups = {f"group:{g}" for g in self.config.device.groups}
        stored = [lyr for lyr in self.store.layers() if replacing is None or lyr.name != replacing.name]
        if replacing is not None:
            stored.append(replacing)
        layers = [lyr for lyr in stored if lyr.name == DEVICE_LAYER or lyr.name in groups]
        policy = dataclasses.replace(
            EffectivePolicy.compose(layers, self.default_enforcement), protected=self.config.protected_paths
        )
        specs = next((lyr.instances for lyr in layers if lyr.name == DEVICE_LAYER), ())
        if not specs:
            return policy
        # pinned digests of enabled instances allow containers (agent/core/instances.py)
        pins = enabled_pins(specs, self.store.instance_states(), policy.anchor)
        return dataclasses.replace(policy, instance_digests=pins)

    def summary(self) -> dict[str, Any]:
        """What ``imageguard status`` and ``GET status`` share: policy, state and outbox figures."""
        policy = self.effective()
        store = self.store
        counters = store.counters()
        dropped = {
            k.removeprefix("outbox_dropped."): v
            for k, v in counters.items()
            if k.startswith("outbox_dropped.")
        }
        return {
            "version": __version__,
            "device": self.config.device.id,
            "groups": list(self.config.device.groups),
            "enforcement": policy.enforcement.to_dict(),
            "first_run": self.first_run and not self.config.enforcement.mode_configured,
            "policy": {
                "version": policy.version,
                "layers": dict(policy.versions),
                "allowlist": len(policy.allowlist),
                "trust_anchors": [a.name for a in policy.trust_anchors],
            },
            "verified_digests": sum(len(v) for v in store.verified().values()),
            "decisions": store.decision_count(),
            "outbox": {"queued": store.outbox_size(), "limit": store.outbox_limit, "dropped": dropped},
            "storage": {
                "state": "read-only" if store.read_only else "ok",
                "problem": store.problem,
                # records enforcement made but could not keep (agent/runtime/recorder.py)
                "records_lost": {
                    k.removeprefix("records_lost."): v
                    for k, v in counters.items()
                    if k.startswith("records_lost.")
                },
                # undecodable rows set aside in the poison_rows table (agent/adapters/store.py)
                "poison_rows": store.poison_rows(),
            },
            "counters": counters,
        }

    def layer(self, name: str = DEVICE_LAYER) -> PolicyLayer:
        return self.store.layer(name)

    def export_policy(self, name: str = DEVICE_LAYER) -> dict[str, Any]:
        doc = self.store.layer(name).to_document()
        if name == DEVICE_LAYER and "enforcement" not in doc:
            doc["enforcement"] = self.default_enforcement.to_dict()
        return doc

    # -- changing ----------------------------------------------------------------------------------

    def apply_layer(self, layer: PolicyLayer, *, source: str, force: bool = False) -> ApplyResult:
        """Replace a layer if ``layer.version`` is newer; revoke what changed anchors had verified.

        Raises RollbackError for an older version, PolicyConflict for the same version with other content,
        PolicyError for a remote version jump (each recorded as a rejection in policy telemetry).
        ``force`` (the local CLI only) replaces the layer whatever the versions say.
        """
        now = utc_now()
        remote = source.startswith(("mqtt:", "fleet:"))
        if force and remote:
            raise PolicyError("forcing a policy change is for the device's own command line only")
        step = self.config.mqtt.max_version_step if (remote and self.config.mqtt) else None
        try:
            check_anchors(layer)
            with self.store.transaction() as tx:
                current = self.store.read_layer(tx, layer.name)
                if not force and not current.check_successor(layer, max_step=step):
                    self._ack(tx, layer, "unchanged", current.version, source, now)
                    result = ApplyResult(layer.name, layer.version, "unchanged")
                else:
                    Store.write_layer(tx, layer, now)
                    layers = {lyr.name: lyr for lyr in self.store.read_layers(tx)}
                    groups = {f"group:{g}" for g in self.config.device.groups}
                    eff = EffectivePolicy.compose(
                        [lyr for n, lyr in layers.items() if n == DEVICE_LAYER or n in groups],
                        self.default_enforcement,
                    )
                    revoked = Store.revoke_verified(tx, {a.name: a.fingerprint for a in eff.trust_anchors})
                    self._ack(tx, layer, "applied", eff.version, source, now)
                    result = ApplyResult(layer.name, layer.version, "applied", revoked)
        except ImageGuardError as exc:
            self.record_rejection(layer.name, layer.version, exc, source)
            raise
        if result.status == "applied":
            log.info(
                "policy layer %s version %d applied (from %s, %d verified digests revoked)",
                layer.name,
                layer.version,
                source,
                result.revoked,
            )
            if self.on_change:
                self.on_change()
        return result

    def _ack(
        self, tx: Any, layer: PolicyLayer, status: str, policy_version: int, source: str, now: str
    ) -> None:
        if self.telemetry:
            msg = policy_event(
                device=self.config.device.id,
                layer=layer.name,
                version=layer.version,
                status=status,
                policy_version=policy_version,
                source=source,
            )
            self.store.enqueue(tx, msg, now)

    def record_rejection(self, layer: str, version: int | None, error: ImageGuardError, source: str) -> None:
        """Report a refused change (bad document, rollback, bad signature) as policy telemetry."""
        log.warning("policy change for layer %s refused (%s): %s", layer, error.code, error)
        try:
            self.store.bump(f"policy_rejected.{error.code}")
        except ImageGuardError as exc:  # read-only state: the log line above is the record
            log.debug("cannot count the rejection: %s", exc)
        if not self.telemetry:
            return
        msg = policy_event(
            device=self.config.device.id,
            layer=layer,
            version=version if version is not None else -1,
            status="rejected",
            policy_version=self.store.layer(DEVICE_LAYER).version,
            source=source,
            reason=error.code,
            detail=str(error),
        )
        self.store.outbox_add([msg], utc_now())

    def queue_telemetry(self, messages: Iterable[OutboxMessage]) -> None:
        if self.telemetry:
            self.store.outbox_add(messages, utc_now())

    def reset_version(
        self, version: int = 1, *, layer: str = DEVICE_LAYER, source: str = "cli"
    ) -> ApplyResult:
        """Give a layer a new version and keep its content (recovers a layer whose version is exhausted)."""
        current = self.layer(layer)
        return self.apply_layer(dataclasses.replace(current, version=version), source=source, force=True)

    def import_policy(
        self, doc: Any, *, source: str = "cli", layer: str = DEVICE_LAYER, force: bool = False
    ) -> ApplyResult:
        try:
            parsed = PolicyLayer.from_document(doc, layer, what="policy document")
        except ImageGuardError as exc:
            version = (
                doc.get("version") if isinstance(doc, dict) and isinstance(doc.get("version"), int) else None
            )
            self.record_rejection(layer, version, exc, source)
            raise
        return self.apply_layer(parsed, source=source, force=force)

    def _edit(self, source: str, **changes: Any) -> ApplyResult:
        current = self.store.layer(DEVICE_LAYER)
        first = self.first_run and not self.config.enforcement.mode_configured
        if first and current.enforcement is None and "enforcement" not in changes:
            # building the first policy entry by entry keeps the first run's audit mode: enforcing stays an
            # explicit step (imageguard enforcement --mode enforce)
            changes["enforcement"] = self.default_enforcement
        return self.apply_layer(current.bumped(**changes), source=source)

    def allowlist_add(
        self, digests: Iterable[Digest], comment: str = "", *, source: str = "cli"
    ) -> ApplyResult:
        return self.allowlist_add_entries([AllowlistEntry(d, comment) for d in digests], source=source)

    def allowlist_add_entries(self, new: Iterable[AllowlistEntry], *, source: str = "cli") -> ApplyResult:
        """Add entries in one version step; an empty comment keeps the comment an entry already has."""
        current = self.store.layer(DEVICE_LAYER)
        entries = {e.digest: e for e in current.allowlist}
        added = False
        for e in new:
            d, comment = e.digest, e.comment
            if d not in entries or (comment and entries[d].comment != comment):
                entries[d] = AllowlistEntry(d, comment or (entries[d].comment if d in entries else ""))
                added = True
        if not added:
            return ApplyResult(DEVICE_LAYER, current.version, "unchanged")
        return self._edit(source, allowlist=tuple(entries.values()))

    def allowlist_remove(self, digest: Digest, *, source: str = "cli") -> ApplyResult:
        current = self.store.layer(DEVICE_LAYER)
        kept = tuple(e for e in current.allowlist if e.digest != digest)
        if len(kept) == len(current.allowlist):
            raise NotFound(f"{digest} is not on the device allowlist")
        return self._edit(source, allowlist=kept)

    def set_enforcement(
        self, *, enabled: bool | None = None, mode: str | None = None, source: str = "cli"
    ) -> ApplyResult:
        if mode not in (None, "enforce", "audit"):
            raise PolicyError(f"unknown enforcement mode {mode!r}: expected 'enforce' or 'audit'")
        current = self.effective().enforcement
        new = Enforcement(
            enabled=current.enabled if enabled is None else enabled,
            mode=current.mode if mode is None else mode,  # type: ignore[arg-type]
        )
        return self._edit(source, enforcement=new)

    def put_anchor(self, anchor: TrustAnchor, *, source: str = "cli") -> ApplyResult:
        current = self.store.layer(DEVICE_LAYER)
        anchors = [a for a in current.trust_anchors if a.name != anchor.name] + [anchor]
        return self._edit(source, trust_anchors=tuple(anchors))

    def delete_anchor(self, name: str, *, source: str = "cli") -> ApplyResult:
        current = self.store.layer(DEVICE_LAYER)
        kept = tuple(a for a in current.trust_anchors if a.name != name)
        if len(kept) == len(current.trust_anchors):
            raise NotFound(f"trust anchor {name!r} is not in the device policy")
        return self._edit(source, trust_anchors=kept)
