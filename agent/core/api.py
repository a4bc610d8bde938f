"""What a Docker Engine API request does, read from its method and request target as dockerd routes it.

The authorization plugin is handed the raw request target (``RequestUri``), which RFC 7230 allows in origin
form (``/v1.41/containers/x/start``) and in absolute form (``http://docker/v1.41/containers/x/start``, any
scheme and host). dockerd's router matches the percent-decoded, cleaned path, with or without a ``/vX.Y``
version prefix, and ignores the query. :func:`classify` reads the target the same way and names the
operation; anything it cannot read with certainty is :attr:`Op.UNKNOWN`, which the plugin refuses for
every state-changing method.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import parse_qs, unquote_to_bytes

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Op(StrEnum):
    """Operations the plugin treats differently. Everything else that changes state is ``OTHER``."""

    CONTAINER_CREATE = "container-create"
    CONTAINER_START = "container-start"  # start, restart: the container's code runs (again)
    CONTAINER_EXEC = "container-exec"  # a new process in the container
    CONTAINER_COPY_IN = "container-copy-in"  # PUT .../archive: files written into the container
    CONTAINER_RENAME = "container-rename"
    CONTAINER_REMOVE = "container-remove"
    PLUGIN = "plugin"  # managed plugins run a root filesystem's entrypoint as root
    SWARM = "swarm"  # swarm services start task containers inside the daemon, unseen by the plugin
    BUILD = "build"  # RUN steps execute code from any base image
    READ = "read"  # GET/HEAD: changes nothing
    OTHER = "other"  # a known state-changing operation that runs no new code (stop, rm, pull, network ...)
    UNKNOWN = "unknown"  # the target cannot be read, or names no route dockerd has


@dataclass(frozen=True, slots=True)
class ApiRequest:
    op: Op
    path: str  # the routed path, without version prefix; "" when unreadable
    container: str | None = None  # the container the request names, if any
    name: str | None = None  # the plugin name (PLUGIN), the new container name (CONTAINER_CREATE, _RENAME)
    why: str = ""  # for Op.UNKNOWN: what could not be read


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_VERSION = re.compile(r"^/v[0-9][0-9.]*(?=/)")

# (method, pattern on the unversioned path) -> operation; the container or plugin name is group "ref".
# Container names may hold slashes in routes ("{name:.*}"), so "ref" is greedy where dockerd's is.
_C = r"/containers/(?P<ref>.+)"
_ROUTES: list[tuple[str, re.Pattern[str], Op]] = [
    (m, re.compile(p), op)
    for m, p, op in [
        ("POST", r"/containers/create", Op.CONTAINER_CREATE),
        ("POST", _C + r"/(?:start|restart)", Op.CONTAINER_START),
        ("POST", _C + r"/exec", Op.CONTAINER_EXEC),
        ("POST", r"/exec/[^/]+/start", Op.CONTAINER_EXEC),
        ("PUT", _C + r"/archive", Op.CONTAINER_COPY_IN),
        ("POST", _C + r"/rename", Op.CONTAINER_RENAME),
        ("POST", r"/plugins/(?:pull|create)", Op.PLUGIN),
        ("POST", r"/plugins/(?P<ref>.+)/(?:enable|upgrade|set|push|disable)", Op.PLUGIN),
        ("DELETE", r"/plugins/(?P<ref>.+)", Op.PLUGIN),
        ("POST", r"/swarm/(?:init|join|update|unlock|leave)", Op.SWARM),
        ("POST", r"/services/create", Op.SWARM),
        ("POST", r"/services/[^/]+/update", Op.SWARM),
        ("POST", r"/(?:nodes|secrets|configs)/(?:create|[^/]+/update)", Op.SWARM),
        ("POST", r"/(?:build|session|grpc)", Op.BUILD),
        ("POST", r"/build/(?:prune|cancel)", Op.OTHER),
        ("POST", r"/commit", Op.OTHER),
        # unpause: the agent's own thaw after a verification passes through here; judging it would wait on
        # the verification that is unpausing it
        ("POST", _C + r"/(?:stop|kill|wait|pause|unpause|update|resize|attach)", Op.OTHER),
        ("POST", r"/containers/prune", Op.OTHER),
        ("DELETE", _C, Op.CONTAINER_REMOVE),
        ("POST", r"/exec/[^/]+/resize", Op.OTHER),
        ("POST", r"/images/(?:create|load|prune)", Op.OTHER),
        ("POST", r"/images/.+/(?:push|tag)", Op.OTHER),
        ("DELETE", r"/images/.+", Op.OTHER),
        ("POST", r"/(?:networks|volumes)/(?:create|prune)", Op.OTHER),
        ("POST", r"/networks/[^/]+/(?:connect|disconnect)", Op.OTHER),
        ("DELETE", r"/(?:networks|volumes|services|nodes|secrets|configs)/[^/]+", Op.OTHER),
        ("PUT", r"/volumes/[^/]+", Op.OTHER),
        ("POST", r"/auth", Op.OTHER),
        ("POST", r"/plugins/privileges", Op.READ),  # asks what a plugin would need; installs nothing
        ("POST", r"/distribution/.+/json", Op.READ),
        ("POST", r"/_ping", Op.READ),
    ]
]


def routed_path(target: str) -> tuple[str, str] | None:
    """The path dockerd routes ``target`` by (decoded, cleaned, without version) and the raw query.

    None when the target is in no form dockerd's HTTP server reads as a path.
    """
    if _SCHEME.match(target):  # absolute form: scheme://authority/path?query
        rest = target[target.index("://") + 3 :]
        cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
        target = rest[cut:] if cut < len(rest) and rest[cut] == "/" else "/" + rest[cut:].lstrip("/")
    if not target.startswith("/"):
        return None
    raw_path, _, query = target.partition("?")
    raw_path = raw_path.partition("#")[0]
    try:
        path = unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "%" in raw_path and not re.fullmatch(r"(?:[^%]|%[0-9A-Fa-f]{2})*", raw_path):
        return None  # Go's url parser refuses a broken escape; so do we, rather than guess
    if "\x00" in path:
        return None
    clean = posixpath.normpath("/" + path.lstrip("/"))
    clean = "/" + clean.lstrip("/")  # normpath keeps a leading "//"
    version = _VERSION.match(clean)
    if version:
        clean = clean[version.end() :]
    return clean.rstrip("/") or "/", query


def classify(method: str, target: str) -> ApiRequest:
    """Name the operation of one request. Pure: no I/O."""
    method = method.upper()
    routed = routed_path(target)
    if routed is None:
        return ApiRequest(Op.UNKNOWN, "", why=f"the request target {target[:200]!r} cannot be read as a path")
    path, query = routed
    if method in SAFE_METHODS:
        return ApiRequest(Op.READ, path)
    for route_method, pattern, op in _ROUTES:
        if route_method != method:
            continue
        m = pattern.fullmatch(path)
        if m is None:
            continue
        ref = m.groupdict().get("ref")
        if op is Op.PLUGIN:
            name = ref or _query_value(query, "name") or _query_value(query, "remote")
            return ApiRequest(op, path, name=name)
        if op in (
            Op.CONTAINER_START,
            Op.CONTAINER_EXEC,
            Op.CONTAINER_COPY_IN,
            Op.CONTAINER_RENAME,
            Op.CONTAINER_REMOVE,
        ):
            return ApiRequest(op, path, container=ref, name=_query_value(query, "name"))
        if op is Op.CONTAINER_CREATE:
            return ApiRequest(op, path, name=_query_value(query, "name"))
        return ApiRequest(op, path)
    return ApiRequest(Op.UNKNOWN, path, why=f"{method} {path} is no Docker API operation ImageGuard knows")


def _query_value(query: str, key: str) -> str | None:
    values = parse_qs(query).get(key)
    return values[0] if values else None
