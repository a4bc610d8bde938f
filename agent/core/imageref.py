"""Image references (``registry:port/repo/name:tag@sha256:...``), parsed once at the edge."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from agent.core.digest import Digest
from agent.errors import DigestError, ImageRefError

DEFAULT_REGISTRY = "docker.io"
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_HOST = re.compile(r"(?:[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?")


@dataclass(frozen=True, slots=True)
class ImageRef:
    """A normalised reference. ``repository`` never includes the registry; Docker Hub gets ``library/``."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> ImageRef:
        raw = text.strip()
        if not raw or len(raw) > 1024 or any(c.isspace() for c in raw):
            raise ImageRefError(f"invalid image reference {text!r}: expected [registry/]name[:tag][@digest]")
        rest, at, digest_text = raw.partition("@")
        digest = None
        if at:
            try:
                digest = Digest.parse(digest_text)
            except DigestError as exc:
                raise ImageRefError(f"invalid image reference {text!r}: {exc}") from None
        tag = None
        last_slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > last_slash:
            rest, tag = rest[:colon], rest[colon + 1 :]
            if not _TAG.fullmatch(tag):
                raise ImageRefError(f"invalid image reference {text!r}: bad tag {tag!r}")
        first, sep, remainder = rest.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"):
            if not _HOST.fullmatch(first):
                raise ImageRefError(f"invalid image reference {text!r}: bad registry host {first!r}")
            registry, path = first, remainder
        else:
            registry, path = DEFAULT_REGISTRY, rest
        if registry in ("index.docker.io", "registry-1.docker.io"):
            registry = DEFAULT_REGISTRY
        if registry == DEFAULT_REGISTRY and "/" not in path:
            path = "library/" + path
        if not path or not all(_COMPONENT.fullmatch(part) for part in path.split("/")):
            raise ImageRefError(
                f"invalid image reference {text!r}: repository must be lowercase components separated by '/'"
            )
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry=registry, repository=path, tag=tag, digest=digest)

    @property
    def name(self) -> str:
        """``registry/repository``: what scope patterns match against."""
        return f"{self.registry}/{self.repository}"

    def with_digest(self, digest: Digest) -> ImageRef:
        return ImageRef(self.registry, self.repository, None, digest)

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


EVERY_IMAGE = ("*", "**")
_WILD = set("*?[")


def scope_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a usable scope pattern, or None. See :func:`scope_matches`."""
    p = pattern.strip()
    if p in EVERY_IMAGE:
        return None
    if not p:
        return "an empty pattern"
    host, segments = _split_pattern(p)
    if host is None:
        return (
            f"{pattern!r}: the registry host must be spelled out, without wildcards "
            "(one pattern per registry; '**' alone for every image)"
        )
    if not segments or any(not s for s in segments):
        return f"{pattern!r}: an empty path segment"
    if not any(_WILD & set(s) for s in segments):
        try:
            ImageRef.parse(p)
        except ImageRefError as exc:
            return str(exc)
    return None


def _split_pattern(pattern: str) -> tuple[str | None, list[str]]:
    """(registry host, repository segments) of a pattern, normalised like references; host None if the host
    part has wildcards."""
    first, sep, rest = pattern.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or _WILD & set(first)):
        if _WILD & set(first):
            return None, []
        host, path = first, rest
    else:
        host, path = DEFAULT_REGISTRY, pattern
    if host in ("index.docker.io", "registry-1.docker.io"):
        host = DEFAULT_REGISTRY
    if host == DEFAULT_REGISTRY and "/" not in path and path != "**":
        path = "library/" + path  # a one-component pattern names official images, like ``busybox`` does
    return host, path.split("/")


def _match_segments(pattern: list[str], name: list[str]) -> bool:
    if not pattern:
        return not name
    head, rest = pattern[0], pattern[1:]
    if head == "**":  # zero or more whole segments
        return any(_match_segments(rest, name[i:]) for i in range(len(name) + 1))
    return bool(name) and fnmatch.fnmatchcase(name[0], head) and _match_segments(rest, name[1:])


def scope_matches(pattern: str, ref: ImageRef) -> bool:
    """Does a scope pattern cover this image?

    A pattern is ``host[:port]/path``. The host is compared exactly (no wildcards: ``*.example.com/*`` is
    refused, so it can never match ``attacker.net/x.example.com/app``); a pattern without a host means
    Docker Hub, normalised like references (``busybox`` = ``docker.io/library/busybox``). In the path, ``*``
    and ``?`` match within one segment and ``**`` matches any number of segments: ``reg/acme/*`` covers
    ``reg/acme/app`` but not ``reg/acme/team/app``; ``reg/acme/**`` covers both. ``*`` or ``**`` alone covers
    every image. A pattern that is not valid (:func:`scope_problem`) matches nothing.
    """
    p = pattern.strip()
    if p in EVERY_IMAGE:
        return True
    if scope_problem(p) is not None:
        return False
    if not any(_WILD & set(c) for c in p):
        return ImageRef.parse(p).name == ref.name  # an exact name; a tag or digest in it is ignored
    host, segments = _split_pattern(p)
    return host == ref.registry and _match_segments(segments, ref.repository.split("/"))
