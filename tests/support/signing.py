"""Images signed the way users sign them: built on a private dockerd, pushed with the docker CLI to a fixture
registry, keys from ``imageguard generate-key-pair``, agent configurations that name the registry."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from agent.core.digest import Digest
from tests.support.agentproc import cli, write_config
from tests.support.dockerd import Dockerd
from tests.support.fixtures.registry import RegistryServer

PASSWORD = "correct horse"


def write_agent_config(
    path: Path,
    sections: dict[str, dict[str, Any]],
    registries: list[dict[str, Any]] = (),  # type: ignore[assignment]
) -> Path:
    """``write_config`` plus ``[[registries]]`` tables."""
    write_config(path, sections)
    lines = []
    for reg in registries:
        lines.append("[[registries]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in reg.items()]
        lines.append("")
    with path.open("a") as fh:
        fh.write("\n".join(lines))
    return path


def registry_entry(server: RegistryServer) -> dict[str, Any]:
    """The ``[[registries]]`` table for a fixture registry (insecure for HTTP, CA and credentials for TLS)."""
    entry: dict[str, Any] = {"host": server.host}
    if server.scheme == "http":
        entry["insecure"] = True
    if server.ca_bundle is not None:
        entry["ca_bundle"] = str(server.ca_bundle)
    if server.username is not None:
        entry["username"] = server.username
        entry["password_file"] = str(server.password_file)
    return entry


def repo_digest(engine: Dockerd, tag: str) -> Digest:
    """The digest the engine recorded for ``tag`` when it was pushed."""
    name = tag.rsplit(":", 1)[0]
    out = engine.docker("image", "inspect", "--format", "{{json .RepoDigests}}", tag).stdout
    for item in json.loads(out):
        if item.startswith(name + "@"):
            return Digest.parse(item.split("@", 1)[1])
    raise AssertionError(f"{tag} has no repo digest for {name}: {out}")


def build_and_push(engine: Dockerd, tag: str, marker: str, env: dict[str, str] | None = None) -> Digest:
    """A busybox image with a unique marker, pushed with the docker CLI; returns its registry digest."""
    engine.build_image(tag, marker)
    subprocess.run(
        ["docker", "push", "-q", tag],
        env=env or engine.env,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return repo_digest(engine, tag)


def docker_login(server: RegistryServer, env: dict[str, str]) -> None:
    """``docker login`` with the registry's credentials; ``env`` should name its own DOCKER_CONFIG, so that the
    login stays in the test."""
    subprocess.run(
        ["docker", "login", server.host, "-u", str(server.username), "--password-stdin"],
        input=server.password,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )


def generate_keys(config: Path, prefix: Path, password: str = PASSWORD) -> tuple[Path, Path, Path]:
    """``imageguard generate-key-pair``; returns (private key, public key, passphrase file)."""
    pw = prefix.with_suffix(".password")
    pw.write_text(password + "\n")
    cli(
        config,
        "generate-key-pair",
        "--output-key-prefix",
        str(prefix),
        "--passphrase-file",
        str(pw),
        check=True,
    )
    return prefix.with_suffix(".key"), prefix.with_suffix(".pub"), pw
