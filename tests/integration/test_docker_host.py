"""Issue 14: what the host's Docker knows, against real registries. The registry client reads dockerd's
certs.d CA, the insecure-registries of daemon.json and a credential helper's answer, for hosts the agent's
configuration does not name; the configuration still wins where it says something."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from agent.adapters.dockerhost import DockerHost
from agent.adapters.registry import RegistryClient, Repository
from agent.core.imageref import ImageRef
from agent.errors import RegistryError
from tests.support.fixtures.registry import RegistryServer, push_tiny_image

pytestmark = pytest.mark.integration


def _helper(bin_dir: Path, name: str, server: RegistryServer) -> None:
    """A docker-credential-<name> that speaks the helpers' protocol (get: server on stdin, JSON out)."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / f"docker-credential-{name}"
    answer = json.dumps({"ServerURL": server.host, "Username": server.username, "Secret": server.password})
    path.write_text(
        f"#!/bin/sh\n[ \"$1\" = get ] || exit 1\nread host\n[ \"$host\" = '{server.host}' ] || exit 1\necho '{answer}'\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_certs_d_ca_and_a_credential_helper_reach_a_tls_registry(
    registry_tls: RegistryServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert registry_tls.ca_bundle is not None
    certs_d = tmp_path / "certs.d" / registry_tls.host
    certs_d.mkdir(parents=True)
    (certs_d / "ca.crt").write_bytes(registry_tls.ca_bundle.read_bytes())
    config_dir = tmp_path / "docker"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps({"credHelpers": {registry_tls.host: "test"}}))
    _helper(tmp_path / "bin", "test", registry_tls)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    host = DockerHost(config_dir=config_dir, certs_d=tmp_path / "certs.d", daemon_json=tmp_path / "none.json")
    ref = ImageRef.parse(f"{registry_tls.host}/dockerhost/app:1")
    with RegistryClient(docker_host=host, timeout=5, deadline=10) as client:
        pushed = push_tiny_image(client, Repository.of(ref), "1")  # TLS from certs.d, login from the helper
        assert client.resolve(ref) == pushed.digest
    with RegistryClient(docker_host=None, timeout=5, deadline=10) as bare, pytest.raises(RegistryError):
        bare.resolve(ref)  # without what Docker knows: no CA, no login


def test_daemon_json_insecure_registries_mean_plain_http(
    registry_plain: RegistryServer, tmp_path: Path
) -> None:
    daemon = tmp_path / "daemon.json"
    daemon.write_text(json.dumps({"insecure-registries": [registry_plain.host]}))
    host = DockerHost(
        config_dir=tmp_path / "no-docker-config", certs_d=tmp_path / "no-certs", daemon_json=daemon
    )
    ref = ImageRef.parse(f"{registry_plain.host}/dockerhost/plain:1")
    with RegistryClient(docker_host=host, timeout=5, deadline=10) as client:
        pushed = push_tiny_image(client, Repository.of(ref), "1")
        assert client.resolve(ref) == pushed.digest
