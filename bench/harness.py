"""Shared pieces of the benchmarks: a private dockerd, the agent as a separate process, an event watcher.

Everything runs against a private dockerd (its own socket and data root): the agent removes every container
it does not trust, so a benchmark must never point it at the system's engine.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import docker  # noqa: E402

from tests.support.dockerd import Dockerd, start_private_dockerd  # noqa: E402

#: exits at once on SIGTERM, so a stop with a grace period costs no more than the engine's own work
TRAP_ENTRYPOINT = ["/bin/busybox", "sh", "-c", "trap 'exit 0' TERM; /bin/busybox sleep 3600 & wait"]
BENCH_LABEL = "imageguard.bench"
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else sys.executable

# measure the agent as installed: an editable checkout is not byte-compiled, and with
# PYTHONDONTWRITEBYTECODE every start would compile the package again (slower, and the ASTs stay in RSS)
subprocess.run([PYTHON, "-m", "compileall", "-q", "-j", "0", str(REPO / "agent")], check=True)


# -- statistics --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    n: int
    p50: float
    p95: float
    max: float

    @classmethod
    def of(cls, values_ms: Sequence[float]) -> Summary:
        if not values_ms:
            return cls(0, float("nan"), float("nan"), float("nan"))
        ordered = sorted(values_ms)
        return cls(len(ordered), statistics.median(ordered), percentile(ordered, 95), ordered[-1])


def percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def row(label: str, s: Summary, extra: str = "") -> str:
    return f"  {label:<44} {s.n:>4} {s.p50:>9.1f} {s.p95:>9.1f} {s.max:>9.1f}  {extra}"


HEADER = f"  {'measurement (ms)':<44} {'n':>4} {'p50':>9} {'p95':>9} {'max':>9}"


# -- the engine --------------------------------------------------------------------------------------


@contextmanager
def private_engine() -> Iterator[Dockerd]:
    """A private dockerd for the length of the block; stopped and its data root deleted afterwards."""
    root = Path(tempfile.mkdtemp(prefix="ig-bench-dockerd-", dir="/tmp"))
    d = start_private_dockerd(root)
    try:
        yield d
    finally:
        try:
            d.remove_all_containers()
        finally:
            d.stop()
            subprocess.run(["rm", "-rf", str(root)], check=False)


def client(d: Dockerd) -> docker.APIClient:
    return docker.APIClient(base_url=d.url, version="auto", timeout=60)


def create_containers(api: docker.APIClient, image: str, count: int, prefix: str) -> list[str]:
    return [
        str(api.create_container(image, name=f"{prefix}-{i}", labels={BENCH_LABEL: "1"})["Id"])
        for i in range(count)
    ]


def leftovers(api: docker.APIClient) -> list[str]:
    return [str(c["Id"]) for c in api.containers(all=True, filters={"label": BENCH_LABEL})]


def remove_leftovers(api: docker.APIClient) -> None:
    for cid in leftovers(api):
        with suppress(docker.errors.NotFound):
            api.remove_container(cid, force=True)


# -- our own event subscriber ------------------------------------------------------------------------


@dataclass
class Seen:
    """Per container: when each event happened (engine timeNano) and when this process received it."""

    event_ns: dict[str, int] = field(default_factory=dict)
    received_ns: dict[str, int] = field(default_factory=dict)


class EventWatcher:
    """Follows container start/die/destroy events on its own connection, stamping each with receipt time.

    ``on_start`` (optional) is called on the watcher thread for each start event: the floor benchmark uses it
    to act like a minimal agent.
    """

    ACTIONS = ("start", "die", "destroy")

    def __init__(self, url: str, on_start: Any = None) -> None:
        self._api = docker.APIClient(base_url=url, version="auto", timeout=None)
        self._stream: Any = None
        self._cond = threading.Condition()
        self.seen: dict[str, Seen] = {}
        self.on_start = on_start
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-events", daemon=True)

    def __enter__(self) -> EventWatcher:
        since = time.time()
        self._stream = self._api.events(
            since=f"{since:.9f}", filters={"type": ["container"], "event": list(self.ACTIONS)}, decode=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with suppress(Exception):
            self._stream.close()
        self._api.close()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            for raw in self._stream:
                received = time.time_ns()
                action = raw.get("Action") or raw.get("status")
                cid = (raw.get("Actor") or {}).get("ID") or raw.get("id")
                if action not in self.ACTIONS or not cid:
                    continue
                with self._cond:
                    s = self.seen.setdefault(cid, Seen())
                    s.event_ns[action] = int(raw.get("timeNano") or received)
                    s.received_ns[action] = received
                    self._cond.notify_all()
                if action == "start" and self.on_start is not None:
                    self.on_start(cid)
        except Exception:  # the stream is closed under us at the end
            pass

    def wait_for(self, ids: Sequence[str], action: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not all(action in self.seen.get(c, Seen()).event_ns for c in ids):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def event_ns(self, cid: str, action: str) -> int | None:
        with self._cond:
            return self.seen.get(cid, Seen()).event_ns.get(action)

    def received_ns(self, cid: str, action: str) -> int | None:
        with self._cond:
            return self.seen.get(cid, Seen()).received_ns.get(action)


# -- the agent as a separate process -----------------------------------------------------------------


@dataclass
class AgentProcess:
    """``python -m agent --config FILE run --log-format json`` with its log lines stamped on arrival."""

    engine_url: str
    workdir: Path
    grace: int = 1
    policy: dict[str, Any] | None = None
    #: extra environment variables and interpreter options (to try tuning such as MALLOC_ARENA_MAX or -OO)
    env: dict[str, str] = field(default_factory=dict)
    python_args: list[str] = field(default_factory=list)
    #: more TOML appended to the configuration (e.g. a [metrics] section)
    extra_config: str = ""
    #: more keys of the [enforcement] section (e.g. "freeze_on_create = false")
    enforcement: str = ""
    proc: subprocess.Popen[bytes] | None = None
    launched_ns: int = 0
    lines: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def write_config(self) -> Path:
        state = self.workdir / "state"
        state.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "config.toml"
        cfg.write_text(
            f'[device]\nid = "bench"\n\n[engine]\nurl = "{self.engine_url}"\n\n[state]\ndir = "{state}"\n\n'
            f'[enforcement]\nmode = "enforce"\nstop_grace_seconds = {self.grace}\n{self.enforcement}\n'
            '[logging]\nlevel = "info"\nformat = "json"\n' + self.extra_config
        )
        return cfg

    def command(self) -> list[str]:
        cmd = [
            PYTHON,
            *self.python_args,
            "-m",
            "agent",
            "--config",
            str(self.write_config()),
            "run",
            "--log-format",
            "json",
        ]
        if self.policy is not None:
            path = self.workdir / "policy.json"
            path.write_text(json.dumps(self.policy))
            cmd += ["--policy", str(path)]
        return cmd

    def cli(self, *args: str) -> str:
        """Run an ``imageguard`` command against this agent's config and state (as an operator would)."""
        cmd = [PYTHON, "-m", "agent", "--config", str(self.write_config()), *args]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout

    def launch(self, cmd: list[str] | None = None) -> None:
        cmd = cmd or self.command()
        self.launched_ns = time.time_ns()
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env={**os.environ, **self.env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        threading.Thread(target=self._read, name="bench-agent-log", daemon=True).start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with (self.workdir / "agent.log").open("ab") as copy:
            for line in self.proc.stderr:
                received = time.time_ns()
                copy.write(line)
                try:
                    rec = json.loads(line)
                except ValueError:
                    rec = {"message": line.decode(errors="replace").rstrip()}
                with self._cond:
                    self.lines.append((received, rec))
                    self._cond.notify_all()

    def wait_log(self, needle: str, timeout: float = 30.0) -> int:
        """Receipt time (ns) of the first log line containing ``needle``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for received, rec in self.lines:
                    if needle in str(rec.get("message", "")):
                        return received
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc is not None and self.proc.poll() is not None):
                    raise RuntimeError(f"agent did not log {needle!r}; see {self.workdir / 'agent.log'}")
                self._cond.wait(min(left, 0.2))

    def count_log(self, needle: str) -> int:
        with self._cond:
            return sum(1 for _, rec in self.lines if needle in str(rec.get("message", "")))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def proc_cpu_ticks(pid: int) -> int:
    """utime + stime of the process (all threads), in clock ticks."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), counted after the comm field


CLK_TCK = os.sysconf("SC_CLK_TCK")
