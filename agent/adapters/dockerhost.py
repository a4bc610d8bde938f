"""What the host's Docker already knows about registries, for when the agent's configuration says nothing.

- credentials: ``$DOCKER_CONFIG/config.json`` (default ``~/.docker/config.json``): a credential helper for the
  host (``credHelpers``), the default store (``credsStore``), or an ``auths`` entry, as the docker CLI reads it;
- CAs: ``/etc/docker/certs.d/<host>/*.crt``, as dockerd reads them;
- plain HTTP: the ``insecure-registries`` hosts of ``/etc/docker/daemon.json``.

Every lookup is read on use and fails soft (nothing found), so that a broken docker config never stops a
verification that needs no credentials.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")
HELPER_TIMEOUT = 10.0


@dataclass(frozen=True)
class DockerHost:
    config_dir: Path = field(
        default_factory=lambda: Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker")
    )
    certs_d: Path = Path("/etc/docker/certs.d")
    daemon_json: Path = Path("/etc/docker/daemon.json")

    def _config(self) -> dict[str, Any]:
        try:
            doc = json.loads((self.config_dir / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def credentials(self, host: str) -> tuple[str, str] | None:
        """(username, secret) the docker CLI would use for ``host``, or None."""
        cfg = self._config()
        keys = HUB_KEYS if host in HUB_KEYS else (host, f"https://{host}", f"http://{host}")
        helpers = _mapping(cfg.get("credHelpers"))
        for key in keys:
            if isinstance(helper := helpers.get(key), str):
                return _from_helper(helper, key)
        auths = _mapping(cfg.get("auths"))
        if isinstance(store := cfg.get("credsStore"), str):
            for key in keys:
                if (found := _from_helper(store, key)) is not None:
                    return found
        for key in keys:
            entry = auths.get(key)
            if isinstance(entry, dict) and isinstance(entry.get("auth"), str):
                try:
                    user, _, secret = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
                except (binascii.Error, UnicodeDecodeError):
                    log.warning("docker config: the auth entry for %s is not base64 user:password", key)
                    return None
                return user, secret
        return None

    def ca_bundle(self, host: str) -> Path | None:
        """dockerd's CA for ``host``: ``certs.d/<host>/ca.crt``, else the first ``*.crt`` there."""
        directory = self.certs_d / host
        preferred = directory / "ca.crt"
        if preferred.is_file():
            return preferred
        try:
            crts = sorted(p for p in directory.glob("*.crt") if p.is_file() and not p.name.endswith(".cert"))
        except OSError:
            return None
        return crts[0] if crts else None

    def insecure(self, host: str) -> bool:
        """``host`` is listed in dockerd's ``insecure-registries`` (exact host[:port] entries)."""
        try:
            doc = json.loads(self.daemon_json.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        entries = doc.get("insecure-registries") if isinstance(doc, dict) else None
        return isinstance(entries, list) and host in entries


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _from_helper(helper: str, server: str) -> tuple[str, str] | None:
    """``docker-credential-<helper> get``: the protocol of docker-credential-helpers."""
    exe = shutil.which(f"docker-credential-{helper}")
    if exe is None:
        log.warning(
            "docker config names credential helper %r, but docker-credential-%s is not installed",
            helper,
            helper,
        )
        return None
    try:
        out = subprocess.run(
            [exe, "get"], input=server, capture_output=True, text=True, timeout=HELPER_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("credential helper %s failed for %s: %s", helper, server, exc)
        return None
    if out.returncode != 0:
        return None  # "credentials not found in native keychain": nothing stored for this server
    try:
        doc = json.loads(out.stdout)
        return str(doc["Username"]), str(doc["Secret"])
    except (ValueError, KeyError, TypeError):
        log.warning("credential helper %s answered something that is not its JSON", helper)
        return None
