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


def scope_matches(pattern: str, ref: ImageRef) -> bool:
    """Does a trust-anchor scope pattern cover this image?

    Patterns are globs over ``registry/repository`` (``*`` also crosses ``/``), normalised like references
    so that ``busybox`` and ``docker.io/library/busybox`` mean the same thing. ``*`` alone covers every image.
    """
    pattern = pattern.strip()
    if pattern in ("*", "**"):
        return True
    if "*" not in pattern and "?" not in pattern:
        try:
            return ImageRef.parse(pattern).name == ref.name
        except ImageRefError:
            return False
    candidates = [pattern, f"{DEFAULT_REGISTRY}/{pattern}"]
    if "/" not in pattern:  # a one-component pattern names official images, like ``busybox`` does
        candidates.append(f"{DEFAULT_REGISTRY}/library/{pattern}")
    return any(fnmatch.fnmatchcase(ref.name, c) for c in candidates)
