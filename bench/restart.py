"""What an agent restart costs ``docker run`` in preventive mode, with and without socket activation.

Run: ``.venv/bin/python bench/restart.py [--rounds 3] [--down 2]`` (root: it starts a private dockerd and writes
a plugin spec file to /etc/docker/plugins, removed afterwards).

dockerd asks the authorization plugin about every request. While the agent restarts (systemd's
``RestartSec=2`` in deploy/systemd/imageguard.service: ``--down`` seconds here), a ``docker run`` of an
allowlisted image is started, and timed until it has run and exited:

* **plain**: the agent binds its own socket; it is gone while the agent is down, so dockerd's plugin client
  gets "connection refused" and retries with its own backoff;
* **socket-activated**: this process holds the listening socket, as systemd does with
  deploy/systemd/imageguard.socket, and hands it to every agent start (LISTEN_FDS): the request waits in the
  socket's backlog and is answered as soon as the agent is back.

The floor, measured in the same run, is the restart itself: ``--down`` plus the time from launching the agent
to its plugin answering.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import PYTHON, REPO

from tests.support.dockerd import Dockerd

IMAGE = "imageguard-bench/restart:1"
SPEC_DIR = Path("/etc/docker/plugins")


def write_config(work: Path, engine_url: str, sock: Path) -> Path:
    cfg = work / "config.toml"
    cfg.write_text(
        f'[device]\nid = "bench"\n\n[engine]\nurl = "{engine_url}"\n\n[state]\ndir = "{work / "state"}"\n\n'
        '[enforcement]\nmode = "enforce"\nstop_grace_seconds = 0\n\n'
        f'[preventive]\nenabled = true\nsocket = "{sock}"\nallow_build = true\n\n[logging]\nlevel = "warning"\n'
    )
    return cfg


def launch(cfg: Path, log: Path, held: socket.socket | None) -> subprocess.Popen[bytes]:
    """Start the agent; with ``held``, pass it the listening socket as systemd does (fd 3, LISTEN_*)."""

    def as_systemd() -> None:  # in the child, before exec
        if held is not None:
            os.dup2(held.fileno(), 3)
            os.environ["LISTEN_FDS"] = "1"
            os.environ["LISTEN_PID"] = str(os.getpid())

    out = log.open("ab")
    try:
        return subprocess.Popen(
            [PYTHON, "-m", "agent", "--config", str(cfg), "run"],
            cwd=REPO,
            stdout=out,
            stderr=out,
            preexec_fn=as_systemd,
            pass_fds=(held.fileno(),) if held is not None else (),
        )
    finally:
        out.close()


def answers(sock: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1)
            s.connect(str(sock))
            s.sendall(
                b"POST /Plugin.Activate HTTP/1.1\r\nHost: p\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
            )
            return b" 200 " in s.recv(100)
    except OSError:
        return False


def wait_answering(sock: Path, timeout: float = 30) -> float:
    start = time.monotonic()
    while not answers(sock):
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"the agent did not answer on {sock}")
        time.sleep(0.02)
    return time.monotonic() - start


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def one_restart(
    engine: Dockerd,
    cfg: Path,
    log: Path,
    sock: Path,
    held: socket.socket | None,
    down: float,
    agent: list[subprocess.Popen[bytes]],
) -> tuple[float, bool, float]:
    """Restart the agent while a ``docker run`` is made; (run seconds, ok, floor seconds)."""
    stop(agent[0])
    result: dict[str, object] = {}

    def run() -> None:
        t0 = time.monotonic()
        out = engine.docker("run", "--rm", IMAGE, check=False, timeout=120)
        result.update(seconds=time.monotonic() - t0, ok=out.returncode == 0)

    runner = threading.Thread(target=run)
    runner.start()
    time.sleep(down)
    launched = time.monotonic()
    agent[0] = launch(cfg, log, held)
    wait_answering(sock)
    floor = down + (time.monotonic() - launched)
    runner.join(timeout=150)
    print(
        f"    run {result.get('seconds', float('nan')):.2f} s ok={result.get('ok')} floor {floor:.2f} s",
        flush=True,
    )
    return float(result["seconds"]), bool(result["ok"]), floor  # type: ignore[arg-type]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--down", type=float, default=2.0, help="seconds the agent is down (systemd RestartSec)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ig-bench-rs-", dir="/tmp"))
    name = f"imageguard-bench-{work.name.removeprefix('ig-bench-rs-')}"
    sock = work / "plugins" / "plugin.sock"
    sock.parent.mkdir()
    SPEC_DIR.mkdir(parents=True, exist_ok=True)
    spec = SPEC_DIR / f"{name}.spec"
    spec.write_text(f"unix://{sock}\n")
    engine = Dockerd(work / "engine", extra_args=[f"--authorization-plugin={name}"])
    cfg = write_config(work, engine.url, sock)
    log = work / "agent.log"
    figures: dict[str, list[tuple[float, bool, float]]] = {"plain": [], "socket-activated": []}
    agent = [launch(cfg, log, None)]
    try:
        wait_answering(sock)
        engine.start()
        engine.build_image(IMAGE, "bench-restart", ["/bin/busybox", "true"])
        subprocess.run(
            [PYTHON, "-m", "agent", "--config", str(cfg), "allowlist", "add", engine.image_id(IMAGE)],
            cwd=REPO, check=True, capture_output=True,
        )  # fmt: skip
        time.sleep(1)
        for _ in range(args.rounds):
            figures["plain"].append(one_restart(engine, cfg, log, sock, None, args.down, agent))
        # from now on this process holds the socket, as systemd does; the agent serves what it is handed
        stop(agent[0])
        sock.unlink(missing_ok=True)
        held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        held.bind(str(sock))
        os.chmod(sock, 0o600)
        held.listen(128)
        agent[0] = launch(cfg, log, held)
        wait_answering(sock)
        for _ in range(args.rounds):
            figures["socket-activated"].append(one_restart(engine, cfg, log, sock, held, args.down, agent))
    finally:
        try:
            if agent[0].poll() is None:  # dockerd asks the plugin about the clean-up too: agent last
                engine.remove_all_containers()
                stop(agent[0])
        finally:
            engine.stop()
            spec.unlink(missing_ok=True)
            subprocess.run(["rm", "-rf", str(work)], check=False)
    print(f"docker run during an agent restart (agent down {args.down:g} s; {args.rounds} rounds each)")
    for mode, runs in figures.items():
        secs = [r[0] for r in runs]
        floors = [r[2] for r in runs]
        failed = sum(1 for r in runs if not r[1])
        print(
            f"  {mode:<17} docker run median {statistics.median(secs):6.2f} s, max {max(secs):6.2f} s, "
            f"{failed} failed;  floor (restart until the plugin answers) median {statistics.median(floors):5.2f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
