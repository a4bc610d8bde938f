"""Engine facts as typed values: raw Docker dicts are parsed here and never reach the core."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.core.constraints import RuntimeFacts
from agent.core.digest import Digest
from agent.core.imageref import ImageRef
from agent.errors import ImageGuardError

#: the labels of managed instances' containers (agent/core/instances.py)
MANAGED_LABEL = "dev.imageguard.managed"
INSTANCE_LABEL = "dev.imageguard.instance"


@dataclass(frozen=True, slots=True)
class ContainerEvent:
    """A container lifecycle event we act on. ``time_nano`` lets the stream resume after a reconnect."""

    container_id: str
    action: str
    time_nano: int
    image: str = ""
    name: str = ""
    #: the managed instance the container belongs to ("" for any other)
    instance: str = ""

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any]) -> ContainerEvent | None:
        """Parse one /events record; anything that is not a container lifecycle event we act on is dropped."""
        if raw.get("Type") != "container":
            return None
        action = raw.get("Action") or raw.get("status") or ""
        actor = raw.get("Actor") or {}
        attrs = actor.get("Attributes") or {}
        # every container's create (its start is gated on it), start and destroy; the die of a managed
        # instance's container (it is recreated)
        if action not in ("create", "start", "destroy") and not (
            action == "die" and attrs.get(MANAGED_LABEL) == "true"
        ):
            return None
        cid = actor.get("ID") or raw.get("id")
        if not isinstance(cid, str) or not cid:
            return None
        time_nano = raw.get("timeNano")
        if not isinstance(time_nano, int):
            t = raw.get("time")
            time_nano = int(t) * 1_000_000_000 if isinstance(t, int) else 0
        return cls(
            container_id=cid,
            action=action,
            time_nano=time_nano,
            image=str(attrs.get("image", "")),
            name=str(attrs.get("name", "")),
            instance=str(attrs.get(INSTANCE_LABEL, "")),
        )


@dataclass(frozen=True, slots=True)
class PluginEvent:
    """A managed plugin was installed or enabled: who answers dockerd may have changed."""

    name: str
    action: str
    time_nano: int

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any]) -> PluginEvent | None:
        if raw.get("Type") != "plugin" or raw.get("Action") not in PLUGIN_ACTIONS:
            return None
        actor = raw.get("Actor") or {}
        name = (actor.get("Attributes") or {}).get("name") or actor.get("ID") or ""
        t = raw.get("timeNano")
        return cls(str(name), str(raw["Action"]), t if isinstance(t, int) else 0)


PLUGIN_ACTIONS = ("install", "enable", "create")


def parse_event(raw: Mapping[str, Any]) -> ContainerEvent | PluginEvent | None:
    """One /events record as the event we act on, or None."""
    return ContainerEvent.from_raw(raw) or PluginEvent.from_raw(raw)


@dataclass(frozen=True, slots=True)
class ContainerFacts:
    """What the engine says about one container and its image, at one moment."""

    id: str
    name: str
    #: the image as the user named it (Config.Image): a tag reference, a digest reference or an image id
    image: str
    image_id: Digest | None
    #: ``repo@sha256:...`` entries of the image (RepoDigests)
    repo_digests: tuple[tuple[ImageRef, Digest], ...] = ()
    state: str = "unknown"
    labels: Mapping[str, str] = field(default_factory=dict)
    #: how it is started (None: not known, e.g. a container gone before inspection)
    runtime: RuntimeFacts | None = None

    @property
    def digests(self) -> tuple[Digest, ...]:
        """Every digest that identifies the image: repo digests first, then the image id."""
        out: list[Digest] = []
        for _, d in self.repo_digests:
            if d not in out:
                out.append(d)
        if self.image_id is not None and self.image_id not in out:
            out.append(self.image_id)
        return tuple(out)

    @property
    def image_ref(self) -> ImageRef | None:
        """The reference the user started, if it names a repository (not a bare image id)."""
        try:
            ref = ImageRef.parse(self.image)
        except ImageGuardError:
            return None
        # ``sha256:<hex>`` parses as repository library/sha256, a bare ``<hex>`` as library/<hex>
        if self.image_id is not None and ref.repository in ("library/sha256", f"library/{self.image_id.hex}"):
            return None
        return ref

    @property
    def short_id(self) -> str:
        return self.id[:12]


def parse_repo_digest(text: str) -> tuple[ImageRef, Digest] | None:
    """``registry/repo@sha256:...`` as listed in RepoDigests; malformed entries are ignored."""
    name, sep, _ = text.partition("@")
    if not sep:
        return None
    try:
        ref = ImageRef.parse(text)
    except ImageGuardError:
        return None
    if ref.digest is None or not name:
        return None
    return ref, ref.digest


def repo_digests_of(image: Mapping[str, Any] | None) -> tuple[tuple[ImageRef, Digest], ...]:
    """The well-formed ``RepoDigests`` of an image inspect (None: the image is gone)."""
    return tuple(
        parsed
        for entry in (image or {}).get("RepoDigests") or ()
        if isinstance(entry, str) and (parsed := parse_repo_digest(entry))
    )


def digest_or_none(text: Any) -> Digest | None:
    """An image id as the engine reports it, or None when it is missing or malformed."""
    try:
        return Digest.parse(str(text or ""))
    except ImageGuardError:
        return None


def facts_from_inspect(container: Mapping[str, Any], image: Mapping[str, Any] | None) -> ContainerFacts:
    """Build facts from ``GET /containers/{id}/json`` and ``GET /images/{id}/json`` (image may be gone)."""
    cfg = container.get("Config") or {}
    state = container.get("State") or {}
    image_id = digest_or_none(container.get("Image"))
    repo_digests = repo_digests_of(image)
    return ContainerFacts(
        id=str(container.get("Id", "")),
        name=str(container.get("Name", "")).lstrip("/"),
        image=str(cfg.get("Image", "")),
        image_id=image_id,
        repo_digests=tuple(repo_digests),
        state=str(state.get("Status", "unknown")),
        labels=dict(cfg.get("Labels") or {}),
        runtime=RuntimeFacts.from_host_config(
            container.get("HostConfig") or {},
            entrypoint=cfg.get("Entrypoint"),
            cmd=cfg.get("Cmd"),
            image_config=(image or {}).get("Config"),
            mounts=[m for m in container.get("Mounts") or () if isinstance(m, Mapping)],
        ),
    )


@dataclass(frozen=True, slots=True)
class ListedContainer:
    """One entry of the engine's container list (``GET /containers/json``), parsed at the edge."""

    id: str
    state: str
    labels: Mapping[str, str]

    @property
    def running(self) -> bool:
        return self.state == "running"

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any]) -> ListedContainer | None:
        cid, labels = raw.get("Id"), raw.get("Labels") or {}
        if not isinstance(cid, str) or not isinstance(labels, Mapping):
            return None
        return cls(cid, str(raw.get("State") or ""), {str(k): str(v) for k, v in labels.items()})


def facts_from_listing(listed: Mapping[str, Any], image: Mapping[str, Any] | None) -> ContainerFacts:
    """Facts from a container's entry in ``GET /containers/json`` and its image's inspect.

    The list is read from dockerd's in-memory view without the container's lock, so it answers while a start
    holds that lock; it does not say how the container is started (``runtime`` is None): enough to block an
    image that is not allowed, never enough to allow a container (runtime constraints are unknown).
    """
    names = listed.get("Names")
    name = str(names[0]).lstrip("/") if isinstance(names, list) and names else ""
    labels = listed.get("Labels")
    return ContainerFacts(
        id=str(listed.get("Id", "")),
        name=name,
        image=str(listed.get("Image", "")),
        image_id=digest_or_none(listed.get("ImageID")),
        repo_digests=repo_digests_of(image),
        state=str(listed.get("State") or "unknown"),
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else {},
    )


def facts_for_create(
    request: Mapping[str, Any], name: str, image: Mapping[str, Any] | None
) -> ContainerFacts:
    """Facts about a container a ``POST /containers/create`` would make, from its body and the image.

    ``image`` is the inspect data of the image the request names (None: not on the engine).
    """
    img = image or {}
    host = request.get("HostConfig")
    return ContainerFacts(
        id="",
        name=name,
        image=str(request.get("Image", "")),
        image_id=digest_or_none(img.get("Id")),
        repo_digests=repo_digests_of(image),
        state="created",
        labels={str(k): str(v) for k, v in (request.get("Labels") or {}).items()},
        runtime=RuntimeFacts.from_host_config(
            host if isinstance(host, Mapping) else {},
            entrypoint=request.get("Entrypoint"),
            cmd=request.get("Cmd"),
            image_config=img.get("Config"),
        ),
    )


def facts_from_event(event: ContainerEvent) -> ContainerFacts:
    """What a start event alone says of a container (it was gone before it could be inspected)."""
    image_id: Digest | None = None
    repo_digests: tuple[tuple[ImageRef, Digest], ...] = ()
    if (parsed := parse_repo_digest(event.image)) is not None:
        repo_digests = (parsed,)
    else:
        try:
            image_id = Digest.parse(event.image)
        except ImageGuardError:
            image_id = None
    return ContainerFacts(event.container_id, event.name, event.image, image_id, repo_digests, "gone")


def allowlist_digests(
    repo_digests: Iterable[tuple[ImageRef, Digest]], image_id: Digest | None
) -> tuple[Digest, ...]:
    """The digests to allowlist for an image: its registry (manifest) digests, which name the same content
    on every device; a local build that was never pushed or pulled has only its image id."""
    out: list[Digest] = []
    for _, d in repo_digests:
        if d not in out:
            out.append(d)
    if not out and image_id is not None:
        out.append(image_id)
    return tuple(out)
