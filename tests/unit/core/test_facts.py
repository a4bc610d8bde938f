"""Raw Docker events and inspect dicts become typed values at the edge, or nothing."""

from __future__ import annotations

from typing import Any

import pytest

from agent.core.digest import Digest
from agent.core.facts import ContainerEvent, facts_from_inspect, parse_repo_digest
from agent.core.imageref import ImageRef

CID = "4f1c" + "0" * 60
T_NANO = 1_700_000_000_123_456_789


def modern(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "Type": "container",
        "Action": "start",
        "Actor": {"ID": CID, "Attributes": {"image": "busybox:1", "name": "web"}},
        "scope": "local",
        "time": 1_700_000_000,
        "timeNano": T_NANO,
    }
    raw.update(changes)
    return raw


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (modern(), ContainerEvent(CID, "start", T_NANO, "busybox:1", "web")),
        # old-style (API < 1.22) records carry id/status/from at the top level
        (
            {"Type": "container", "status": "start", "id": CID, "from": "busybox", "time": 1_700_000_000},
            ContainerEvent(CID, "start", 1_700_000_000 * 1_000_000_000),
        ),
        (
            {"Type": "container", "status": "start", "id": CID, "timeNano": T_NANO},
            ContainerEvent(CID, "start", T_NANO),
        ),
        (modern(Actor={"ID": CID}), ContainerEvent(CID, "start", T_NANO)),
        (modern(Actor={"ID": CID, "Attributes": None}), ContainerEvent(CID, "start", T_NANO)),
        (modern(Actor=None, id=CID), ContainerEvent(CID, "start", T_NANO)),
        # no timeNano: fall back to seconds, then to 0 (the stream still resumes from "now")
        (
            {k: v for k, v in modern().items() if k != "timeNano"},
            ContainerEvent(CID, "start", 1_700_000_000 * 10**9, "busybox:1", "web"),
        ),
        (
            {k: v for k, v in modern().items() if k not in ("timeNano", "time")},
            ContainerEvent(CID, "start", 0, "busybox:1", "web"),
        ),
        (modern(timeNano="123"), ContainerEvent(CID, "start", 1_700_000_000 * 10**9, "busybox:1", "web")),
        # not a container start: dropped
        (modern(Type="image", Action="pull"), None),
        (modern(Type="network", Action="start"), None),
        (modern(Type="volume"), None),
        ({k: v for k, v in modern().items() if k != "Type"}, None),
        (modern(Action="create"), ContainerEvent(CID, "create", T_NANO, "busybox:1", "web")),
        (modern(Action="destroy"), ContainerEvent(CID, "destroy", T_NANO, "busybox:1", "web")),
        (modern(Action="die"), None),
        (modern(Action="exec_start: sh"), None),
        (modern(Action="Start"), None),
        (modern(Action=""), None),
        # no usable id: dropped
        (modern(Actor={"Attributes": {}}), None),
        (modern(Actor={"ID": ""}), None),
        (modern(Actor={"ID": 42}), None),
        (modern(Actor={}), None),
        ({}, None),
    ],
    ids=[
        "start",
        "old-style-seconds",
        "old-style-nano",
        "no-attributes",
        "null-attributes",
        "null-actor",
        "seconds-only",
        "no-time",
        "bad-timeNano",
        "image",
        "network",
        "volume",
        "no-type",
        "create",
        "destroy",
        "die",
        "exec-start",
        "wrong-case",
        "empty-action",
        "no-id",
        "empty-id",
        "non-string-id",
        "empty-actor",
        "empty",
    ],
)
def test_from_raw(raw: dict[str, Any], expected: ContainerEvent | None) -> None:
    assert ContainerEvent.from_raw(raw) == expected


IMAGE_ID = Digest.of(b"config")
REPO_DIGEST = Digest.of(b"manifest")


def inspect(image: str = "registry.example:5000/acme/app:1", image_id: str = str(IMAGE_ID)) -> dict[str, Any]:
    return {
        "Id": CID,
        "Name": "/web",
        "Image": image_id,
        "Config": {"Image": image, "Labels": {"a": "b"}},
        "State": {"Status": "running"},
    }


def test_facts_from_inspect() -> None:
    image = {"RepoDigests": [f"registry.example:5000/acme/app@{REPO_DIGEST}", "garbage", 5, "noat"]}
    facts = facts_from_inspect(inspect(), image)
    assert facts.id == CID
    assert facts.short_id == CID[:12]
    assert facts.name == "web"
    assert facts.image_id == IMAGE_ID
    assert facts.repo_digests == (
        (ImageRef.parse(f"registry.example:5000/acme/app@{REPO_DIGEST}"), REPO_DIGEST),
    )
    assert facts.digests == (REPO_DIGEST, IMAGE_ID)  # repo digests first
    assert facts.state == "running"
    assert facts.labels == {"a": "b"}
    assert facts.image_ref == ImageRef.parse("registry.example:5000/acme/app:1")


def test_facts_of_a_loaded_image_have_only_the_image_id() -> None:
    facts = facts_from_inspect(inspect("busybox-local:1"), {"RepoDigests": []})
    assert facts.repo_digests == ()
    assert facts.digests == (IMAGE_ID,)


def test_facts_when_the_image_is_gone() -> None:
    facts = facts_from_inspect(inspect(image_id="not-a-digest"), None)
    assert facts.image_id is None
    assert facts.digests == ()


@pytest.mark.parametrize("image", [str(IMAGE_ID), IMAGE_ID.hex])
def test_started_by_image_id_has_no_reference(image: str) -> None:
    assert facts_from_inspect(inspect(image), None).image_ref is None


def test_duplicate_digests_are_listed_once() -> None:
    image = {"RepoDigests": [f"a.example/x@{REPO_DIGEST}", f"b.example/y@{REPO_DIGEST}"]}
    facts = facts_from_inspect(inspect(), image)
    assert len(facts.repo_digests) == 2
    assert facts.digests == (REPO_DIGEST, IMAGE_ID)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        (f"busybox@{REPO_DIGEST}", True),
        (f"registry.example:5000/acme/app@{REPO_DIGEST}", True),
        ("busybox", False),
        ("busybox@sha256:short", False),
        (f"@{REPO_DIGEST}", False),
        (f"Bad/Name@{REPO_DIGEST}", False),
    ],
)
def test_parse_repo_digest(text: str, ok: bool) -> None:
    parsed = parse_repo_digest(text)
    assert (parsed is not None) is ok
    if parsed is not None:
        assert parsed[1] == REPO_DIGEST
        assert parsed[0].digest == REPO_DIGEST
