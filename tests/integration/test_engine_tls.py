"""Issue 14: the engine is chosen as the docker CLI chooses it, TLS included. A private dockerd listens on
TCP with --tlsverify (mutual TLS from a test CA); the agent's commands reach it through DOCKER_HOST,
DOCKER_TLS_VERIFY and DOCKER_CERT_PATH alone, and not without the certificates."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.dockerd import Dockerd
from tests.support.ports import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _cert(cn: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool, eku: list[x509.ObjectIdentifier] | None = None,
          ip: bool = False) -> x509.Certificate:  # fmt: skip
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if ip:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        keyfile = path.with_name(path.name.replace("cert", "key").replace(".pem", ".pem"))
        keyfile.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )


@pytest.fixture(scope="module")
def tls_engine() -> Iterator[tuple[Dockerd, str, Path]]:
    d = Path(tempfile.mkdtemp(prefix="ig-tls-engine-", dir="/tmp"))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("engine CA", ca_key, None, ca_key, ca=True)
    srv_key, cli_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = _cert("127.0.0.1", srv_key, ca, ca_key, ca=False, eku=[ExtendedKeyUsageOID.SERVER_AUTH], ip=True)
    client = _cert("client", cli_key, ca, ca_key, ca=False, eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    certs = d / "client"
    certs.mkdir()
    _write(certs / "ca.pem", ca)
    _write(certs / "cert.pem", client, cli_key)  # DOCKER_CERT_PATH holds ca.pem, cert.pem, key.pem
    _write(d / "server-cert.pem", server, srv_key)
    port = free_port()
    engine = Dockerd(
        d / "root",
        extra_args=["--host", f"tcp://127.0.0.1:{port}", "--tlsverify", "--tlscacert", str(certs / "ca.pem"),
                    "--tlscert", str(d / "server-cert.pem"), "--tlskey", str(d / "server-key.pem")],
    )  # fmt: skip
    engine.start()
    try:
        yield engine, f"tcp://127.0.0.1:{port}", certs
    finally:
        engine.stop()
        subprocess.run(["rm", "-rf", str(d)], check=False)


def _status(config: Path, env: dict[str, str]) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(config), "status", "--json"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}, **env},
    )  # fmt: skip
    doc: dict[str, object] = json.loads(out.stdout)
    return doc


def test_docker_tls_settings_reach_a_tls_engine(
    tls_engine: tuple[Dockerd, str, Path], tmp_path: Path
) -> None:
    _, url, certs = tls_engine
    config = tmp_path / "config.toml"
    config.write_text(f'[state]\ndir = "{tmp_path / "state"}"\n')  # no [engine]: as the docker CLI decides
    doc = _status(config, {"DOCKER_HOST": url, "DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(certs)})
    engine = doc["engine"]
    assert isinstance(engine, dict) and engine["url"] == url and engine["reachable"] is True, engine
    without = _status(config, {"DOCKER_HOST": url})["engine"]
    assert (
        isinstance(without, dict) and without["reachable"] is False
    )  # the engine wants a client certificate
