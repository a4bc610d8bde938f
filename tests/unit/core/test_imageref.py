"""Image references and trust-anchor scope patterns."""

from __future__ import annotations

import pytest

from agent.core.digest import Digest
from agent.core.imageref import ImageRef, scope_matches, scope_problem
from agent.errors import ImageRefError

D = Digest.of(b"image")


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", None),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
        ("docker.io/busybox", "docker.io", "library/busybox", "latest", None),
        ("docker.io/library/busybox", "docker.io", "library/busybox", "latest", None),
        ("index.docker.io/library/busybox", "docker.io", "library/busybox", "latest", None),
        ("registry-1.docker.io/busybox:1", "docker.io", "library/busybox", "1", None),
        ("acme/app", "docker.io", "acme/app", "latest", None),
        ("registry.example:5000/acme/app", "registry.example:5000", "acme/app", "latest", None),
        (
            "registry.example:5000/acme/team/app:v1.2-rc_3",
            "registry.example:5000",
            "acme/team/app",
            "v1.2-rc_3",
            None,
        ),
        ("localhost/app", "localhost", "app", "latest", None),
        ("localhost:5000/app", "localhost:5000", "app", "latest", None),
        ("127.0.0.1:5000/a/b", "127.0.0.1:5000", "a/b", "latest", None),
        ("[::1]:5000/app", "[::1]:5000", "app", "latest", None),
        ("localhost", "docker.io", "library/localhost", "latest", None),
        (f"busybox@{D}", "docker.io", "library/busybox", None, D),
        (f"busybox:1@{D}", "docker.io", "library/busybox", "1", D),
        (f"registry.example:5000/acme/app@{D.value.upper()}", "registry.example:5000", "acme/app", None, D),
        ("  busybox  ", "docker.io", "library/busybox", "latest", None),
        ("my-app/my_app.x__y", "docker.io", "my-app/my_app.x__y", "latest", None),
    ],
)
def test_parse(text: str, registry: str, repository: str, tag: str | None, digest: Digest | None) -> None:
    ref = ImageRef.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)
    assert ref.name == f"{registry}/{repository}"
    # str() gives the normalised form, which parses to the same value
    assert ImageRef.parse(str(ref)) == ref


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "Busybox",
        "acme/App",
        "a b",
        "busybox:",
        "busybox@",
        "busybox:@",
        "busybox@sha256:abc",
        f"busybox@sha512:{'a' * 128}",
        f"@{D}",
        "a//b",
        "/busybox",
        "busybox/",
        "foo:bar:baz",
        "busybox:-tag",
        f"busybox:{'t' * 129}",
        "registry.example:port/app",
        "bad_host.example/app",
        "a" * 1025,
        "acme/-app",
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(ImageRefError, match="invalid image reference"):
        ImageRef.parse(text)


def test_with_digest_drops_the_tag() -> None:
    ref = ImageRef.parse("registry.example:5000/acme/app:v1").with_digest(D)
    assert ref.tag is None
    assert ref.digest == D
    assert str(ref) == f"registry.example:5000/acme/app@{D}"


REF_ACME = ImageRef.parse("registry.example:5000/acme/app")
REF_ACME_DEEP = ImageRef.parse("registry.example:5000/acme/team/app")
REF_OTHER_REPO = ImageRef.parse("registry.example:5000/acmex/app")
REF_OTHER_HOST = ImageRef.parse("registry.example:5001/acme/app")
REF_BUSYBOX = ImageRef.parse("busybox")
REF_HUB_USER = ImageRef.parse("acme/app")


@pytest.mark.parametrize(
    ("pattern", "ref", "expected"),
    [
        ("*", REF_ACME, True),
        ("*", REF_BUSYBOX, True),
        (" * ", REF_HUB_USER, True),
        ("**", REF_ACME_DEEP, True),
        ("registry.example:5000/acme/*", REF_ACME, True),
        ("registry.example:5000/acme/*", REF_ACME_DEEP, False),  # '*' stays within one segment
        ("registry.example:5000/acme/**", REF_ACME_DEEP, True),  # '**' crosses segments
        ("registry.example:5000/acme/**", REF_ACME, True),
        ("registry.example:5000/**/app", REF_ACME, True),
        ("registry.example:5000/acme/*", REF_OTHER_REPO, False),
        ("registry.example:5000/acme/*", REF_OTHER_HOST, False),
        ("registry.example:5000/acme/*", REF_BUSYBOX, False),
        ("registry.example:5000/*", REF_ACME_DEEP, False),
        ("registry.example:5000/**", REF_ACME_DEEP, True),
        # the host is spelled out: a wildcard in it makes the pattern invalid, so it matches nothing
        ("registry.example:500?/acme/app", REF_OTHER_HOST, False),
        ("*/acme/app", REF_ACME, False),
        # exact names: compared after normalisation, tags and digests ignored
        ("registry.example:5000/acme/app", REF_ACME, True),
        ("registry.example:5000/acme/app:v1", REF_ACME, True),
        ("registry.example:5000/acme/app", REF_ACME_DEEP, False),
        ("registry.example:5000/acme", REF_ACME, False),
        ("registry.example:5000/acme/ap", REF_ACME, False),
        # Docker Hub normalisation
        ("busybox", REF_BUSYBOX, True),
        ("library/busybox", REF_BUSYBOX, True),
        ("docker.io/busybox", REF_BUSYBOX, True),
        ("docker.io/library/busybox", REF_BUSYBOX, True),
        ("index.docker.io/library/busybox", REF_BUSYBOX, True),
        ("busy*", REF_BUSYBOX, True),
        ("library/*", REF_BUSYBOX, True),
        ("library/*", REF_HUB_USER, False),
        ("docker.io/*", REF_HUB_USER, False),
        ("docker.io/**", REF_HUB_USER, True),
        ("acme/*", REF_HUB_USER, True),
        ("acme/*", REF_ACME, False),  # a Hub namespace is not a namespace on every registry
        ("busybox", REF_ACME, False),
        ("docker.io/*", REF_ACME, False),
        # patterns that are not references never match
        ("Not A Ref", REF_BUSYBOX, False),
        ("busybox@sha256:zz", REF_BUSYBOX, False),
    ],
)
def test_scope_matches(pattern: str, ref: ImageRef, expected: bool) -> None:
    assert scope_matches(pattern, ref) is expected


def test_a_wildcard_host_cannot_be_matched_through_the_path() -> None:
    """The pattern an operator means as "any subdomain of example.com" is refused, and whatever it is, a
    host part never matches a path segment of another registry's image."""
    evil = ImageRef.parse("attacker.net/x.example.com/app:1")
    assert scope_problem("*.example.com/*") is not None
    assert not scope_matches("*.example.com/*", evil)
    assert not scope_matches("*.example.com/**", evil)
    assert not scope_matches("example.com/**", evil)
    assert scope_matches("attacker.net/*/app", evil)


@pytest.mark.parametrize(
    ("pattern", "words"),
    [
        ("*.example.com/app", "host must be spelled out"),
        ("*/acme/app", "host must be spelled out"),
        ("registry.example//app", "empty path segment"),
        ("Not A Ref", "invalid image reference"),
        ("", "empty pattern"),
    ],
)
def test_scope_problems_are_named(pattern: str, words: str) -> None:
    assert words in (scope_problem(pattern) or "")
