"""What preventive mode costs: latency the authorization plugin adds to engine API calls.

Run: ``.venv/bin/python bench/authz.py [--starts 100] [--lists 500]`` (root: it starts two private dockerds
and writes a plugin spec file to /etc/docker/plugins, removed afterwards).

Two private engines run side by side in the same run: one with ``--authorization-plugin`` answered by the
agent (a separate process, enforce mode, the image allowlisted), one without any plugin or agent. Measured
from this process with docker-py, alternating between the engines so drift hits both alike:

* ``docker start`` of an allowed container (``POST /containers/{id}/start``): the plugin decides, looking the
  container and its image up through the engine (which asks the plugin about those lookups too). Two kinds:
  ``pulled`` (the image has a registry digest, as images pulled onto a device do: the agent caches the image
  facts, one lookup per start) and ``built`` (a local build without registry digest: two lookups per start);
* ``GET /containers/json``: the plugin only classifies the request and allows it.

Besides the difference of the medians, the median of paired differences (each start on one engine paired
with the one right after it on the other) is printed: it is steadier on a busy machine.

Goals: p50 overhead under 5 ms for a create (the plugin judges its image and start options), under 2 ms
for the start that follows it, and under 1 ms for a list.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker
from harness import HEADER, PYTHON, REPO, TRAP_ENTRYPOINT, Summary, row

from tests.support.dockerd import Dockerd
from tests.support.fixtures.registry import start_registry, stop_registry

IMAGE = "imageguard-bench/authz:1"
# the start follows a create the plugin judged: dockerd shows the plugin the create's response too
GOALS_MS = {"create": 5.0, "start": 2.0, "list": 1.0}
SPEC_DIR = Path("/etc/docker/plugins")


@contextmanager
def registry_server(directory: Path) -> Iterator[Any]:
    directory.mkdir(parents=True)
    running = start_registry(directory)
    try:
        yield running
    finally:
        stop_registry(running)


@contextmanager
def engine(root: Path, plugin: str | None) -> Iterator[Dockerd]:
    d = Dockerd(root, extra_args=[f"--authorization-plugin={plugin}"] if plugin else [])
    d.start()
    try:
        yield d
    finally:
        try:
            d.remove_all_containers()
        finally:
            d.stop()


@contextmanager
def agent(workdir: Path, engine_url: str, socket: Path) -> Iterator[subprocess.Popen[bytes]]:
    state = workdir / "state"
    cfg = workdir / "config.toml"
    cfg.write_text(
        f'[device]\nid = "bench"\n\n[engine]\nurl = "{engine_url}"\n\n[state]\ndir = "{state}"\n\n'
        '[enforcement]\nmode = "enforce"\nstop_grace_seconds = 0\n\n'
        f'[preventive]\nenabled = true\nsocket = "{socket}"\nallow_build = true\n\n[logging]\nlevel = "warning"\n'
    )
    log = (workdir / "agent.log").open("ab")
    proc = subprocess.Popen(
        [PYTHON, "-m", "agent", "--config", str(cfg), "run"], cwd=REPO, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the agent did not serve {socket}; see {workdir / 'agent.log'}")
            time.sleep(0.05)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def allowlist(workdir: Path, *image_ids: str) -> None:
    subprocess.run(
        [PYTHON, "-m", "agent", "--config", str(workdir / "config.toml"), "allowlist", "add", *image_ids],
        cwd=REPO,
        check=True,
        capture_output=True,
    )


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1e6


def measure(
    apis: dict[str, docker.APIClient], images: dict[str, str], starts: int, lists: int
) -> dict[str, dict[str, list[float]]]:
    """Per engine: start latency per image kind (``start:<kind>``) and list latency."""
    out: dict[str, dict[str, list[float]]] = {k: {} for k in apis}
    for api in apis.values():  # warm-up: connections
        for _ in range(20):
            api.containers()
    order = list(apis)
    for kind, image in images.items():
        ids: dict[str, list[str]] = {k: [] for k in apis}
        for k in apis:
            out[k][f"create:{kind}"] = []
        for i in range(starts):
            for k in order if i % 2 else reversed(order):
                t0 = time.perf_counter_ns()
                ids[k].append(str(apis[k].create_container(image, name=f"bench-authz-{kind}-{i}")["Id"]))
                out[k][f"create:{kind}"].append((time.perf_counter_ns() - t0) / 1e6)
        for k in apis:
            out[k][f"start:{kind}"] = []
        for i in range(starts):
            for k in order if i % 2 else reversed(order):  # alternate who goes first
                out[k][f"start:{kind}"].append(timed(lambda api=apis[k], cid=ids[k][i]: api.start(cid)))  # type: ignore[misc]
    for k in apis:
        out[k]["list"] = []
    for i in range(lists):
        for k in order if i % 2 else reversed(order):
            out[k]["list"].append(timed(lambda api=apis[k]: api.containers()))  # type: ignore[misc]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--starts", type=int, default=100)
    ap.add_argument("--lists", type=int, default=500)
    ap.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ig-bench-az-", dir="/tmp"))
    name = f"imageguard-bench-{work.name.removeprefix('ig-bench-az-')}"
    socket = work / "plugins" / "plugin.sock"  # its directory is protected from binds: nothing else in it
    SPEC_DIR.mkdir(parents=True, exist_ok=True)
    spec = SPEC_DIR / f"{name}.spec"
    spec.write_text(f"unix://{socket}\n")
    (work / "agent").mkdir()
    try:
        with (
            registry_server(work / "registry") as registry,
            agent(work / "agent", f"unix://{work / 'with' / 'docker.sock'}", socket),
            engine(work / "with", name) as with_plugin,
            engine(work / "without", None) as without,
        ):
            pulled = f"{registry.server.host}/bench/authz:1"
            for eng in (with_plugin, without):
                eng.build_image(IMAGE, "bench-authz", TRAP_ENTRYPOINT)
                eng.build_image(pulled, "bench-authz-pulled", TRAP_ENTRYPOINT)
                eng.docker("push", "-q", pulled)  # now it has a registry digest, as a pulled image does
            allowlist(work / "agent", with_plugin.image_id(IMAGE), with_plugin.image_id(pulled))
            time.sleep(1)  # the agent reloads its policy on notification
            apis = {
                "plugin": docker.APIClient(base_url=with_plugin.url, version="auto", timeout=60),
                "none": docker.APIClient(base_url=without.url, version="auto", timeout=60),
            }
            figures = measure(apis, {"pulled": pulled, "built": IMAGE}, args.starts, args.lists)
            for api in apis.values():
                api.close()
    finally:
        spec.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"authorization plugin overhead ({args.starts} starts, {args.lists} lists per engine)")
    print(HEADER)
    result: dict[str, object] = {}
    ok = True
    for what in ("create:pulled", "start:pulled", "create:built", "start:built", "list"):
        base, plug = Summary.of(figures["none"][what]), Summary.of(figures["plugin"][what])
        # the median of paired differences is steadier than the difference of medians on a busy machine
        paired = statistics.median(
            p - b for p, b in zip(figures["plugin"][what], figures["none"][what], strict=True)
        )
        overhead = plug.p50 - base.p50
        met = overhead < GOALS_MS[what.split(":")[0]]
        ok &= met
        print(row(f"{what}: without plugin", base))
        print(row(f"{what}: with plugin (agent deciding)", plug))
        print(
            f"  -> p50 overhead {overhead:.2f} ms, median paired difference {paired:.2f} ms "
            f"(goal < {GOALS_MS[what.split(':')[0]]:g} ms): {'met' if met else 'MISSED'}"
        )
        result[what] = {
            "without": base.__dict__,
            "with": plug.__dict__,
            "p50_overhead_ms": overhead,
            "median_paired_difference_ms": paired,
            "met": met,
        }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
