"""Registry credentials stay home: a spec cannot send them to another host, mirrors are the
configuration's word, and a mirror inherits neither plain HTTP nor a private CA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.config import from_dict
from agent.core.instances import InstanceSpec
from agent.runtime.instances import InstanceManager, credentials_problem
from tests.support.keys import public_pem


def config(tmp_path: Path, **entry: Any) -> Any:
    return from_dict(
        {
            "device": {"id": "d"},
            "state": {"dir": str(tmp_path / "state")},
            "registries": [
                {"host": "creds.example", "username": "u", "password_env": "IG_PW", "insecure": True, **entry}
            ],
        },
        "t",
        tmp_path,
    )


def spec(image: str) -> InstanceSpec:
    return InstanceSpec.from_document(
        {"name": "web", "image": image, "tag": "1", "trust_anchor": {"pem": public_pem()},
         "registry_credentials": "creds.example"}
    )  # fmt: skip


def test_credentials_go_to_their_own_host(tmp_path: Path) -> None:
    assert credentials_problem(config(tmp_path), spec("creds.example/acme/web")) is None


def test_a_spec_cannot_send_credentials_to_another_host(tmp_path: Path) -> None:
    problem = credentials_problem(config(tmp_path), spec("attacker.example/acme/web"))
    assert problem is not None and "go only to creds.example" in problem and "mirrors" in problem


def test_a_declared_mirror_gets_the_credentials_but_not_plain_http(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IG_PW", "secret")
    cfg = config(tmp_path, mirrors=["mirror.example"])
    s = spec("mirror.example/acme/web")
    assert credentials_problem(cfg, s) is None
    manager = InstanceManager.__new__(InstanceManager)  # only its configuration is used here
    manager.config = cfg
    extra, auth = manager._registries(s)
    assert auth == {"username": "u", "password": "secret"}
    (mirror,) = extra
    assert mirror.host == "mirror.example" and mirror.insecure is False and mirror.ca_bundle is None
