"""Issue 11: the cgroup adapter (agent/adapters/cgroups.py) on the real kernel, in all four layouts dockerd
uses: cgroup v1 and v2, with the cgroupfs driver (``docker/<id>``) and the systemd driver
(``system.slice/docker-<id>.scope``). A process that counts as fast as it can stands in for a container;
it is placed in a cgroup where dockerd would put it, found from the container id alone, frozen (the count
stands still), thawed (it goes on) and killed.

This host runs dockerd on cgroup v1 with cgroupfs; the v2 hierarchy is the kernel's unified one, mounted
beside v1 (or at the root on a v2-only host). cgroup.freeze and cgroup.kill need no controller there."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.adapters.cgroups import CGROUP_ROOT, ContainerCgroup

pytestmark = pytest.mark.integration


def _v2_root() -> Path:
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return CGROUP_ROOT  # a v2-only host
    unified = CGROUP_ROOT / "unified"
    if (unified / "cgroup.procs").exists():
        return unified  # hybrid: the v2 hierarchy beside v1
    pytest.fail("no cgroup v2 hierarchy on this host")


def _v1_root() -> Path:
    if not (CGROUP_ROOT / "freezer" / "cgroup.procs").exists():
        pytest.fail("no cgroup v1 freezer on this host")
    return CGROUP_ROOT


class Counter:
    """A busy process that appends a line to a file as fast as it can, as untrusted code in a container
    would; how far it got is the file's size."""

    def __init__(self, tmp: Path) -> None:
        self.file = tmp / f"count-{secrets.token_hex(4)}"
        sh = shutil.which("busybox") or "/bin/sh"
        argv = [sh, "sh", "-c", 'while :; do echo x >> "$0"; done', str(self.file)]
        if not sh.endswith("busybox"):
            argv = argv[1:]
        self.proc = subprocess.Popen(argv)

    def value(self) -> int:
        for _ in range(100):
            if self.file.exists():
                return self.file.stat().st_size
            time.sleep(0.01)
        raise AssertionError("the counter wrote nothing")

    def advancing(self) -> bool:
        first = self.value()
        time.sleep(0.3)
        return self.value() > first


@pytest.fixture(params=["v1-cgroupfs", "v1-systemd", "v2-cgroupfs", "v2-systemd"])
def placed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path, Counter, bool]]:
    version, driver = request.param.split("-")
    cid = secrets.token_hex(32)
    root = _v2_root() if version == "v2" else _v1_root()
    base = root if version == "v2" else root / "freezer"
    parent, leaf = ("docker", cid) if driver == "cgroupfs" else ("system.slice", f"docker-{cid}.scope")
    made_parent = not (base / parent).exists()
    path = base / parent / leaf
    path.mkdir(parents=True)
    counter = Counter(tmp_path)
    try:
        (path / "cgroup.procs").write_text(str(counter.proc.pid))
        yield cid, path, counter, version == "v2"
    finally:
        if counter.proc.poll() is None:
            counter.proc.kill()
        counter.proc.wait(10)
        for _ in range(100):  # a cgroup can be removed once its last process is reaped
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.05)
        if made_parent:
            (base / parent).rmdir()


def test_found_frozen_thawed_and_killed_from_the_id_alone(placed: tuple[str, Path, Counter, bool]) -> None:
    cid, path, counter, v2 = placed
    root = path.parents[1] if v2 else path.parents[2]
    cg = ContainerCgroup.find(cid, root=root)
    assert cg is not None and cg.path == path and cg.v2 == v2
    assert cg.pids() == [counter.proc.pid]
    assert counter.advancing()

    cg.freeze()
    time.sleep(0.1)
    assert cg.frozen()
    assert not counter.advancing()  # frozen: it executes no further instruction

    cg.thaw()
    assert not cg.frozen() and counter.advancing()

    cg.freeze()  # killed while frozen, as the agent kills a container that fails its verification
    time.sleep(0.1)
    cg.kill()
    assert counter.proc.wait(5) == -9
    last = counter.value()
    time.sleep(0.2)
    assert counter.value() == last


def test_only_a_full_container_id_names_a_cgroup(tmp_path: Path) -> None:
    for bad in ("", "abc", "../" + "0" * 61, "G" * 64, "0" * 63 + "/"):
        assert ContainerCgroup.find(bad, root=tmp_path) is None
