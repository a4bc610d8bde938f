"""Issue 3 on the real engine: a running agent verifies cosign signatures before it lets a container run.

Images are built on a private dockerd, pushed with ``docker push`` to a real docker-registry on loopback and
signed with ``imageguard sign``; the trust anchor comes from ``imageguard anchors add --scope HOST/acme/*``.
Every image here has its own marker: the verified set holds digests, and equal content means equal digests.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.core.schemas import validate
from tests.support.agentproc import AgentProcess, cli, wait_for
from tests.support.dockerd import Dockerd
from tests.support.fixtures.registry import RegistryServer, start_registry, stop_registry
from tests.support.fixtures.stall import StallingFront
from tests.support.signing import build_and_push, generate_keys, registry_entry, write_agent_config

pytestmark = pytest.mark.integration


@dataclass
class Images:
    host: str
    pub: Path
    other_pub: Path
    signed: str
    unsigned: str
    wrong: str  # signed, but with a key no anchor holds
    burst: str  # unsigned, for the burst of starts


def sign(config: Path, image: str, key: Path, password_file: Path) -> None:
    cli(config, "sign", image, "--key", str(key), "--passphrase-file", str(password_file), check=True)


def push_images(engine: Dockerd, server: RegistryServer, d: Path, prefix: str) -> Images:
    config = write_agent_config(
        d / "signer.toml", {"state": {"dir": str(d / "signer-state")}}, [registry_entry(server)]
    )
    key, pub, pw = generate_keys(config, d / "cosign")
    other_key, other_pub, other_pw = generate_keys(config, d / "other")
    h = server.host
    images = Images(
        h,
        pub,
        other_pub,
        f"{h}/acme/signed:1",
        f"{h}/acme/unsigned:1",
        f"{h}/acme/wrong:1",
        f"{h}/acme/burst:1",
    )
    for image in (images.signed, images.unsigned, images.wrong, images.burst):
        build_and_push(engine, image, f"{prefix}-{image}")
    sign(config, images.signed, key, pw)
    sign(config, images.wrong, other_key, other_pw)
    return images


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    running = start_registry(tmp_path_factory.mktemp("enforce-registry"))
    yield running.server
    stop_registry(running)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, dockerd: Dockerd, registry: RegistryServer) -> Images:
    return push_images(dockerd, registry, tmp_path_factory.mktemp("enforce-keys"), "enforce")


def agent_config(tmp_path: Path, engine: Dockerd, server: RegistryServer, images: Images) -> Path:
    config = write_agent_config(
        tmp_path / "config.toml",
        {
            "device": {"id": "verify-device"},
            "engine": {"url": engine.url},
            "state": {"dir": str(tmp_path / "state")},
            "enforcement": {"stop_grace_seconds": 0, "verify_timeout_seconds": 10},
        },
        [registry_entry(server)],
    )
    out = cli(config, "anchors", "add", "acme", "--key", str(images.pub), "--scope", f"{images.host}/acme/*")
    assert out.returncode == 0, out.stderr
    return config


@pytest.fixture
def agent(
    tmp_path: Path, engine: Dockerd, registry: RegistryServer, images: Images
) -> Iterator[tuple[Path, AgentProcess]]:
    config = agent_config(tmp_path, engine, registry, images)
    proc = AgentProcess(config, tmp_path / "agent.log").start()
    yield config, proc
    if proc.proc is not None:
        assert proc.stop() == 0, proc.log()


def state(engine: Dockerd, name: str) -> dict[str, Any] | None:
    out = engine.docker("inspect", "--format", "{{json .State}}", name, check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def running(engine: Dockerd, name: str) -> bool:
    s = state(engine, name)
    return s is not None and s["Running"] and not s["Paused"]


def gone(engine: Dockerd, name: str, timeout: float = 20) -> None:
    wait_for(lambda: state(engine, name) is None, timeout, what=f"container {name} to be removed")


def decisions(config: Path) -> list[dict[str, Any]]:
    out = cli(config, "decisions", "--limit", "1000", "--json", check=True)
    records: list[dict[str, Any]] = json.loads(out.stdout)["decisions"]
    for record in records:
        validate(record, "decision", "decision record")
    return records


def last_decision(config: Path, name: str) -> dict[str, Any]:
    mine = [d for d in decisions(config) if d["container"]["name"] == name]
    assert mine, f"no decision recorded for {name}"
    return max(mine, key=lambda d: d["time"])


def engine_actions(engine: Dockerd, container: str, since: float) -> list[str]:
    out = engine.docker(
        "events",
        "--since",
        f"{since:.3f}",
        "--until",
        f"{time.time():.3f}",
        "--filter",
        f"container={container}",
        "--format",
        "{{.Action}}",
    )
    return out.stdout.split()


def test_signed_is_frozen_verified_thawed_others_killed(
    agent: tuple[Path, AgentProcess], engine: Dockerd, images: Images
) -> None:
    config, proc = agent
    t0 = time.time()
    cid = engine.docker("run", "-d", "--name", "signed", images.signed).stdout.strip()
    proc.wait_log("allowed container signed")
    engine.run_untrusted("-d", "--name", "unsigned", images.unsigned)
    engine.run_untrusted("-d", "--name", "wrong", images.wrong)
    gone(engine, "unsigned")
    gone(engine, "wrong")
    assert running(engine, "signed")
    actions = engine_actions(engine, cid, t0)
    # frozen through its cgroup at its start event and thawed once verified: the engine was asked nothing
    assert "start" in actions and not {"pause", "unpause", "kill", "stop"} & set(actions), actions
    good = last_decision(config, "signed")
    assert (good["verdict"], good["reason"]) == ("allowed", "signature-verified"), good
    assert "acme" in good["detail"]
    for name in ("unsigned", "wrong"):
        bad = last_decision(config, name)
        assert (bad["verdict"], bad["reason"]) == ("blocked", "signature-invalid"), bad
    assert "signature-mismatch" in last_decision(config, "wrong")["detail"]
    assert "no signatures found" in last_decision(config, "unsigned")["detail"]
    # a second start of the verified image needs no verification at all
    engine.docker("run", "-d", "--name", "signed-again", images.signed)
    proc.wait_log("allowed container signed-again")
    assert last_decision(config, "signed-again")["reason"] == "verified-before"
    assert proc.log().count(f"verified {images.host}/acme/signed@") == 1


def test_burst_of_unsigned_starts_costs_one_verification(
    agent: tuple[Path, AgentProcess], engine: Dockerd, images: Images
) -> None:
    config, proc = agent
    names = [f"burst-{i}" for i in range(5)]
    with ThreadPoolExecutor(5) as pool:
        list(pool.map(lambda n: engine.run_untrusted("-d", "--name", n, images.burst), names))
    for name in names:
        gone(engine, name)
    verifications = proc.log().count(f"signature verification of {images.host}/acme/burst@")
    assert verifications == 1, proc.log()
    reasons = {last_decision(config, n)["reason"] for n in names}
    assert reasons == {"signature-invalid"}


@pytest.mark.parametrize("how", ["remove", "change"])
def test_removing_or_changing_the_anchor_revokes_what_it_verified(
    agent: tuple[Path, AgentProcess], engine: Dockerd, images: Images, how: str
) -> None:
    config, proc = agent
    engine.docker("run", "-d", "--name", "trusted", images.signed)
    proc.wait_log("allowed container trusted")
    if how == "remove":
        out = cli(config, "anchors", "remove", "acme", "--json")
    else:  # same name, another key: what the old key verified is no longer vouched for
        scope = f"{images.host}/acme/*"
        out = cli(
            config, "anchors", "add", "acme", "--key", str(images.other_pub), "--scope", scope, "--json"
        )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["revoked"] == 1
    gone(engine, "trusted")
    after = last_decision(config, "trusted")
    expected = "not-allowlisted" if how == "remove" else "signature-invalid"
    assert (after["verdict"], after["reason"]) == ("blocked", expected), after


def test_restart_with_registry_down(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, engine: Dockerd
) -> None:
    """Verified digests persist: with the registry gone, the verified image still runs and starts again,
    and an image never verified fails closed with registry-unreachable."""
    running_registry = start_registry(tmp_path_factory.mktemp("offline-registry"))
    try:
        server = running_registry.server
        imgs = push_images(engine, server, tmp_path_factory.mktemp("offline-keys"), "offline")
        config = agent_config(tmp_path, engine, server, imgs)
        first = AgentProcess(config, tmp_path / "agent1.log").start()
        try:
            engine.docker("run", "-d", "--name", "keep", imgs.signed)
            first.wait_log("allowed container keep")
        finally:
            assert first.stop() == 0
    finally:
        stop_registry(running_registry)
    second = AgentProcess(config, tmp_path / "agent2.log").start()
    try:
        assert running(engine, "keep")
        engine.docker("run", "-d", "--name", "keep-2", imgs.signed)
        second.wait_log("allowed container keep-2")
        assert running(engine, "keep-2")
        assert last_decision(config, "keep-2")["reason"] == "verified-before"
        engine.run_untrusted("-d", "--name", "never-verified", imgs.unsigned)
        gone(engine, "never-verified")
        blocked = last_decision(config, "never-verified")
        assert (blocked["verdict"], blocked["reason"]) == ("blocked", "registry-unreachable"), blocked
        assert running(engine, "keep")
    finally:
        assert second.stop() == 0


def test_verify_without_key_uses_the_device_anchors(
    tmp_path: Path, engine: Dockerd, registry: RegistryServer, images: Images
) -> None:
    config = agent_config(tmp_path, engine, registry, images)
    ok = cli(config, "verify", images.signed, "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["anchor"] == "acme"
    bad = cli(config, "verify", images.wrong, "--json")
    assert bad.returncode == 1 and json.loads(bad.stdout)["reason"] == "signature-invalid"
    # outside every anchor's scope: nothing can vouch for it
    outside = cli(config, "verify", f"{images.host}/elsewhere/app:1")
    assert outside.returncode == 2 and "no trust anchor" in outside.stderr


def test_a_signed_image_verifies_while_four_registries_stall(
    tmp_path: Path, engine: Dockerd, registry: RegistryServer, images: Images
) -> None:
    """Issue 13: four registries that trickle response headers hold no more than their own verification
    slots, until their deadline closes the socket; an honest registry's signed image still verifies, and a
    container needing no registry at all is decided at once."""
    upstream = ("127.0.0.1", int(registry.host.rsplit(":", 1)[1]))
    fronts = [StallingFront(upstream) for _ in range(4)]
    try:
        hostile: list[str] = []
        for front in fronts:
            for i in range(2):  # two images per registry: every slot of each one is taken
                tag = f"{front.host}/hostile/app:{i}"
                build_and_push(engine, tag, f"hostile-{tag}")
                hostile.append(tag)
            front.hostile = True
        engine.build_image("local/unrelated:1", "unrelated-not-in-any-registry")
        config = write_agent_config(
            tmp_path / "config.toml",
            {
                "device": {"id": "stall-device"},
                "engine": {"url": engine.url},
                "state": {"dir": str(tmp_path / "state")},
                "enforcement": {"stop_grace_seconds": 0, "verify_timeout_seconds": 10},
            },
            [registry_entry(registry), *({"host": f.host, "insecure": True} for f in fronts)],
        )
        scopes = [arg for f in fronts for arg in ("--scope", f"{f.host}/hostile/*")]
        for name, extra in (("acme", ["--scope", f"{images.host}/acme/*"]), ("hostile", scopes)):
            out = cli(config, "anchors", "add", name, "--key", str(images.pub), *extra)
            assert out.returncode == 0, out.stderr
        proc = AgentProcess(config, tmp_path / "agent.log").start()
        try:
            for i, tag in enumerate(hostile):
                engine.run_untrusted("-d", "--name", f"stalled-{i}", tag)
            wait_for(lambda: sum(f.stalled for f in fronts) >= 8, 20, what="eight stalled verifications")
            engine.docker("run", "-d", "--name", "honest", images.signed)
            engine.run_untrusted("-d", "--name", "unrelated", "local/unrelated:1")
            gone(engine, "unrelated")
            decided = {d["container"]["name"] for d in decisions(config)}
            assert not {f"stalled-{i}" for i in range(8)} & decided, "decided before the stalls ended"
            proc.wait_log("allowed container honest", timeout=15)
            assert running(engine, "honest")
            assert last_decision(config, "honest")["reason"] == "signature-verified"
            for i in range(8):
                gone(engine, f"stalled-{i}", timeout=30)
                blocked = last_decision(config, f"stalled-{i}")
                assert blocked["verdict"] == "blocked", blocked
                assert blocked["reason"] in ("registry-unreachable", "verification-timeout"), blocked
        finally:
            assert proc.stop() == 0, proc.log()
    finally:
        for front in fronts:
            front.close()
