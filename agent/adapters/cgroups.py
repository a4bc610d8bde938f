"""A container's processes, reached through its cgroup: freeze, thaw and kill without asking dockerd.

dockerd holds a container's lock while, for example, a ``docker cp`` upload into it is unfinished, and
inspect, kill and stop all wait on that lock; and ``docker stop`` thaws a paused container to deliver
SIGTERM. The kernel's cgroup interface does neither: a frozen container executes no further instruction, and
SIGKILL to every process of a frozen cgroup kills them where they stand.

Both cgroup versions and both of dockerd's drivers are found from the container id alone:

- v2: ``<root>/docker/<id>`` (cgroupfs) or ``<root>/system.slice/docker-<id>.scope`` (systemd), with
  ``cgroup.freeze`` and ``cgroup.kill``;
- v1: the same two places under ``<root>/freezer``, with ``freezer.state`` and ``cgroup.procs``.

Every failure is :class:`CgroupError`; a container without a cgroup (not running, or gone) is None.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ImageGuardError

CGROUP_ROOT = Path("/sys/fs/cgroup")


class CgroupError(ImageGuardError):
    """The container's cgroup could not be read or written."""


@dataclass(frozen=True, slots=True)
class ContainerCgroup:
    path: Path
    v2: bool

    @classmethod
    def find(cls, container_id: str, root: Path = CGROUP_ROOT) -> ContainerCgroup | None:
        if len(container_id) != 64 or not all(c in "0123456789abcdef" for c in container_id):
            return None  # only a full id names a cgroup; never build a path from anything else
        v2 = (root / "cgroup.controllers").exists()
        base = root if v2 else root / "freezer"
        for parent in ("docker", "system.slice"):
            for leaf in (container_id, f"docker-{container_id}.scope"):
                path = base / parent / leaf
                if path.is_dir():
                    return cls(path, v2)
        return None

    def freeze(self) -> None:
        self._write("cgroup.freeze" if self.v2 else "freezer.state", "1" if self.v2 else "FROZEN")

    def thaw(self) -> None:
        self._write("cgroup.freeze" if self.v2 else "freezer.state", "0" if self.v2 else "THAWED")

    def frozen(self) -> bool:
        try:
            if self.v2:
                return (self.path / "cgroup.freeze").read_text().strip() == "1"
            return (self.path / "freezer.state").read_text().strip() in ("FROZEN", "FREEZING")
        except OSError as exc:
            raise CgroupError(f"cannot read the freezer state of {self.path}: {exc.strerror}") from None

    def kill(self) -> int:
        """SIGKILL every process of the container; returns how many were signalled."""
        if self.v2 and (self.path / "cgroup.kill").exists():
            self._write("cgroup.kill", "1")
            return -1  # the kernel does it for the whole tree
        # v1 (or v2 before 5.14): freeze first so that nothing forks meanwhile; the signals are delivered
        # on thaw, before any user code runs
        self.freeze()
        self._wait_frozen()
        count = 0
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                count += 1
        self.thaw()
        return count

    def pids(self) -> list[int]:
        try:
            text = (self.path / "cgroup.procs").read_text()
        except OSError as exc:
            raise CgroupError(f"cannot list the processes of {self.path}: {exc.strerror}") from None
        return [int(p) for p in text.split()]

    def _wait_frozen(self, timeout: float = 1.0) -> None:
        if self.v2:
            return
        deadline = time.monotonic() + timeout
        while (self.path / "freezer.state").read_text().strip() != "FROZEN" and time.monotonic() < deadline:
            time.sleep(0.001)

    def _write(self, name: str, value: str) -> None:
        try:
            (self.path / name).write_text(value)
        except OSError as exc:
            raise CgroupError(f"cannot write {value!r} to {self.path / name}: {exc.strerror}") from None
