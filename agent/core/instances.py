"""Managed container instances: the spec (parsed once, here), the stored state, and the pure planning rules.

An instance names an image by mutable tag (or digest) and a trust anchor. The agent resolves the tag,
verifies the digest, *pins* it and runs the container from ``repo@digest``. The pinned digest allows
containers only while the instance is enabled and the pin still answers the spec (same image, same tag or
digest, same anchor material): :func:`enabled_pins` is what the enforcement policy sees.

No I/O here: the manager (agent/runtime/instances.py) observes the engine, asks :func:`plan` what to do next
and does it.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from agent.core.anchors import TrustAnchor
from agent.core.digest import Digest
from agent.core.facts import INSTANCE_LABEL, MANAGED_LABEL
from agent.core.imageref import ImageRef
from agent.core.schemas import validate
from agent.errors import Code, DigestError, ImageRefError, SchemaError

#: labels every managed container carries (the enforcement loop and ``docker ps`` can tell them apart)
LABEL_MANAGED = MANAGED_LABEL
LABEL_INSTANCE = INSTANCE_LABEL
#: hash of what the container was created from: a different value means "recreate"
LABEL_CONFIG = "dev.imageguard.config"
RESERVED_LABEL_PREFIX = "dev.imageguard."
DEFAULT_STOP_TIMEOUT = 10


Status = Literal["pending", "pulling", "verifying", "running", "failed", "disabled"]


#: failures that can heal by themselves (network, engine): retried with backoff
RETRYABLE = frozenset(
    {
        Code.IMAGE_UNAVAILABLE_OFFLINE,
        Code.REGISTRY_ERROR,
        Code.PULL_FAILED,
        Code.ENGINE_ERROR,
    }
)


class InstanceFailure(Exception):
    """One step of the lifecycle failed; ``reason`` is the stable code the state and telemetry carry."""

    def __init__(self, reason: Code, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ---- the spec ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PortMapping:
    container: int
    host: int | None = None
    protocol: Literal["tcp", "udp"] = "tcp"
    host_ip: str | None = None


@dataclass(frozen=True, slots=True)
class VolumeMount:
    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class RunOptions:
    command: tuple[str, ...] | None = None
    environment: tuple[tuple[str, str], ...] = ()
    ports: tuple[PortMapping, ...] = ()
    volumes: tuple[VolumeMount, ...] = ()
    restart: str = "no"
    network: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    stop_timeout_seconds: int = DEFAULT_STOP_TIMEOUT


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """A declared instance, valid by construction (use :meth:`from_document`)."""

    name: str
    image: ImageRef  # carries the tag or the digest
    anchor_name: str | None
    inline_anchor: TrustAnchor | None
    enforcement_digest: Digest | None
    registry_credentials: str | None
    enabled: bool
    run: RunOptions
    update_interval_seconds: int | None
    document: Mapping[str, Any] = field(compare=False, hash=False, repr=False)

    @classmethod
    def from_document(cls, doc: Any, what: str = "instance", pointer: str = "") -> InstanceSpec:
        """Validate (schema, unknown fields, meaning) and build. Raises SchemaError naming the field path."""
        try:
            validate(doc, "instance", what)
        except SchemaError as exc:
            raise SchemaError(what, pointer + exc.pointer, exc.detail) from None

        def bad(at: str, detail: str) -> SchemaError:
            return SchemaError(what, f"{pointer}/{at}", detail)

        image_text = doc["image"]
        if "tag" in doc and "digest" in doc:
            raise bad("digest", "give a tag or a digest, not both")
        if ":" in image_text.rsplit("/", 1)[-1] or "@" in image_text:
            raise bad("image", "the repository only: give the tag in 'tag' or the digest in 'digest'")
        digests: dict[str, Digest] = {}
        for key in ("digest", "enforcement_digest"):
            if key in doc:
                try:
                    digests[key] = Digest.parse(doc[key])
                except DigestError as exc:
                    raise bad(key, str(exc)) from None
        try:
            ref = ImageRef.parse(image_text)
            if "digest" in digests:
                ref = ref.with_digest(digests["digest"])
            else:
                ref = ImageRef(ref.registry, ref.repository, doc.get("tag", "latest"))
                ImageRef.parse(str(ref))  # the tag must be one the engine accepts
        except ImageRefError as exc:
            raise bad("image", str(exc)) from None
        enforcement = digests.get("enforcement_digest")
        if enforcement is not None and ref.digest is not None and enforcement != ref.digest:
            raise bad("enforcement_digest", f"differs from the instance's digest {ref.digest}")
        anchor = doc.get("trust_anchor")
        if anchor is None and enforcement is None:
            raise bad("trust_anchor", "required unless enforcement_digest is given (nothing could vouch)")
        inline = None
        if isinstance(anchor, dict):
            # an inline anchor vouches for this instance's repository and nothing else: a spec (maybe from
            # whoever can publish on the device's topics) can never bring a key for every image
            inline = TrustAnchor(
                name=f"instance-{doc['name']}",
                kind=anchor.get("kind", "key"),
                pem=anchor["pem"],
                require_tlog=bool(anchor.get("require_tlog", False)),
                scope=(ref.name,),
            )
        return cls(
            name=doc["name"],
            image=ref,
            anchor_name=anchor if isinstance(anchor, str) else None,
            inline_anchor=inline,
            enforcement_digest=enforcement,
            registry_credentials=doc.get("registry_credentials"),
            enabled=bool(doc.get("enabled", True)),
            run=_run_options(doc.get("run") or {}, bad),
            update_interval_seconds=doc.get("update_interval_seconds"),
            document=json.loads(json.dumps(doc)),
        )

    def to_document(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(json.dumps(self.document))
        return out

    @property
    def repository(self) -> str:
        """``registry/repository``: what ``docker pull`` and the container's image name use."""
        return self.image.name

    def trust_anchor(self, lookup: Callable[[str], TrustAnchor | None]) -> TrustAnchor | None:
        """The anchor that must vouch (None: the enforcement digest vouches). Raises InstanceFailure."""
        if self.enforcement_digest is not None:
            return None
        if self.inline_anchor is not None:
            return self.inline_anchor
        assert self.anchor_name is not None
        anchor = lookup(self.anchor_name)
        if anchor is None:
            raise InstanceFailure(
                Code.ANCHOR_MISSING, f"trust anchor {self.anchor_name!r} is not in the effective policy"
            )
        if not anchor.covers(self.image):
            raise InstanceFailure(
                Code.ANCHOR_SCOPE,
                f"trust anchor {anchor.name!r} does not cover {self.repository} (its scope: "
                f"{', '.join(anchor.scope)})",
            )
        return anchor

    def with_enabled(self, enabled: bool) -> InstanceSpec:
        doc = dict(self.document, enabled=enabled)
        return InstanceSpec.from_document(doc)


def _run_options(run: Mapping[str, Any], bad: Callable[[str, str], SchemaError]) -> RunOptions:
    labels = tuple(sorted((run.get("labels") or {}).items()))
    for key, _ in labels:
        if key.startswith(RESERVED_LABEL_PREFIX):
            raise bad(f"run/labels/{key}", f"labels under {RESERVED_LABEL_PREFIX} are set by ImageGuard")
    seen: set[tuple[int, str]] = set()
    ports = []
    for i, p in enumerate(run.get("ports") or ()):
        mapping = PortMapping(p["container"], p.get("host"), p.get("protocol", "tcp"), p.get("host_ip"))
        if (mapping.container, mapping.protocol) in seen:
            raise bad(
                f"run/ports/{i}/container", f"port {mapping.container}/{mapping.protocol} is mapped twice"
            )
        seen.add((mapping.container, mapping.protocol))
        ports.append(mapping)
    command = run.get("command")
    return RunOptions(
        command=tuple(command) if command is not None else None,
        environment=tuple(sorted((run.get("environment") or {}).items())),
        ports=tuple(ports),
        volumes=tuple(
            VolumeMount(v["source"], v["target"], bool(v.get("read_only", False)))
            for v in run.get("volumes") or ()
        ),
        restart=run.get("restart", "no"),
        network=run.get("network"),
        labels=labels,
        stop_timeout_seconds=run.get("stop_timeout_seconds", DEFAULT_STOP_TIMEOUT),
    )


def parse_instances(items: Iterable[Any], what: str) -> tuple[InstanceSpec, ...]:
    """The ``instances`` array of a device layer; names must be unique."""
    out: dict[str, InstanceSpec] = {}
    for i, item in enumerate(items):
        spec = InstanceSpec.from_document(item, what, f"/instances/{i}")
        if spec.name in out:
            raise SchemaError(what, f"/instances/{i}/name", f"instance {spec.name!r} is defined twice")
        out[spec.name] = spec
    return tuple(out.values())


# ---- pins and container identity ----------------------------------------------------------------------


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def pin_key(spec: InstanceSpec, anchor: TrustAnchor | None) -> str:
    """What a pinned digest answers: image, tag or digest, and what vouched. Run options are not part of it."""
    return _hash(
        {
            "image": spec.repository,
            "tag": spec.image.tag,
            "digest": str(spec.image.digest) if spec.image.digest else None,
            "enforcement_digest": str(spec.enforcement_digest) if spec.enforcement_digest else None,
            "anchor": anchor.fingerprint if anchor is not None else None,
        }
    )


def current_pin_key(spec: InstanceSpec, lookup: Callable[[str], TrustAnchor | None]) -> str | None:
    """The pin key the spec asks for now, or None if its anchor cannot be used (no pin then counts)."""
    try:
        return pin_key(spec, spec.trust_anchor(lookup))
    except InstanceFailure:
        return None


def container_config(spec: InstanceSpec, digest: Digest) -> str:
    """Identity of the container to run: a change of run options or pinned digest means recreate."""
    r = spec.run
    return _hash(
        {
            "name": spec.name,
            "image": f"{spec.repository}@{digest}",
            "command": list(r.command) if r.command is not None else None,
            "environment": [list(kv) for kv in r.environment],
            "ports": [[p.container, p.host, p.protocol, p.host_ip] for p in r.ports],
            "volumes": [[v.source, v.target, v.read_only] for v in r.volumes],
            "restart": r.restart,
            "network": r.network,
            "labels": [list(kv) for kv in r.labels],
            "stop_timeout": r.stop_timeout_seconds,
        }
    )[:32]


def docker_create_args(spec: InstanceSpec, digest: Digest) -> tuple[dict[str, Any], dict[str, Any]]:
    """docker-py ``create_container`` keyword arguments and ``create_host_config`` ones for the instance."""
    r = spec.run
    labels = dict(r.labels)
    labels.update(
        {LABEL_MANAGED: "true", LABEL_INSTANCE: spec.name, LABEL_CONFIG: container_config(spec, digest)}
    )
    create: dict[str, Any] = {
        "image": f"{spec.repository}@{digest}",
        "name": spec.name,
        "labels": labels,
        "environment": [f"{k}={v}" for k, v in r.environment] or None,
        "stop_timeout": r.stop_timeout_seconds,
    }
    if r.command is not None:
        create["command"] = list(r.command)
    host: dict[str, Any] = {}
    if r.ports:
        create["ports"] = [(p.container, p.protocol) for p in r.ports]
        host["port_bindings"] = {
            f"{p.container}/{p.protocol}": (p.host_ip, p.host) if p.host_ip else p.host for p in r.ports
        }
    if r.volumes:
        host["binds"] = [f"{v.source}:{v.target}:{'ro' if v.read_only else 'rw'}" for v in r.volumes]
    if r.restart != "no":
        host["restart_policy"] = {"Name": r.restart}
    if r.network is not None:
        host["network_mode"] = r.network
    return create, host


# ---- stored state -------------------------------------------------------------------------------------


UpdateResult = Literal["updated", "unchanged", "failed", "rejected"]


@dataclass(frozen=True, slots=True)
class UpdateOutcome:
    """The outcome of an update request or a periodic tag check (``last_update`` of an instance)."""

    id: str | None  # the request's ticket, or "periodic"
    time: str
    result: UpdateResult
    digest: str | None = None
    previous: str | None = None
    reason: Code | None = None
    detail: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.result in ("updated", "unchanged")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "time": self.time, "result": self.result}
        for key in ("digest", "previous", "detail"):
            if (value := getattr(self, key)) is not None:
                out[key] = value
        if self.reason is not None:
            out["reason"] = self.reason.value
        return out

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> UpdateOutcome:
        reason = doc.get("reason")
        return cls(
            id=doc.get("id"),
            time=str(doc.get("time", "")),
            result=doc["result"],
            digest=doc.get("digest"),
            previous=doc.get("previous"),
            reason=Code(reason) if reason is not None else None,
            detail=doc.get("detail"),
        )


@dataclass(frozen=True, slots=True)
class InstanceState:
    """What the agent knows about one instance (the ``instances`` table: Kura's snapshot of pins)."""

    name: str
    status: Status = "pending"
    reason: str | None = None
    detail: str = ""
    pinned_digest: Digest | None = None
    #: :func:`pin_key` of the spec the digest was pinned for
    pin_key: str | None = None
    #: pin key of the last failed attempt: a non-retryable failure is not retried for the same key
    attempt_key: str | None = None
    container_id: str | None = None
    updated_at: str = ""
    #: outcome of the last update request or periodic check
    last_update: UpdateOutcome | None = None
    #: epoch seconds of the last tag check (periodic updates)
    last_check: float = 0.0

    def meta(self) -> dict[str, Any]:
        """The fields stored as JSON in the ``spec`` column."""
        return {
            "detail": self.detail,
            "pin_key": self.pin_key,
            "attempt_key": self.attempt_key,
            "last_update": self.last_update.to_dict() if self.last_update is not None else None,
            "last_check": self.last_check,
        }

    @classmethod
    def from_row(
        cls,
        name: str,
        meta: str,
        status: str,
        pinned: str | None,
        container_id: str | None,
        reason: str | None,
        updated_at: str,
    ) -> InstanceState:
        m = json.loads(meta) if meta else {}
        return cls(
            name=name,
            status=status,  # type: ignore[arg-type]
            reason=reason,
            detail=str(m.get("detail") or ""),
            pinned_digest=Digest.parse(pinned) if pinned else None,
            pin_key=m.get("pin_key"),
            attempt_key=m.get("attempt_key"),
            container_id=container_id,
            updated_at=updated_at,
            last_update=UpdateOutcome.from_dict(m["last_update"]) if m.get("last_update") else None,
            last_check=float(m.get("last_check") or 0.0),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "status": self.status,
            "pinned_digest": str(self.pinned_digest) if self.pinned_digest else None,
            "container_id": self.container_id,
            "updated_at": self.updated_at,
        }
        if self.reason:
            out["reason"] = self.reason
        if self.detail:
            out["detail"] = self.detail
        if self.last_update is not None:
            out["last_update"] = self.last_update.to_dict()
        return out


def enabled_pins(
    specs: Iterable[InstanceSpec],
    states: Mapping[str, InstanceState],
    lookup: Callable[[str], TrustAnchor | None],
) -> frozenset[Digest]:
    """Digests that allow containers: pinned by an enabled instance whose pin still answers its spec."""
    out = set()
    for spec in specs:
        state = states.get(spec.name)
        if not spec.enabled or state is None or state.pinned_digest is None:
            continue
        if state.pin_key is not None and state.pin_key == current_pin_key(spec, lookup):
            out.add(state.pinned_digest)
    return frozenset(out)


# ---- planning -----------------------------------------------------------------------------------------


class Step(StrEnum):
    NOTHING = "nothing"
    REMOVE = "remove"  # remove every container of the instance (deleted or disabled)
    PIN = "pin"  # resolve, verify and pin a digest (first time, spec changed, or an update)
    FETCH = "fetch"  # the pinned image is not on the engine: pull it by digest
    CREATE = "create"  # remove stale containers, create and start the declared one
    START = "start"  # the declared container exists but is not running
    WAIT = "wait"  # failed for a reason that retrying the same spec cannot fix


@dataclass(frozen=True, slots=True)
class ObservedContainer:
    id: str
    running: bool
    config: str


@dataclass(frozen=True, slots=True)
class Observed:
    containers: tuple[ObservedContainer, ...] = ()
    image_present: bool = False


def plan(
    spec: InstanceSpec | None,
    state: InstanceState | None,
    observed: Observed,
    key: str,
    *,
    update: bool = False,
) -> Step:
    """The next step towards the declared instance. ``key`` is :func:`current_pin_key` of the spec."""
    if spec is None or not spec.enabled:
        return Step.REMOVE if observed.containers else Step.NOTHING
    pinned = state is not None and state.pinned_digest is not None and state.pin_key == key
    if not pinned or update:
        if (
            not update
            and state is not None
            and state.status == "failed"
            and state.attempt_key == key
            and state.reason not in RETRYABLE
        ):
            return Step.WAIT
        return Step.PIN
    assert state is not None and state.pinned_digest is not None
    if not observed.image_present:
        return Step.FETCH
    want = container_config(spec, state.pinned_digest)
    if len(observed.containers) != 1 or observed.containers[0].config != want:
        return Step.CREATE
    if not observed.containers[0].running:
        return Step.START
    return Step.NOTHING


def update_due(spec: InstanceSpec, state: InstanceState | None, now: float) -> bool:
    """A periodic tag check is due (only for tags: a digest never moves)."""
    if spec.update_interval_seconds is None or spec.image.tag is None or not spec.enabled:
        return False
    if state is None or state.pinned_digest is None:
        return False
    return now >= state.last_check + spec.update_interval_seconds


def next_check(specs: Iterable[InstanceSpec], states: Mapping[str, InstanceState]) -> float | None:
    """Epoch seconds of the earliest periodic check, if any instance has one."""
    times = [
        states[s.name].last_check + s.update_interval_seconds
        for s in specs
        if s.update_interval_seconds is not None
        and s.image.tag is not None
        and s.enabled
        and s.name in states
        and states[s.name].pinned_digest is not None
    ]
    return min(times) if times else None


# -- what a spec that arrives over MQTT may ask for -----------------------------------------------------

#: grants a device's configuration can give remote specs ([mqtt] remote_instances_allow)
REMOTE_GRANTS = ("host_network", "sensitive_binds")
#: host paths whose bind mount gives a container the host (or its secrets): refused for remote specs
SENSITIVE_PATHS = (
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/proc", "/root", "/run", "/sbin",
    "/sys", "/usr", "/var/lib", "/var/run", "/var/log",
)  # fmt: skip


def _exposes(source: str, path: str) -> bool:
    """A bind of ``source`` exposes ``path``: it is ``path``, contains it, or lies inside it (``/`` itself
    counts only as a whole: every path lies inside it)."""
    path = path.rstrip("/") or "/"
    if path == "/":
        return source == "/"
    return source == path or path.startswith(source.rstrip("/") + "/") or source.startswith(path + "/")


def remote_problem(spec: InstanceSpec, granted: Iterable[str], protected: Iterable[str] = ()) -> str | None:
    """Why a spec that arrived over MQTT asks for more than this device lets remote specs have, or None.

    Whoever can publish a spec would otherwise run a container with the host's network or a bind of ``/``
    or ``/etc``, as root. (An inline anchor needs no grant: it only ever covers the spec's own repository.)
    """
    grants = set(granted)
    what = f"instance {spec.name!r}"
    if spec.run.network == "host" and "host_network" not in grants:
        return f"{what}: network 'host' is not permitted for specs sent over MQTT on this device"
    if "sensitive_binds" not in grants:
        for mount in spec.run.volumes:
            source = posixpath.normpath(mount.source)
            if not source.startswith("/"):
                continue  # a named volume, not a host path
            for path in (*SENSITIVE_PATHS, *protected):
                if _exposes(source, path):
                    return (
                        f"{what}: the bind mount of {mount.source} exposes {path} of the host, which specs "
                        "sent over MQTT may not ask for on this device"
                    )
    return None
