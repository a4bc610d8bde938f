"""The engine adapter follows the docker CLI's TLS settings for a TCP engine."""

from __future__ import annotations

from pathlib import Path

import docker.tls
import pytest

from agent.adapters.engine import Engine
from tests.support.cosign import Pki, pem


def test_tcp_engines_use_docker_tls_verify_and_cert_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki = Pki()
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text(pem(pki.root))  # the files must exist; their content is docker-py's job
    monkeypatch.setenv("DOCKER_CERT_PATH", str(tmp_path))
    monkeypatch.setenv("DOCKER_TLS_VERIFY", "1")
    tls = Engine("tcp://127.0.0.1:2376", 1)._tls()
    assert isinstance(tls, docker.tls.TLSConfig) and tls.verify
    assert tls.ca_cert == str(tmp_path / "ca.pem") and tls.cert == (
        str(tmp_path / "cert.pem"),
        str(tmp_path / "key.pem"),
    )
    assert Engine("unix:///run/docker.sock", 1)._tls() is False
    monkeypatch.delenv("DOCKER_TLS_VERIFY")
    monkeypatch.delenv("DOCKER_CERT_PATH")
    assert Engine("tcp://127.0.0.1:2375", 1)._tls() is False
