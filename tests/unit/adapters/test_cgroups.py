"""The cgroup adapter's naming rules, and its watch on a directory tree laid out as dockerd lays out cgroups.

The watch is inotify on directories: the same calls on a plain tmpfs tree as on the real cgroup filesystem
(tests/integration/test_gate.py drives it against the real kernel and engine).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.adapters.cgroups import CgroupError, CgroupWatch, ContainerCgroup, container_id_of, hierarchy

CID = "ab" * 32
OTHER = "cd" * 32


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (CID, CID),
        (f"docker-{CID}.scope", CID),
        ("docker", None),
        (f"docker-{CID}.slice", None),
        (f"containerd-{CID}.scope", None),
        (CID[:-1], None),
        (CID.upper(), None),
        (f"{CID}x", None),
        ("ssh.service", None),
        ("", None),
    ],
)
def test_container_id_of(name: str, expected: str | None) -> None:
    assert container_id_of(name) == expected


def test_hierarchy(tmp_path: Path) -> None:
    assert hierarchy(tmp_path) == (tmp_path / "freezer", False)
    (tmp_path / "cgroup.controllers").write_text("")
    assert hierarchy(tmp_path) == (tmp_path, True)


class Seen:
    def __init__(self) -> None:
        self.items: list[tuple[str, ContainerCgroup]] = []
        self.cond = threading.Condition()

    def __call__(self, cid: str, cg: ContainerCgroup) -> None:
        with self.cond:
            self.items.append((cid, cg))
            self.cond.notify_all()

    def wait(self, n: int) -> list[tuple[str, ContainerCgroup]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.items) >= n, timeout=5), self.items
            return list(self.items)


@pytest.fixture
def v1(tmp_path: Path) -> Iterator[tuple[Path, Seen, CgroupWatch]]:
    (tmp_path / "freezer").mkdir()
    seen = Seen()
    watch = CgroupWatch(seen, root=tmp_path)
    watch.start()
    yield tmp_path / "freezer", seen, watch
    watch.stop()


def test_a_container_cgroup_is_reported_once_the_parent_appears(v1: tuple[Path, Seen, CgroupWatch]) -> None:
    base, seen, _ = v1
    (base / "docker").mkdir()  # dockerd makes it with its first container
    (base / "docker" / CID).mkdir()
    [(cid, cg)] = seen.wait(1)
    assert cid == CID and cg == ContainerCgroup(base / "docker" / CID, v2=False)


def test_systemd_scopes_are_reported_and_other_units_are_not(v1: tuple[Path, Seen, CgroupWatch]) -> None:
    base, seen, _ = v1
    (base / "system.slice").mkdir()
    (base / "system.slice" / "ssh.service").mkdir()
    (base / "system.slice" / f"docker-{OTHER}.scope").mkdir()
    (base / "system.slice" / "cron.service").mkdir()
    (base / "docker").mkdir()
    (base / "docker" / CID).mkdir()
    items = seen.wait(2)
    assert [cid for cid, _ in items] == [OTHER, CID]
    assert items[0][1].path == base / "system.slice" / f"docker-{OTHER}.scope"


def test_files_and_other_directories_are_not_containers(v1: tuple[Path, Seen, CgroupWatch]) -> None:
    base, seen, watch = v1
    (base / "docker").mkdir()
    (base / "docker" / OTHER).write_text("")  # a file, not a cgroup
    (base / "docker" / CID).mkdir()
    (base / "docker" / CID / "init.scope").mkdir()  # a cgroup a container made inside its own
    time.sleep(0.2)
    assert [cid for cid, _ in seen.wait(1)] == [CID]
    assert watch.existing() == [(CID, ContainerCgroup(base / "docker" / CID, v2=False))]


def test_a_container_inside_another_containers_cgroup_is_reported(v1: tuple[Path, Seen, CgroupWatch]) -> None:
    """``docker run --cgroup-parent=/docker/<another container>``: no place is out of the watch's sight."""
    base, seen, _ = v1
    (base / "docker" / CID).mkdir(parents=True)
    seen.wait(1)
    (base / "docker" / CID / OTHER).mkdir()
    items = seen.wait(2)
    assert items[1] == (OTHER, ContainerCgroup(base / "docker" / CID / OTHER, v2=False))


def test_a_callback_error_does_not_end_the_watch(tmp_path: Path) -> None:
    (tmp_path / "freezer" / "docker").mkdir(parents=True)
    seen = Seen()

    def flaky(cid: str, cg: ContainerCgroup) -> None:
        if cid == OTHER:
            raise RuntimeError("boom")
        seen(cid, cg)

    watch = CgroupWatch(flaky, root=tmp_path)
    watch.start()
    try:
        (tmp_path / "freezer" / "docker" / OTHER).mkdir()
        (tmp_path / "freezer" / "docker" / CID).mkdir()
        assert [cid for cid, _ in seen.wait(1)] == [CID]
    finally:
        watch.stop()


def test_v2_layout(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("")
    (tmp_path / "docker").mkdir()
    seen = Seen()
    watch = CgroupWatch(seen, root=tmp_path)
    watch.start()
    try:
        (tmp_path / "docker" / CID).mkdir()
        [(_, cg)] = seen.wait(1)
    finally:
        watch.stop()
    assert cg == ContainerCgroup(tmp_path / "docker" / CID, v2=True)


def test_no_hierarchy_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match="no cgroup hierarchy to watch"):
        CgroupWatch(Seen(), root=tmp_path).start()


def test_a_container_under_its_own_cgroup_parent_is_reported_and_found(
    v1: tuple[Path, Seen, CgroupWatch],
) -> None:
    """``docker run --cgroup-parent=/a/b``: made with one mkdir -p, faster than a watch can be added."""
    base, seen, watch = v1
    (base / "a" / "b" / CID).mkdir(parents=True)
    [(cid, cg)] = seen.wait(1)
    assert cid == CID and cg.path == base / "a" / "b" / CID
    assert watch.find(CID) == cg
    assert (CID, cg) in watch.existing()


def test_directories_there_before_the_watch_are_watched(tmp_path: Path) -> None:
    (tmp_path / "freezer" / "custom" / "deep").mkdir(parents=True)
    (tmp_path / "freezer" / "custom" / OTHER).mkdir()  # a container there already: known, not reported
    seen = Seen()
    watch = CgroupWatch(seen, root=tmp_path)
    watch.start()
    try:
        (tmp_path / "freezer" / "custom" / "deep" / CID).mkdir()
        assert [cid for cid, _ in seen.wait(1)] == [CID]
        assert watch.find(OTHER) == ContainerCgroup(tmp_path / "freezer" / "custom" / OTHER, v2=False)
    finally:
        watch.stop()


def test_a_removed_directory_can_be_made_again(v1: tuple[Path, Seen, CgroupWatch]) -> None:
    base, seen, _ = v1
    (base / "docker").mkdir()
    (base / "docker").rmdir()
    (base / "docker").mkdir()
    (base / "docker" / CID).mkdir()
    assert [cid for cid, _ in seen.wait(1)] == [CID]


def test_each_start_is_reported_again(v1: tuple[Path, Seen, CgroupWatch]) -> None:
    """A container's cgroup is removed when it stops and made anew at its next start."""
    base, seen, _ = v1
    (base / "docker").mkdir()
    (base / "docker" / CID).mkdir()
    seen.wait(1)
    (base / "docker" / CID).rmdir()
    (base / "docker" / CID).mkdir()
    assert [cid for cid, _ in seen.wait(2)] == [CID, CID]
