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

:class:`CgroupWatch` tells the moment dockerd's runtime makes a container's cgroup. runc makes it, and puts
the container's first process in it, before that process execs the entrypoint: a cgroup frozen now holds the
container before any of its own code runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from inotify_simple import INotify, flags

from agent.errors import ImageGuardError

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: where dockerd's two cgroup drivers put containers, below the hierarchy's base
PARENTS = ("docker", "system.slice")


def hierarchy(root: Path = CGROUP_ROOT) -> tuple[Path, bool]:
    """The base under which container cgroups live, and whether it is cgroup v2 (the unified hierarchy);
    on v1 that is the freezer hierarchy, the one that can hold a container's processes."""
    v2 = (root / "cgroup.controllers").exists()
    return (root if v2 else root / "freezer"), v2


def _is_id(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def container_id_of(name: str) -> str | None:
    """The container a cgroup directory is named for: ``<id>`` (cgroupfs) or ``docker-<id>.scope``
    (systemd); None for any other directory (system.slice holds every service's cgroup)."""
    if name.startswith("docker-") and name.endswith(".scope"):
        name = name[len("docker-") : -len(".scope")]
    return name if _is_id(name) else None


class CgroupError(ImageGuardError):
    """The container's cgroup could not be read or written."""


@dataclass(frozen=True, slots=True)
class ContainerCgroup:
    path: Path
    v2: bool

    @classmethod
    def find(cls, container_id: str, root: Path = CGROUP_ROOT) -> ContainerCgroup | None:
        if not _is_id(container_id):
            return None  # only a full id names a cgroup; never build a path from anything else
        base, v2 = hierarchy(root)
        for parent in PARENTS:
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


class CgroupWatch:
    """Calls ``on_cgroup(container_id, cgroup)`` on its own thread the moment a container's cgroup is made.

    inotify on every directory of the hierarchy (the freezer one on v1): dockerd's parents (``docker/`` for
    cgroupfs, ``system.slice/`` for systemd) and any other, containers' own cgroups included, since
    ``docker run --cgroup-parent`` puts a container wherever its creator likes (even inside another
    container's cgroup). A new directory is watched at once and what was made in it before that is looked
    at, so a ``mkdir -p`` cannot outrun the watch.
    The callback runs on the watch thread, so it must be quick: it freezes and hands the rest to others.
    """

    def __init__(self, on_cgroup: Callable[[str, ContainerCgroup], None], root: Path = CGROUP_ROOT) -> None:
        self.on_cgroup = on_cgroup
        self.root = root
        self.base, self.v2 = hierarchy(root)
        self._inotify: INotify | None = None
        self._dirs: dict[int, Path] = {}  # watch descriptor -> directory
        #: container id -> its cgroup, wherever it was made (bounded); dropped when the directory goes, so
        #: that the next start (a new directory) is reported, but not the same one twice (its creation
        #: event and the look into its new parent may both see it)
        self._containers: dict[str, ContainerCgroup] = {}
        self._lock = threading.Lock()
        self._stop_r, self._stop_w = -1, -1
        self._thread: threading.Thread | None = None
        #: events the kernel dropped (its queue overflowed): those containers wait for their start event
        self.overflows = 0

    def start(self) -> None:
        """Raises CgroupError when the hierarchy cannot be watched (no cgroup access, no inotify)."""
        if not self.base.is_dir():
            raise CgroupError(f"no cgroup hierarchy to watch at {self.base}")
        try:
            self._inotify = INotify()
            self._watch_tree(self.base, report=False)
        except OSError as exc:
            if self._inotify is not None:
                self._inotify.close()
            raise CgroupError(f"cannot watch {self.base} for new containers: {exc.strerror or exc}") from None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="cgroup-watch", daemon=True)
        self._thread.start()

    def find(self, container_id: str) -> ContainerCgroup | None:
        """A container's cgroup: where the watch saw it made, else where dockerd's drivers put it."""
        with self._lock:
            seen = self._containers.get(container_id)
        if seen is not None and seen.path.is_dir():
            return seen
        return ContainerCgroup.find(container_id, self.root)

    def existing(self) -> list[tuple[str, ContainerCgroup]]:
        """The container cgroups there are now (an agent that starts looks for what an earlier one froze):
        what the walk at start found and the watch saw made since, less what it saw go; no I/O."""
        with self._lock:
            return list(self._containers.items())

    def stop(self) -> None:
        if self._thread is None:
            return
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=5)
        self._thread = None
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        if self._inotify is not None:
            self._inotify.close()

    def _watch_tree(self, directory: Path, *, report: bool) -> None:
        """Watch ``directory`` and every directory below it; containers' cgroups among them are reported
        (when ``report``: they were made after the watch began)."""
        assert self._inotify is not None
        try:
            wd = self._inotify.add_watch(directory, flags.CREATE | flags.DELETE | flags.ONLYDIR)
        except OSError:  # gone already, or the watch limit: its containers wait for their start event
            if directory == self.base:
                raise
            log.debug("cgroup watch: cannot watch %s", directory)
            return
        with self._lock:
            self._dirs[wd] = directory
        with contextlib.suppress(OSError):
            for entry in os.scandir(directory):
                if entry.is_dir(follow_symlinks=False):
                    self._found(Path(entry.path), report=report)

    def _found(self, path: Path, *, report: bool) -> None:
        cid = container_id_of(path.name)
        if cid is not None:
            cgroup = ContainerCgroup(path, self.v2)
            with self._lock:
                if self._containers.get(cid) == cgroup:
                    return  # this very cgroup was seen already (its event, and the look into its parent)
                self._containers[cid] = cgroup
                while len(self._containers) > 16384:  # bounded: drop the oldest
                    del self._containers[next(iter(self._containers))]
            if report:
                self.on_cgroup(cid, cgroup)  # frozen first: watching inside it can wait
        self._watch_tree(path, report=report)

    def _run(self) -> None:
        assert self._inotify is not None
        poller = select.poll()
        poller.register(self._inotify.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._stop_r in ready:
                return
            for event in self._inotify.read(timeout=0):
                try:
                    self._event(event.wd, event.mask, event.name)
                except Exception:  # one bad event never ends the watch
                    log.exception("cgroup watch: handling a new cgroup failed")

    def _event(self, wd: int, mask: int, name: str) -> None:
        if mask & flags.Q_OVERFLOW:
            self.overflows += 1
            log.warning("cgroup watch: the kernel dropped events; those containers are frozen at their start")
            return
        if mask & flags.IGNORED:  # the directory is gone, and its watch with it
            with self._lock:
                self._dirs.pop(wd, None)
            return
        with self._lock:
            parent = self._dirs.get(wd)
        if parent is None or not mask & flags.ISDIR:
            return
        if mask & flags.DELETE:
            if (cid := container_id_of(name)) is not None:
                with self._lock:
                    if self._containers.get(cid) == ContainerCgroup(parent / name, self.v2):
                        del self._containers[cid]
            return
        self._found(parent / name, report=True)
