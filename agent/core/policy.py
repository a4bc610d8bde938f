"""Policy: versioned layers (the device's own and one per fleet group) and the effective union of them.

A layer is parsed and checked once, here; the core only sees :class:`EffectivePolicy` snapshots.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.core.anchors import TrustAnchor
from agent.core.constraints import RuntimeRule
from agent.core.digest import Digest
from agent.core.imageref import ImageRef
from agent.core.instances import InstanceSpec, parse_instances
from agent.core.schemas import validate
from agent.errors import Code, DigestError, PolicyConflict, PolicyError, RollbackError

Mode = Literal["enforce", "audit"]
DEVICE_LAYER = "device"


def group_layer(group: str) -> str:
    return f"group:{group}"


@dataclass(frozen=True, slots=True)
class Enforcement:
    enabled: bool = True
    mode: Mode = "enforce"

    def to_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "mode": self.mode}


@dataclass(frozen=True, slots=True)
class AllowlistEntry:
    digest: Digest
    comment: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"digest": str(self.digest)}
        if self.comment:
            out["comment"] = self.comment
        return out


@dataclass(frozen=True, slots=True)
class PolicyLayer:
    """One versioned layer. ``enforcement`` is honoured only in the device layer."""

    name: str = DEVICE_LAYER
    version: int = 0
    enforcement: Enforcement | None = None
    allowlist: tuple[AllowlistEntry, ...] = ()
    trust_anchors: tuple[TrustAnchor, ...] = ()
    target: Mapping[str, str] | None = None
    #: managed container instances (device layer only; agent/core/instances.py)
    instances: tuple[InstanceSpec, ...] = ()
    #: runtime constraints per image scope (agent/core/constraints.py); every layer's rules apply
    runtime: tuple[RuntimeRule, ...] = ()

    @classmethod
    def from_document(cls, doc: Any, name: str = DEVICE_LAYER, what: str = "policy") -> PolicyLayer:
        """Validate a policy document (schema, then meaning) and build the layer. Raises PolicyError."""
        validate(doc, "policy", what)
        entries: dict[Digest, AllowlistEntry] = {}
        for i, e in enumerate(doc.get("allowlist", ())):
            try:
                digest = Digest.parse(e["digest"])
            except DigestError as exc:
                raise PolicyError(f"{what}: at /allowlist/{i}/digest: {exc}") from None
            entries.setdefault(digest, AllowlistEntry(digest, e.get("comment", "")))
        anchors: dict[str, TrustAnchor] = {}
        for i, a in enumerate(doc.get("trust_anchors", ())):
            if a["name"] in anchors:
                raise PolicyError(
                    f"{what}: at /trust_anchors/{i}/name: anchor {a['name']!r} is defined twice"
                )
            anchors[a["name"]] = TrustAnchor.from_dict(a, f"{what}: at /trust_anchors/{i}")
        enforcement = None
        if "enforcement" in doc:
            if name != DEVICE_LAYER:
                raise PolicyError(f"{what}: at /enforcement: enforcement can only be set in the device layer")
            enforcement = Enforcement(**doc["enforcement"])
        instances: tuple[InstanceSpec, ...] = ()
        if "instances" in doc:
            if name != DEVICE_LAYER:
                raise PolicyError(
                    f"{what}: at /instances: instances can only be declared in the device layer"
                )
            instances = parse_instances(doc["instances"], what)
        runtime = tuple(
            RuntimeRule.from_dict(r, f"{what}: at /runtime/{i}") for i, r in enumerate(doc.get("runtime", ()))
        )
        return cls(
            name=name,
            version=int(doc["version"]),  # JSON Schema counts 3.0 as an integer
            enforcement=enforcement,
            allowlist=tuple(entries.values()),
            trust_anchors=tuple(anchors.values()),
            target=doc.get("target"),
            instances=instances,
            runtime=runtime,
        )

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"version": self.version}
        if self.target:
            doc["target"] = dict(self.target)
        if self.enforcement is not None:
            doc["enforcement"] = self.enforcement.to_dict()
        doc["allowlist"] = [e.to_dict() for e in self.allowlist]
        doc["trust_anchors"] = [a.to_dict() for a in self.trust_anchors]
        if self.instances:
            doc["instances"] = [i.to_document() for i in self.instances]
        if self.runtime:
            doc["runtime"] = [r.to_dict() for r in self.runtime]
        return doc

    def check_successor(self, new: PolicyLayer, max_step: int | None = None) -> bool:
        """True if ``new`` should replace this layer; False if it is the very same document (nothing new).

        Raises RollbackError for an older version, PolicyConflict for the same version with other content
        (never silently "nothing new": an operator's edit would be lost), and PolicyError for a version that
        jumps by more than ``max_step`` (a remote document must not use up the version space).
        """
        if new.version < self.version:
            raise RollbackError(
                f"policy layer {self.name!r}: version {new.version} is older than the held version "
                f"{self.version}; send a version greater than {self.version}"
            )
        if new.version == self.version:
            if _content(new) == _content(self):
                return False
            raise PolicyConflict(
                f"policy layer {self.name!r}: version {new.version} is already held with different content "
                f"({'; '.join(layer_diff(self, new)) or 'metadata differs'}); give the new document version "
                f"{self.version + 1}"
            )
        if max_step is not None and new.version - self.version > max_step:
            raise PolicyError(
                f"policy layer {self.name!r}: version {new.version} jumps by {new.version - self.version} from "
                f"the held version {self.version}; a remote document may raise it by at most {max_step} "
                "([mqtt] max_version_step)",
                code=Code.POLICY_VERSION_JUMP,
            )
        return True

    def bumped(self, **changes: Any) -> PolicyLayer:
        """A copy with ``changes`` applied and the version increased by one (local edits)."""
        fields: dict[str, Any] = {
            "name": self.name,
            "version": self.version + 1,
            "enforcement": self.enforcement,
            "allowlist": self.allowlist,
            "trust_anchors": self.trust_anchors,
            "target": self.target,
            "instances": self.instances,
            "runtime": self.runtime,
        }
        fields.update(changes)
        return PolicyLayer(**fields)


def _content(layer: PolicyLayer) -> dict[str, Any]:
    doc = layer.to_document()
    doc.pop("version", None)
    return doc


def _show(e: Enforcement | None) -> str:
    return "default" if e is None else f"{'on' if e.enabled else 'off'}/{e.mode}"


def layer_diff(old: PolicyLayer, new: PolicyLayer) -> list[str]:
    """What replacing ``old`` by ``new`` changes, one line per kind of change (empty: nothing)."""
    out: list[str] = []
    before, after = {e.digest for e in old.allowlist}, {e.digest for e in new.allowlist}
    if added := sorted(map(str, after - before)):
        out.append(f"allowlist +{len(added)}: {', '.join(added[:5])}{' ...' if len(added) > 5 else ''}")
    if removed := sorted(map(str, before - after)):
        out.append(f"allowlist -{len(removed)}: {', '.join(removed[:5])}{' ...' if len(removed) > 5 else ''}")
    anchors_old = {a.name: a.fingerprint for a in old.trust_anchors}
    anchors_new = {a.name: a.fingerprint for a in new.trust_anchors}
    for verb, names in (
        ("added", sorted(anchors_new.keys() - anchors_old.keys())),
        ("removed", sorted(anchors_old.keys() - anchors_new.keys())),
        (
            "changed",
            sorted(n for n in anchors_old.keys() & anchors_new.keys() if anchors_old[n] != anchors_new[n]),
        ),
    ):
        if names:
            out.append(f"trust anchors {verb}: {', '.join(names)}")
    if old.enforcement != new.enforcement:
        out.append(f"enforcement {_show(old.enforcement)} -> {_show(new.enforcement)}")
    inst_old, inst_new = {i.name: i for i in old.instances}, {i.name: i for i in new.instances}
    for verb, names in (
        ("declared", sorted(inst_new.keys() - inst_old.keys())),
        ("deleted", sorted(inst_old.keys() - inst_new.keys())),
        ("changed", sorted(n for n in inst_old.keys() & inst_new.keys() if inst_old[n] != inst_new[n])),
    ):
        if names:
            out.append(f"instances {verb}: {', '.join(names)}")
    if old.runtime != new.runtime:
        out.append(f"runtime rules: {len(old.runtime)} -> {len(new.runtime)}")
    if (old.target or None) != (new.target or None):
        out.append(f"target {old.target} -> {new.target}")
    return out


@dataclass(frozen=True)
class EffectivePolicy:
    """The union of all layers, as the enforcement loop reads it. Immutable: swapped whole on change."""

    enforcement: Enforcement
    allowlist: frozenset[Digest]
    trust_anchors: tuple[TrustAnchor, ...]
    versions: Mapping[str, int] = field(default_factory=dict)
    #: digests pinned by enabled managed instances (they allow containers like allowlist entries)
    instance_digests: frozenset[Digest] = frozenset()
    #: runtime constraints of every layer (each one only restricts, so a union is safe)
    runtime: tuple[RuntimeRule, ...] = ()
    #: host paths no container may bind (the agent's state, the plugin socket): from the configuration
    protected: tuple[str, ...] = ()

    @property
    def version(self) -> int:
        return self.versions.get(DEVICE_LAYER, 0)

    def anchors_for(self, ref: ImageRef | None) -> tuple[TrustAnchor, ...]:
        if ref is None:
            return ()
        return tuple(a for a in self.trust_anchors if a.covers(ref))

    def anchor(self, name: str) -> TrustAnchor | None:
        return next((a for a in self.trust_anchors if a.name == name), None)

    @classmethod
    def compose(
        cls,
        layers: Iterable[PolicyLayer],
        default_enforcement: Enforcement,
        instance_digests: frozenset[Digest] = frozenset(),
    ) -> EffectivePolicy:
        enforcement = default_enforcement
        allow: set[Digest] = set()
        anchors: dict[str, TrustAnchor] = {}
        versions: dict[str, int] = {}
        runtime: list[RuntimeRule] = []
        # device layer last, so that its anchor of a given name wins over a group's
        for layer in sorted(layers, key=lambda lyr: lyr.name == DEVICE_LAYER):
            versions[layer.name] = layer.version
            allow.update(e.digest for e in layer.allowlist)
            runtime.extend(layer.runtime)
            for a in layer.trust_anchors:
                anchors[a.name] = a
            if layer.name == DEVICE_LAYER and layer.enforcement is not None:
                enforcement = layer.enforcement
        return cls(
            enforcement, frozenset(allow), tuple(anchors.values()), versions, instance_digests, tuple(runtime)
        )
