"""The one adapter between ImageGuard and container registries (OCI distribution API over ``requests``;
why our own: docs/adr/0002).

Everything a registry sends is untrusted: every response body is streamed under a hard byte cap, every
operation (one public method call, including token requests and redirects) runs under one deadline, and
every manifest or blob fetched by digest must hash to that digest. Registry JSON becomes typed
:class:`Manifest` / :class:`Descriptor` records here and nowhere else.

Transport rules:
- HTTPS by default, verified against the system CAs or the registry's ``ca_bundle``.
- Plain HTTP only for hosts listed as insecure (``registries[].insecure`` or ``insecure_hosts``). Unlike
  docker, loopback addresses get no exception: ``127.0.0.1:5000`` must be listed like any other host.
- Auth follows the ``WWW-Authenticate`` challenge: ``Bearer`` (token from the realm, cached per scope
  until it expires) or ``Basic``. The challenge is remembered per host, so later requests authenticate
  up front instead of paying a 401 round trip. Passwords are read on use and never appear in messages.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import requests
import requests.adapters
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from agent.adapters.dockerhost import DockerHost
from agent.config import Config, RegistryConfig
from agent.core.digest import Digest
from agent.core.imageref import DEFAULT_REGISTRY, ImageRef
from agent.errors import Code, ConfigError, DigestError, RegistryError, RegistryUnreachable

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_MEDIA_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)
INDEX_MEDIA_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)

MiB = 1024 * 1024
#: cap for bodies we only read for an error message or a token
_SMALL_BODY = 64 * 1024
_CHUNK = 64 * 1024
_REDIRECTS = {301, 302, 303, 307, 308}
_PARAM = re.compile(r'\s*([a-zA-Z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


@dataclass(frozen=True, slots=True)
class Repository:
    """Where blobs and manifests live: ``registry`` host[:port] and repository ``name``."""

    registry: str
    name: str

    @classmethod
    def of(cls, ref: ImageRef) -> Repository:
        return cls(ref.registry, ref.repository)

    def __str__(self) -> str:
        return f"{self.registry}/{self.name}"


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    artifact_type: str | None = None

    @classmethod
    def from_json(cls, obj: object, what: str) -> Descriptor:
        """Parse an OCI descriptor; anything malformed is a :class:`RegistryError` naming ``what``."""
        if not isinstance(obj, dict):
            raise RegistryError(f"{what}: descriptor is not a JSON object")
        media_type, size, annotations = obj.get("mediaType"), obj.get("size"), obj.get("annotations", {})
        artifact_type = obj.get("artifactType")
        if not isinstance(media_type, str) or not media_type:
            raise RegistryError(f"{what}: descriptor has no mediaType")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RegistryError(f"{what}: descriptor size is not a non-negative integer")
        if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
        ):
            raise RegistryError(f"{what}: descriptor annotations must map strings to strings")
        if artifact_type is not None and not isinstance(artifact_type, str):
            raise RegistryError(f"{what}: descriptor artifactType is not a string")
        try:
            digest = Digest(obj.get("digest"))  # type: ignore[arg-type]
        except (DigestError, AttributeError):
            raise RegistryError(f"{what}: descriptor digest is not 'sha256:<64 hex>'") from None
        return cls(media_type, digest, size, dict(annotations), artifact_type)

    def to_json(self) -> dict[str, Any]:
        """go-containerregistry's field order, so documents we write match cosign's byte for byte."""
        out: dict[str, Any] = {"mediaType": self.media_type, "size": self.size, "digest": self.digest.value}
        if self.annotations:
            out["annotations"] = dict(sorted(self.annotations.items()))
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        return out


@dataclass(frozen=True)
class Manifest:
    """A manifest or index exactly as served: ``digest`` is the sha256 of ``raw``."""

    media_type: str
    digest: Digest
    raw: bytes
    parsed: Mapping[str, Any]

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_MEDIA_TYPES

    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.raw))

    def layers(self, limit: int = 1000) -> tuple[Descriptor, ...]:
        return self._descriptors("layers", limit)

    def manifests(self, limit: int = 1000) -> tuple[Descriptor, ...]:
        return self._descriptors("manifests", limit)

    def config(self) -> Descriptor | None:
        cfg = self.parsed.get("config")
        return None if cfg is None else Descriptor.from_json(cfg, f"manifest {self.digest} config")

    def _descriptors(self, key: str, limit: int) -> tuple[Descriptor, ...]:
        items = self.parsed.get(key, [])
        if not isinstance(items, list):
            raise RegistryError(f"manifest {self.digest}: '{key}' is not a list")
        if len(items) > limit:
            raise RegistryError(f"manifest {self.digest}: {len(items)} {key}, more than the limit of {limit}")
        return tuple(
            Descriptor.from_json(d, f"manifest {self.digest} {key}[{i}]") for i, d in enumerate(items)
        )


def parse_manifest(raw: bytes, media_type: str | None, what: str) -> Manifest:
    """Parse manifest bytes; ``media_type`` is the Content-Type (the body's own mediaType if absent)."""
    try:
        parsed = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise RegistryError(f"{what}: the registry sent a body that is not JSON") from None
    if not isinstance(parsed, dict):
        raise RegistryError(f"{what}: the manifest is not a JSON object")
    body_type = parsed.get("mediaType")
    if media_type in (None, "", "application/json", "application/octet-stream"):
        media_type = body_type if isinstance(body_type, str) else None
    if parsed.get("schemaVersion") == 1 or (media_type or "").startswith(
        "application/vnd.docker.distribution.manifest.v1"
    ):
        raise RegistryError(f"{what}: Docker schema 1 manifests are not supported; push the image again")
    if media_type not in MANIFEST_MEDIA_TYPES:
        raise RegistryError(f"{what}: unexpected manifest media type {media_type!r}")
    if isinstance(body_type, str) and body_type != media_type:
        raise RegistryError(f"{what}: served as {media_type} but the document says {body_type}")
    return Manifest(media_type, Digest.of(raw), raw, parsed)


def go_json(obj: Any) -> bytes:
    """Serialise like Go's encoding/json (compact, HTML-safe escapes), for byte compatibility with cosign."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(ch, esc)
    return text.encode("utf-8")


@dataclass
class _Response:
    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str


class _Deadline:
    """One operation's time limit, enforced on the sockets themselves.

    Socket timeouts bound each ``recv``, not the whole answer: a peer that trickles one header byte per
    second never trips them. So every socket used under a deadline is registered here (see
    :class:`_WatchedHTTPConnection`), and a timer shuts them down when the deadline passes; the blocked read
    returns at once and the operation fails as ``registry-unreachable``.
    """

    def __init__(self, seconds: float, what: str) -> None:
        self.end = time.monotonic() + seconds
        self.seconds = seconds
        self.what = what
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def remaining(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0 or self.expired:
            raise self.error()
        return left

    def error(self) -> RegistryUnreachable:
        return RegistryUnreachable(
            f"{self.what}: no complete answer within {self.seconds:g}s; the registry is slow or stalled"
        )

    def watch(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            if self.expired:
                _shutdown(sock)
                return
            self._sockets.append(sock)
            if self._timer is None:
                self._timer = threading.Timer(max(0.0, self.end - time.monotonic()), self._expire)
                self._timer.daemon = True
                self._timer.start()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _shutdown(sock)

    def __enter__(self) -> _Deadline:
        _current.deadline = self
        return self

    def __exit__(self, *exc: object) -> None:
        _current.deadline = None
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._sockets.clear()


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv; close() alone may not


#: the deadline of the operation this thread is running (a RegistryClient is used by one thread at a time)
_current = threading.local()


def _watch(sock: socket.socket | None) -> None:
    deadline: _Deadline | None = getattr(_current, "deadline", None)
    if deadline is not None:
        deadline.watch(sock)


class _WatchedHTTPConnection(HTTPConnection):
    def connect(self) -> None:
        super().connect()
        _watch(self.sock)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _watch(self.sock)  # a kept-alive socket joins the deadline of the request it now carries
        super().request(*args, **kwargs)


class _WatchedHTTPSConnection(HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        _watch(self.sock)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _watch(self.sock)
        super().request(*args, **kwargs)


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _DeadlineAdapter(requests.adapters.HTTPAdapter):
    """``requests``' adapter with connections that honour :class:`_Deadline` (urllib3's pool classes)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


@dataclass
class _Token:
    value: str
    expires: float


class RegistryClient:
    """Talks to any number of registries; safe to reuse for many operations (not thread-safe)."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        registries: Iterable[RegistryConfig] = (),
        insecure_hosts: Iterable[str] = (),
        timeout: float = 10.0,
        deadline: float = 30.0,
        max_manifest_bytes: int = 4 * MiB,
        max_blob_bytes: int = 1 * MiB,
        max_redirects: int = 5,
        docker_host: DockerHost | None = None,
    ) -> None:
        #: what the host's Docker knows (credentials, certs.d, insecure registries), for hosts the
        #: configuration does not name; None: nothing from outside the configuration
        self.docker_host = docker_host
        merged = {r.host: r for r in (config.registries if config else ())}
        merged.update({r.host: r for r in registries})
        self._registries = merged
        self._insecure = set(insecure_hosts) | {h for h, r in merged.items() if r.insecure}
        self.timeout = timeout
        self.deadline = deadline
        self.max_manifest_bytes = max_manifest_bytes
        self.max_blob_bytes = max_blob_bytes
        self.max_redirects = max_redirects
        #: every HTTP request sent (token requests and redirect hops included), for benchmarks
        self.request_count = 0
        #: whether the last manifest PUT was answered with ``OCI-Subject``
        self.last_push_indexed_subject = False
        self._session = requests.Session()
        self._session.trust_env = False  # no proxies or .netrc credentials from the environment
        for prefix in ("http://", "https://"):
            self._session.mount(prefix, _DeadlineAdapter())
        self._challenges: dict[str, tuple[str, dict[str, str]]] = {}
        self._tokens: dict[tuple[str, str], _Token] = {}

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reading --------------------------------------------------------------------------------

    def resolve(self, ref: ImageRef) -> Digest:
        """The digest a reference names. A digest reference costs no request: signatures bind the digest,
        and the image manifest itself need not be present (nor fetched) to check them, as with cosign."""
        if ref.digest is not None:
            return ref.digest
        return self.get_manifest(Repository.of(ref), ref.tag or "latest").digest

    def get_manifest(
        self, repo: Repository, reference: str | Digest, *, accept: Iterable[str] = MANIFEST_MEDIA_TYPES
    ) -> Manifest:
        """Fetch a manifest or index by tag or digest. The body must hash to the digest asked for, and to
        the ``Docker-Content-Digest`` the registry announces."""
        found = self._get_manifest(repo, reference, tuple(accept))
        if found is None:
            raise RegistryError(
                f"{repo}: manifest {reference} not found; check the image name and tag",
                code=Code.REGISTRY_NOT_FOUND,
            )
        return found

    def find_manifest(
        self, repo: Repository, reference: str | Digest, *, accept: Iterable[str] = MANIFEST_MEDIA_TYPES
    ) -> Manifest | None:
        """Like :meth:`get_manifest`, but a missing manifest (404) is ``None``."""
        return self._get_manifest(repo, reference, tuple(accept))

    def _get_manifest(
        self, repo: Repository, reference: str | Digest, accept: tuple[str, ...]
    ) -> Manifest | None:
        what = f"{repo}: manifest {reference}"
        resp = self._call(
            repo,
            "GET",
            f"manifests/{reference}",
            what=what,
            max_bytes=self.max_manifest_bytes,
            headers={"Accept": ", ".join(accept)},
            missing_ok=True,
        )
        if resp is None:
            return None
        manifest = parse_manifest(resp.body, _content_type(resp.headers), what)
        if manifest.media_type not in accept:
            raise RegistryError(
                f"{what}: expected {' or '.join(accept)}, the registry sent {manifest.media_type}"
            )
        if isinstance(reference, Digest) and manifest.digest != reference:
            raise _mismatch(what, reference, manifest.digest)
        announced = resp.headers.get("Docker-Content-Digest")
        if announced and announced.strip() != manifest.digest.value:
            raise _mismatch(what, announced.strip(), manifest.digest)
        return manifest

    def head_manifest(self, repo: Repository, reference: str | Digest) -> Descriptor | None:
        """The descriptor (media type, digest, size) of a manifest, from a HEAD; ``None`` if absent."""
        what = f"{repo}: manifest {reference}"
        resp = self._call(
            repo,
            "HEAD",
            f"manifests/{reference}",
            what=what,
            max_bytes=0,
            headers={"Accept": ", ".join(MANIFEST_MEDIA_TYPES)},
            missing_ok=True,
        )
        if resp is None:
            return None
        media_type = _content_type(resp.headers)
        size = resp.headers.get("Content-Length", "")
        try:
            digest = Digest.parse(resp.headers.get("Docker-Content-Digest", ""))
        except DigestError:
            raise RegistryError(f"{what}: HEAD answer has no valid Docker-Content-Digest") from None
        if isinstance(reference, Digest) and digest != reference:
            raise _mismatch(what, reference, digest)
        if media_type not in MANIFEST_MEDIA_TYPES or not size.isdigit():
            raise RegistryError(f"{what}: HEAD answer lacks a manifest media type or size")
        return Descriptor(media_type, digest, int(size))

    def get_blob(self, repo: Repository, digest: Digest, *, max_bytes: int | None = None) -> bytes:
        """Fetch a blob; its bytes must hash to ``digest``. Default cap: ``max_blob_bytes``."""
        what = f"{repo}: blob {digest}"
        resp = self._call(
            repo, "GET", f"blobs/{digest}", what=what, max_bytes=max_bytes or self.max_blob_bytes
        )
        assert resp is not None
        if not digest.matches(resp.body):
            raise _mismatch(what, digest, Digest.of(resp.body))
        return resp.body

    def get_descriptor_blob(
        self, repo: Repository, desc: Descriptor, *, max_bytes: int | None = None
    ) -> bytes:
        """Fetch the blob a descriptor names; refuses it up front if the descriptor says it is too big."""
        cap = max_bytes or self.max_blob_bytes
        if desc.size > cap:
            raise RegistryError(
                f"{repo}: blob {desc.digest} is {desc.size} bytes, over the {cap}-byte limit",
                code=Code.REGISTRY_RESPONSE_TOO_LARGE,
            )
        data = self.get_blob(repo, desc.digest, max_bytes=cap)
        if len(data) != desc.size:
            raise RegistryError(
                f"{repo}: blob {desc.digest} is {len(data)} bytes, its descriptor says {desc.size}"
            )
        return data

    def referrers(self, repo: Repository, digest: Digest) -> tuple[Descriptor, ...] | None:
        """``GET /v2/<name>/referrers/<digest>``; ``None`` when the registry has no referrers API."""
        what = f"{repo}: referrers of {digest}"
        resp = self._call(
            repo,
            "GET",
            f"referrers/{digest}",
            what=what,
            max_bytes=self.max_manifest_bytes,
            headers={"Accept": OCI_INDEX},
            ok_statuses=(200, 400, 404, 405, 406),
        )
        assert resp is not None
        if resp.status != 200 or _content_type(resp.headers) != OCI_INDEX:
            return None
        return parse_manifest(resp.body, OCI_INDEX, what).manifests()

    def blob_exists(self, repo: Repository, digest: Digest) -> bool:
        resp = self._call(
            repo, "HEAD", f"blobs/{digest}", what=f"{repo}: blob {digest}", max_bytes=0, missing_ok=True
        )
        return resp is not None

    # ---- writing --------------------------------------------------------------------------------

    def push_blob(self, repo: Repository, data: bytes) -> Digest:
        """Upload a blob (POST then monolithic PUT); skipped when the registry already has it."""
        digest = Digest.of(data)
        if self.blob_exists(repo, digest):
            return digest
        what = f"{repo}: upload of blob {digest}"
        resp = self._call(repo, "POST", "blobs/uploads/", what=what, push=True, ok_statuses=(202,))
        assert resp is not None
        location = resp.headers.get("Location")
        if not location:
            raise RegistryError(f"{what}: the registry did not say where to upload (no Location header)")
        url = urllib.parse.urljoin(resp.url, location)
        url += ("&" if "?" in url else "?") + urllib.parse.urlencode({"digest": digest.value})
        self._call(
            repo,
            "PUT",
            url,
            what=what,
            push=True,
            data=data,
            ok_statuses=(201,),
            headers={"Content-Type": "application/octet-stream"},
        )
        return digest

    def push_manifest(self, repo: Repository, reference: str | Digest, raw: bytes, media_type: str) -> Digest:
        """PUT manifest bytes verbatim under a tag or their digest; returns their digest."""
        digest = Digest.of(raw)
        if isinstance(reference, Digest) and reference != digest:
            raise RegistryError(f"{repo}: refusing to push manifest {digest} under digest {reference}")
        what = f"{repo}: push of manifest {reference}"
        resp = self._call(
            repo,
            "PUT",
            f"manifests/{reference}",
            what=what,
            push=True,
            data=raw,
            headers={"Content-Type": media_type},
            ok_statuses=(201, 202),
        )
        assert resp is not None
        announced = (resp.headers.get("Docker-Content-Digest") or "").strip()
        if announced and announced != digest.value:
            raise _mismatch(what, announced, digest)
        # a registry with the referrers API indexes a manifest's subject itself and says so
        self.last_push_indexed_subject = "OCI-Subject" in resp.headers
        return digest

    def push_raw_manifest(
        self, repo: Repository, reference: str | Digest, raw: bytes, media_type: str
    ) -> Digest:
        return self.push_manifest(repo, reference, raw, media_type)

    # ---- transport ------------------------------------------------------------------------------

    def _base_url(self, host: str) -> str:
        if host not in self._registries and self.docker_host is not None and self.docker_host.insecure(host):
            self._insecure.add(host)  # dockerd's insecure-registries, for a host the configuration omits
        scheme = "http" if host in self._insecure else "https"
        return f"{scheme}://{'registry-1.docker.io' if host == DEFAULT_REGISTRY else host}/v2/"

    def _verify(self, netloc: str, host: str) -> str | bool:
        # a token realm or redirect target without its own entry is trusted like the registry itself
        cfg = self._registries.get(netloc) or self._registries.get(host)
        if cfg is not None and cfg.ca_bundle is not None:
            if not cfg.ca_bundle.is_file():
                raise ConfigError(f"registry {host}: ca_bundle {cfg.ca_bundle} does not exist")
            return str(cfg.ca_bundle)
        if cfg is None and self.docker_host is not None and (ca := self.docker_host.ca_bundle(netloc)):
            return str(ca)  # /etc/docker/certs.d/<host>/, as dockerd trusts it
        return True

    def _credentials(self, host: str) -> tuple[str, str] | None:
        cfg = self._registries.get(host)
        if cfg is None or cfg.username is None:
            # the configuration names no credentials: ~/.docker/config.json's, as the docker CLI reads them
            return self.docker_host.credentials(host) if self.docker_host is not None else None
        return cfg.username, cfg.password() or ""

    def _proxies(self, url: str, host: str) -> dict[str, str]:
        """The registry's ``proxy`` setting, else HTTPS_PROXY / HTTP_PROXY / NO_PROXY from the environment
        (only those: ``trust_env`` stays off, so no .netrc credentials are picked up)."""
        cfg = self._registries.get(host)
        if cfg is not None and cfg.proxy is not None:
            return {"http": cfg.proxy, "https": cfg.proxy}
        return dict(requests.utils.get_environ_proxies(url))

    def _call(
        self,
        repo: Repository,
        method: str,
        path: str,
        *,
        what: str,
        max_bytes: int = _SMALL_BODY,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
        push: bool = False,
        ok_statuses: tuple[int, ...] = (200,),
        missing_ok: bool = False,
    ) -> _Response | None:
        """One authenticated request under one deadline; 404 is ``None`` when ``missing_ok``."""
        with _Deadline(self.deadline, what) as deadline:
            return self._call_within(
                deadline, repo, method, path, what, max_bytes, headers, data, push, ok_statuses, missing_ok
            )

    def _call_within(
        self,
        deadline: _Deadline,
        repo: Repository,
        method: str,
        path: str,
        what: str,
        max_bytes: int,
        headers: Mapping[str, str] | None,
        data: bytes | None,
        push: bool,
        ok_statuses: tuple[int, ...],
        missing_ok: bool,
    ) -> _Response | None:
        host = repo.registry
        url = (
            path if path.startswith(("http://", "https://")) else self._base_url(host) + f"{repo.name}/{path}"
        )
        scope = f"repository:{repo.name}:{'pull,push' if push else 'pull'}"
        hdrs = {"Accept-Encoding": "identity", **(headers or {})}
        auth = self._auth_header(host, scope, deadline)
        resp = self._send(method, url, hdrs, data, auth, max_bytes, deadline, what, host)
        if resp.status == 401:
            self._challenges[host] = _parse_challenge(resp.headers.get("WWW-Authenticate", ""), what)
            self._tokens.pop((host, scope), None)
            auth = self._auth_header(host, scope, deadline, required=True)
            resp = self._send(method, url, hdrs, data, auth, max_bytes, deadline, what, host)
            if resp.status == 401:
                raise RegistryError(
                    f"{what}: the registry refused our credentials; check registries[].username/password",
                    code=Code.REGISTRY_AUTH_FAILED,
                )
        if resp.status == 404 and missing_ok:
            return None
        if resp.status not in ok_statuses:
            raise _status_error(what, resp)
        return resp

    def _auth_header(self, host: str, scope: str, deadline: _Deadline, required: bool = False) -> str | None:
        kind, params = self._challenges.get(host, ("", {}))
        if kind == "basic":
            creds = self._credentials(host)
            if creds is None:
                if required:
                    raise RegistryError(
                        f"registry {host} requires a login: set registries[].username and password_file",
                        code=Code.REGISTRY_AUTH_FAILED,
                    )
                return None
            return _basic(*creds)
        if kind == "bearer":
            # a pull,push token also serves pulls, so a signer's reads need no second token
            token = self._tokens.get((host, scope)) or self._tokens.get(
                (host, scope.replace(":pull", ":pull,push"))
            )
            if token is None or token.expires <= time.monotonic():
                token = self._fetch_token(host, params, scope, deadline)
                self._tokens[(host, scope)] = token
            return f"Bearer {token.value}"
        return None

    def _fetch_token(self, host: str, params: Mapping[str, str], scope: str, deadline: _Deadline) -> _Token:
        realm = params.get("realm", "")
        what = f"token request to {realm or '?'} for {host}"
        parsed = urllib.parse.urlsplit(realm)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise RegistryError(
                f"registry {host}: its auth challenge names no usable token realm ({realm!r})"
            )
        if parsed.scheme == "http" and parsed.netloc not in self._insecure and host not in self._insecure:
            raise RegistryError(f"registry {host}: refusing to send credentials to plain-HTTP realm {realm}")
        query = [("scope", scope)]
        if params.get("scope") and params["scope"] != scope:
            query += [("scope", s) for s in params["scope"].split(" ")]
        if params.get("service"):
            query.insert(0, ("service", params["service"]))
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        creds = self._credentials(host)
        auth = _basic(*creds) if creds else None
        resp = self._send(
            "GET", url, {"Accept-Encoding": "identity"}, None, auth, _SMALL_BODY, deadline, what, host
        )
        if resp.status in (401, 403):
            raise RegistryError(
                f"{what}: the token service refused our credentials (HTTP {resp.status}); check them",
                code=Code.REGISTRY_AUTH_FAILED,
            )
        if resp.status != 200:
            raise _status_error(what, resp)
        try:
            doc = json.loads(resp.body)
            value = doc.get("token") or doc.get("access_token")
            ttl = doc.get("expires_in", 60)
        except (ValueError, UnicodeDecodeError, AttributeError):
            raise RegistryError(f"{what}: the token service did not answer with a JSON token") from None
        if not isinstance(value, str) or not value or any(c in value for c in "\r\n"):
            raise RegistryError(f"{what}: the token service's answer holds no usable token")
        ttl = ttl if isinstance(ttl, int | float) and not isinstance(ttl, bool) and ttl > 0 else 60
        return _Token(value, time.monotonic() + max(1.0, float(ttl) - 5.0))

    def _send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        data: bytes | None,
        auth: str | None,
        max_bytes: int,
        deadline: _Deadline,
        what: str,
        host: str,
    ) -> _Response:
        """Send one request, following at most ``max_redirects`` GET/HEAD redirects, reading a capped body."""
        seen: set[str] = set()
        origin = urllib.parse.urlsplit(url).netloc
        while True:
            hdrs = dict(headers)
            if auth is not None and urllib.parse.urlsplit(url).netloc == origin:
                hdrs["Authorization"] = auth  # never forwarded to another host (e.g. blob storage)
            self.request_count += 1
            try:
                raw = self._session.request(
                    method,
                    url,
                    headers=hdrs,
                    data=data,
                    allow_redirects=False,
                    stream=True,
                    timeout=(
                        min(self.timeout, deadline.remaining()),
                        min(self.timeout, deadline.remaining()),
                    ),
                    verify=self._verify(urllib.parse.urlsplit(url).netloc, host),
                    proxies=self._proxies(url, host),
                )
            except requests.exceptions.RequestException as exc:
                if deadline.expired:
                    raise deadline.error() from None
                raise _request_error(exc, what, self.timeout, urllib.parse.urlsplit(url).netloc) from None
            with raw:
                if raw.status_code in _REDIRECTS and method in ("GET", "HEAD"):
                    target = raw.headers.get("Location")
                    if not target:
                        raise RegistryError(f"{what}: redirect without a Location header")
                    next_url = urllib.parse.urljoin(url, target)
                    seen.add(url)
                    if next_url in seen:
                        raise RegistryError(f"{what}: the registry redirects in a loop ({next_url})")
                    if len(seen) > self.max_redirects:
                        raise RegistryError(f"{what}: more than {self.max_redirects} redirects")
                    nxt = urllib.parse.urlsplit(next_url)
                    if nxt.scheme not in ("http", "https") or (
                        nxt.scheme == "http" and nxt.netloc not in self._insecure
                    ):
                        raise RegistryError(f"{what}: refusing redirect to {nxt.scheme}://{nxt.netloc}")
                    url = next_url
                    continue
                cap = max_bytes if raw.status_code < 300 else min(max_bytes, _SMALL_BODY)
                body = b"" if method == "HEAD" else _read_capped(raw, cap, deadline, what)
                return _Response(raw.status_code, raw.headers, body, url)


def _read_capped(raw: requests.Response, cap: int, deadline: _Deadline, what: str) -> bytes:
    encoding = raw.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise RegistryError(f"{what}: the registry sent a {encoding!r}-encoded body, which we do not accept")
    declared = raw.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > cap:
        raise RegistryError(
            f"{what}: the response is {declared} bytes, over the {cap}-byte limit",
            code=Code.REGISTRY_RESPONSE_TOO_LARGE,
        )
    buf = bytearray()
    try:
        while True:
            deadline.remaining()
            # read1 returns what has arrived, so a slow drip cannot outlive the deadline
            chunk = raw.raw.read1(_CHUNK, decode_content=False)
            if not chunk:
                return bytes(buf)
            buf += chunk
            if len(buf) > cap:
                raise RegistryError(
                    f"{what}: the response exceeds the {cap}-byte limit",
                    code=Code.REGISTRY_RESPONSE_TOO_LARGE,
                )
    except RegistryError:
        raise
    except Exception as exc:  # urllib3 raises its own types (ReadTimeoutError, ProtocolError) mid-body
        if deadline.expired:
            raise deadline.error() from None
        raise RegistryUnreachable(f"{what}: the connection failed while reading ({_reason(exc)})") from None


def _request_error(
    exc: requests.exceptions.RequestException, what: str, timeout: float, netloc: str
) -> Exception:
    if isinstance(exc, requests.exceptions.SSLError):
        return RegistryUnreachable(
            f"{what}: TLS handshake with {netloc} failed ({_reason(exc)}); "
            "if the registry uses a private CA, set registries[].ca_bundle (or put it in "
            "/etc/docker/certs.d/<host>/ca.crt); if it speaks plain HTTP, set registries[].insecure = true",
            code=Code.REGISTRY_TLS_ERROR,
        )
    if isinstance(exc, requests.exceptions.Timeout):
        return RegistryUnreachable(f"{what}: the registry did not answer within {timeout:g}s")
    return RegistryUnreachable(f"{what}: cannot reach the registry ({_reason(exc)})")


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def _parse_challenge(header: str, what: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    kind = scheme.lower()
    if kind not in ("basic", "bearer"):
        raise RegistryError(
            f"{what}: the registry asks for authentication we do not support ({scheme or 'no challenge'!r})",
            code=Code.REGISTRY_AUTH_FAILED,
        )
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _PARAM.finditer(rest)
    }
    return kind, params


def _content_type(headers: Mapping[str, str]) -> str:
    return headers.get("Content-Type", "").split(";")[0].strip()


def _mismatch(what: str, expected: Digest | str, got: Digest) -> RegistryError:
    return RegistryError(
        f"{what}: content does not match its digest (expected {expected}, got {got}); "
        "the registry or something in between is serving wrong data",
        code=Code.REGISTRY_DIGEST_MISMATCH,
    )


def _status_error(what: str, resp: _Response) -> RegistryError:
    detail = ""
    try:
        errors = json.loads(resp.body).get("errors") or []
        detail = "; ".join(
            f"{e.get('code', '')}: {e.get('message', '')}" for e in errors[:3] if isinstance(e, dict)
        )
    except (ValueError, UnicodeDecodeError, AttributeError):
        pass
    hint = {
        403: "the account lacks permission",
        404: "not found",
        429: "rate limited, retry later",
    }.get(resp.status, "")
    text = (
        f"{what}: HTTP {resp.status}"
        + (f" ({hint})" if hint else "")
        + (f": {detail[:300]}" if detail else "")
    )
    code = Code.REGISTRY_NOT_FOUND if resp.status == 404 else Code.REGISTRY_ERROR
    return RegistryError(text, code=code)


def _reason(exc: BaseException) -> str:
    # the innermost cause is the readable one (ECONNREFUSED, name resolution, certificate verify failed)
    for _ in range(10):
        if exc.__context__ is None:
            break
        exc = exc.__context__
    return str(exc)[:200] or type(exc).__name__
