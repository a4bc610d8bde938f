"""The one adapter over the Docker Engine API (docker-py's low-level client)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, cast

import docker
import docker.constants
import docker.errors
import docker.tls
import docker.utils
import requests

from agent.core.digest import Digest
from agent.core.facts import (
    PLUGIN_ACTIONS,
    ContainerEvent,
    ContainerFacts,
    ListedContainer,
    PluginEvent,
    allowlist_digests,
    digest_or_none,
    facts_for_create,
    facts_from_inspect,
    facts_from_listing,
    parse_event,
    repo_digests_of,
)
from agent.core.plugins import ManagedPlugin
from agent.errors import EngineError

log = logging.getLogger(__name__)

MINIMUM_API_VERSION = docker.constants.MINIMUM_DOCKER_API_VERSION
DEFAULT_API_VERSION = docker.constants.DEFAULT_DOCKER_API_VERSION


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".") if p.isdigit())


#: how long a create-time image lookup by reference is reused
REF_CACHE_SECONDS = 5.0

_CONNECTION_ERRORS = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, OSError)


def _seconds(timeout: float | None) -> int:
    """docker-py hands its timeout to requests, which takes a float, or None for none; the stubs say int."""
    return cast(int, timeout)


class Gone(Exception):
    """The container (or image) no longer exists: not an error for enforcement."""


class Engine:
    """Container facts and actions. Thread-safe: each thread gets its own HTTP connection pool."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url
        self.timeout = timeout
        self._local = threading.local()
        # image id -> image inspect: an image id names immutable content, so the cache never goes stale
        self._images: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._images_lock = threading.Lock()
        #: image reference -> (expiry, inspect data or None), for create-time answers only
        self._by_ref: OrderedDict[str, tuple[float, dict[str, Any] | None]] = OrderedDict()
        self._version: str | None = None

    def _client(self) -> docker.APIClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._new_client(self.timeout)
            self._local.client = client
        return client

    def _tls(self) -> docker.tls.TLSConfig | bool:
        """TCP engines: the docker CLI's TLS settings (DOCKER_TLS_VERIFY, DOCKER_CERT_PATH), as docker-py
        reads them; a unix socket needs none."""
        if not self.url.startswith(("tcp://", "https://")):
            return False
        tls = docker.utils.kwargs_from_env().get("tls")
        return tls if isinstance(tls, docker.tls.TLSConfig) else False

    def _new_client(self, timeout: float | None) -> docker.APIClient:
        if self._version is None:
            self._version = self._negotiate()
        tls = self._tls()
        try:
            client = docker.APIClient(
                base_url=self.url, version=self._version, timeout=_seconds(timeout), tls=tls
            )
        except docker.errors.DockerException as exc:
            raise EngineError(f"cannot use the Docker engine at {self.url}: {exc}") from None
        # a socket needs no proxy; and with the engine's own CA, requests must not swap it for the bundle
        # named by REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE (which trust_env would do)
        if self.url.startswith("unix://") or tls:
            client.trust_env = False
        return client

    def _negotiate(self) -> str:
        """Pick the API version once; unlike docker-py's "auto", close the probe's socket on failure."""
        if self.url.startswith("unix://"):
            # docker-py leaks the socket of a failed Unix connect: find out ourselves first
            path = self.url[len("unix://") :]
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                try:
                    s.connect(path)
                except OSError as exc:
                    raise EngineError(
                        f"cannot reach the Docker engine at {self.url}: {exc.strerror or exc}"
                    ) from None
        tls = self._tls()
        try:
            probe = docker.APIClient(
                base_url=self.url, version=MINIMUM_API_VERSION, timeout=_seconds(self.timeout), tls=tls
            )
        except docker.errors.DockerException as exc:
            raise EngineError(f"cannot use the Docker engine at {self.url}: {exc}") from None
        if tls:
            probe.trust_env = False
        try:
            server = str(probe.version(api_version=False).get("ApiVersion", MINIMUM_API_VERSION))
        except (docker.errors.DockerException, *_CONNECTION_ERRORS) as exc:
            raise EngineError(f"cannot reach the Docker engine at {self.url}: {exc}") from None
        finally:
            probe.close()
        return str(min(server, DEFAULT_API_VERSION, key=_version_key))

    def close(self) -> None:
        """Close this thread's connection (other threads' close when their thread ends)."""
        client = getattr(self._local, "client", None)
        if client is not None:
            client.close()
            self._local.client = None

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except docker.errors.NotFound as exc:
            raise Gone(str(exc)) from None
        except docker.errors.APIError as exc:
            raise EngineError(f"engine refused to {what}: {exc.explanation or exc}") from None
        except _CONNECTION_ERRORS as exc:
            self._local.client = None
            raise EngineError(f"cannot reach the Docker engine at {self.url} to {what}: {exc}") from None

    # -- facts -----------------------------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        info: dict[str, Any] = self._call("answer a version query", self._client().version)
        return info

    def info(self) -> dict[str, Any]:
        """``GET /info``: system-wide facts (authorization plugins, engine clock)."""
        info: dict[str, Any] = self._call("answer an info query", self._client().info)
        return info

    def authorization_plugins(self) -> tuple[str, ...]:
        """The authorization plugins dockerd asks, by name (``GET /info``)."""
        plugins = (self.info().get("Plugins") or {}).get("Authorization") or ()
        return tuple(str(p) for p in plugins)

    def managed_plugins(self) -> tuple[ManagedPlugin, ...]:
        """The engine's managed plugins (``GET /plugins``), parsed at the edge."""
        items = self._call("list plugins", self._client().plugins)
        listed = (ManagedPlugin.from_raw(i) for i in items or () if isinstance(i, dict))
        return tuple(p for p in listed if p is not None)

    def container_facts(self, container_id: str) -> ContainerFacts:
        """Raises Gone if the container vanished."""
        c = self._client()
        container = self._call("inspect a container", c.inspect_container, container_id)
        image = self._image(container.get("Image", ""))
        return facts_from_inspect(container, image)

    def listed_facts(self, container_id: str) -> ContainerFacts:
        """What the container list says of one container (no runtime facts), without waiting for its lock.

        dockerd holds a container's lock for the whole of its start, and an inspect waits on it; the list is
        read from its in-memory view and answers meanwhile. Raises Gone if the engine has no such container.
        """
        items = self._call(
            "list containers", self._client().containers, all=True, trunc=False, filters={"id": container_id}
        )
        for item in items or ():
            if isinstance(item, dict) and item.get("Id") == container_id:
                return facts_from_listing(item, self._image(str(item.get("ImageID", ""))))
        raise Gone(f"no container {container_id[:12]} on the engine")

    def facts_for_create(self, request: dict[str, Any], name: str) -> ContainerFacts:
        """What a create request would make (its image looked up by the reference it names).

        The lookup by reference is reused for a few seconds: a tag that moves meanwhile can only make the
        create-time answer wrong, never the start's, which is decided on the created container itself.
        """
        ref = str(request.get("Image", ""))
        now = time.monotonic()
        with self._images_lock:
            hit = self._by_ref.get(ref)
        if hit is not None and hit[0] > now:
            image = hit[1]
        else:
            try:
                image = self._call("inspect an image", self._client().inspect_image, ref) if ref else None
            except Gone:
                image = None
            with self._images_lock:
                self._by_ref[ref] = (now + REF_CACHE_SECONDS, image if isinstance(image, dict) else None)
                while len(self._by_ref) > 256:
                    self._by_ref.popitem(last=False)
        return facts_for_create(request, name, image if isinstance(image, dict) else None)

    def _image(self, image_id: str) -> dict[str, Any] | None:
        with self._images_lock:
            cached = self._images.get(image_id)
            if cached is not None:
                self._images.move_to_end(image_id)
                return cached
        try:
            image: dict[str, Any] = self._call("inspect an image", self._client().inspect_image, image_id)
        except Gone:
            return None
        # an image id names immutable content; only RepoDigests may grow later (a pull or push of the same
        # image), which can only turn "not allowed" into "allowed": callers re-inspect before a negative verdict
        with self._images_lock:
            self._images[image_id] = image
            while len(self._images) > 512:
                self._images.popitem(last=False)
        return image

    def image_digests(self, ref: str) -> tuple[Digest, ...]:
        """What to allowlist for a local image (a tag, a digest reference or an id): its registry digests,
        or its image id when it has none. Raises Gone when the engine has no such image."""
        image: dict[str, Any] = self._call("inspect an image", self._client().inspect_image, ref)
        return allowlist_digests(repo_digests_of(image), digest_or_none(image.get("Id")))

    def forget_image(self, image_id: str) -> bool:
        """Drop a cached image inspect; True if there was one."""
        with self._images_lock:
            return self._images.pop(image_id, None) is not None

    def container_ids(self) -> list[str]:
        """Every container, running or not (the ``docker ps -a`` set)."""
        items = self._call("list containers", self._client().containers, all=True, trunc=False)
        return [str(c["Id"]) for c in items]

    # -- actions ---------------------------------------------------------------------------------

    def stop_and_remove(self, container_id: str, grace_seconds: int) -> str:
        """Remove a container; with a grace period, stop it first (SIGTERM, SIGKILL after the grace).

        Without one, ``remove --force`` sends SIGKILL at once, also to a paused container, which the
        kernel kills where it stands: its processes execute no further instruction (``docker stop`` would
        thaw it to deliver SIGTERM). Returns 'removed' or 'vanished'.
        """
        c = self._client()
        try:
            if grace_seconds > 0:
                self._call("stop a container", c.stop, container_id, timeout=grace_seconds)
            self._call("remove a container", c.remove_container, container_id, force=True)
        except Gone:
            return "vanished"
        except EngineError as exc:
            # 409: removal already in progress (e.g. started with --rm): it is going away by itself
            if "already in progress" in str(exc) or "is being removed" in str(exc):
                return "vanished"
            raise
        return "removed"

    def pause(self, container_id: str) -> None:
        self._call("pause a container", self._client().pause, container_id)

    def unpause(self, container_id: str) -> None:
        self._call("unpause a container", self._client().unpause, container_id)

    # -- managed containers (agent/runtime/instances.py) -----------------------------------------

    def pull(self, repository: str, reference: str, auth: dict[str, str] | None = None) -> None:
        """Pull ``repository`` at a tag or digest; raises EngineError with the engine's reason."""
        stream = self._call(
            f"pull {repository}",
            self._client().pull,
            repository,
            tag=reference,
            stream=True,
            decode=True,
            auth_config=auth,
        )
        try:
            for item in stream:  # the engine reports failures inside a 200 stream
                if isinstance(item, dict) and item.get("error"):
                    raise EngineError(f"engine could not pull {repository}:{reference}: {item['error']}")
        except _CONNECTION_ERRORS as exc:
            self._local.client = None
            raise EngineError(f"lost the Docker engine while pulling {repository}: {exc}") from None

    def image_present(self, ref: str) -> bool:
        try:
            self._call("inspect an image", self._client().inspect_image, ref)
        except Gone:
            return False
        return True

    def run_container(self, create: dict[str, Any], host: dict[str, Any]) -> str:
        """Create (docker-py ``create_container`` and ``create_host_config`` arguments) and start.

        A container that cannot start is removed again. Returns its id.
        """
        c = self._client()
        created = self._call(
            "create a container", c.create_container, host_config=c.create_host_config(**host), **create
        )
        container_id = str(created["Id"])
        try:
            self._call("start a container", c.start, container_id)
        except (EngineError, Gone):
            try:
                self._call("remove a container", c.remove_container, container_id, force=True)
            except (EngineError, Gone):
                log.warning("cannot remove container %s that failed to start", container_id[:12])
            raise
        return container_id

    def start(self, container_id: str) -> None:
        self._call("start a container", self._client().start, container_id)

    def labelled_containers(self, label: str) -> tuple[ListedContainer, ...]:
        """Every container (running or not) with ``label`` (``key`` or ``key=value``)."""
        items = self._call(
            "list containers", self._client().containers, all=True, trunc=False, filters={"label": [label]}
        )
        listed = (ListedContainer.from_raw(i) for i in items if isinstance(i, dict))
        return tuple(c for c in listed if c is not None)

    # -- events ----------------------------------------------------------------------------------

    def open_events(self, since: str | None) -> EventStream:
        """Open the event stream (container lifecycles, plugin installs), replaying from ``since`` if given."""
        client = self._new_client(None)
        # create: the container's start may be gated; die: only a managed instance's is kept
        # (ContainerEvent.from_raw), so that an exited instance is recreated at once
        events = dict.fromkeys(["create", "start", "die", "destroy", *PLUGIN_ACTIONS])
        filters = {"type": ["container", "plugin"], "event": list(events)}
        stream = self._call("stream events", client.events, since=since, filters=filters, decode=True)
        return EventStream(client, stream)


class EventStream:
    """An open /events stream that another thread may close to unblock the reader."""

    def __init__(self, client: docker.APIClient, stream: Any) -> None:
        self._client = client
        self._stream = stream

    def __iter__(self) -> Iterator[ContainerEvent | PluginEvent]:
        for raw in self._stream:
            if isinstance(raw, dict) and (event := parse_event(raw)) is not None:
                yield event

    def close(self) -> None:
        try:
            self._stream.close()
        except Exception:  # closing a half-dead socket may raise anything; we are done with it either way
            log.debug("closing the event stream raised", exc_info=True)
        try:
            self._client.close()
        except Exception:
            log.debug("closing the event client raised", exc_info=True)
