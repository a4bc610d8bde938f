"""A private dockerd for tests and benchmarks: its own socket, data root and no networking.

Tests enforce on every container of the engine they are given, so they never touch the system's engine.
The binary is Debian's docker.io dockerd; we run it as root, which these machines are.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.process import terminate

BUSYBOX = Path("/usr/bin/busybox")
#: how a start the agent's gate refused fails: runc reports the container's first process killed
GATE_ERROR = "OCI runtime create failed"


@dataclass
class Dockerd:
    root: Path
    extra_args: list[str] = field(default_factory=list)
    #: a command that runs dockerd (e.g. in a mount namespace of its own): it must exec dockerd in the end
    wrapper: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.url}

    def start(self, timeout: float = 60.0) -> None:
        dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        with open(self.root / "dockerd.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *self.wrapper,
                    dockerd,
                    "--host",
                    self.url,
                    "--data-root",
                    str(self.root / "data"),
                    "--exec-root",
                    str(self.root / "exec"),
                    "--pidfile",
                    str(self.root / "docker.pid"),
                    "--bridge=none",
                    "--iptables=false",
                    "--ip-masq=false",
                    "--ip-forward=false",
                    "--storage-driver",
                    os.environ.get("IMAGEGUARD_TEST_STORAGE_DRIVER", "overlay2"),
                    "--log-level",
                    "warn",
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited early; see {self.root / 'dockerd.log'}")
            if self.socket.exists():
                try:
                    if self.docker("version", check=False, timeout=5).returncode == 0:
                        return
                except subprocess.TimeoutExpired:
                    pass  # a busy host: dockerd is up but slow to answer its first request; ask again
            time.sleep(0.1)
        raise RuntimeError(f"dockerd did not answer within {timeout}s; see {self.root / 'dockerd.log'}")

    def stop(self) -> None:
        if self.proc is None:
            return
        terminate(self.proc, 30)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def docker(
        self, *args: str, check: bool = True, timeout: float = 120, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the docker CLI against this engine."""
        result = subprocess.run(
            ["docker", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input.decode() if input is not None else None,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def run_untrusted(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``docker run ARGS`` of a container the agent under test will block. Either its start fails at the
        agent's gate (killed before its entrypoint ran: the runtime's error), or it starts and the agent
        removes it at its start event (a signature to check, a gate that is off); anything else fails."""
        return self._untrusted("run", *args)

    def start_untrusted(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``docker start ARGS`` of a container the agent under test will block (see run_untrusted)."""
        return self._untrusted("start", *args)

    def _untrusted(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = self.docker(*args, check=False)
        if result.returncode != 0 and GATE_ERROR not in result.stderr:
            raise RuntimeError(f"docker {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def build_image(self, tag: str, marker: str = "", entrypoint: list[str] | None = None) -> str:
        """Build a tiny busybox image FROM scratch; ``marker`` makes its digest unique. Returns the image id."""
        with tempfile.TemporaryDirectory() as ctx:
            shutil.copy(BUSYBOX, Path(ctx) / "busybox")
            (Path(ctx) / "marker").write_text(marker or tag)
            ep = entrypoint or ["/bin/busybox", "sleep", "3600"]
            (Path(ctx) / "Dockerfile").write_text(
                f"FROM scratch\nCOPY busybox /bin/busybox\nCOPY marker /marker\nENTRYPOINT {_json_list(ep)}\n"
            )
            self.docker("build", "-q", "-t", tag, ctx, timeout=300)
        return self.image_id(tag)

    def image_id(self, ref: str) -> str:
        return self.docker("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip()

    def has_container(self, name: str) -> bool:
        """Whether a container of exactly this name exists. (``docker inspect NAME`` also answers for any
        image or container whose id starts with NAME: a test's "a1" or "bad" can match an image id.)"""
        names = self.docker("ps", "-a", "--format", "{{.Names}}").stdout.split()
        return name in names

    def container_ids(self) -> set[str]:
        out = self.docker("ps", "-aq", "--no-trunc").stdout.split()
        return set(out)

    def remove_all_containers(self) -> None:
        ids = self.container_ids()
        if ids:
            self.docker("rm", "-f", *ids, check=False)


def _json_list(items: list[str]) -> str:
    import json

    return json.dumps(items)


def start_private_dockerd(root: Path | None = None) -> Dockerd:
    root = root or Path(tempfile.mkdtemp(prefix="ig-dockerd-", dir="/tmp"))
    d = Dockerd(root)
    d.start()
    return d
