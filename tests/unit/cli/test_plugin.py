"""wire-dockerd merges the plugin into daemon.json: every other setting kept, nothing lost on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cli.main import main


def run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str, socket: str | None = None
) -> tuple[int, str, str]:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[state]\ndir = "{tmp_path / "state"}"\n'
        + (f'[preventive]\nsocket = "{socket}"\n' if socket else "")
    )
    code = main(
        [
            "--config",
            str(config),
            "wire-dockerd",
            "--daemon-json",
            str(tmp_path / "daemon.json"),
            "--spec-dir",
            str(tmp_path / "plugins"),
            *args,
        ]
    )
    out = capsys.readouterr()
    return code, out.out, out.err


def test_an_existing_configuration_is_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    daemon = tmp_path / "daemon.json"
    original = {
        "log-driver": "journald",
        "authorization-plugins": ["other"],
        "insecure-registries": ["r:5000"],
    }
    daemon.write_text(json.dumps(original))
    daemon.chmod(0o600)
    code, _, err = run(tmp_path, capsys)
    assert code == 0, err
    now = json.loads(daemon.read_text())
    assert now == {**original, "authorization-plugins": ["other", "imageguard"]}
    assert daemon.stat().st_mode & 0o777 == 0o600
    assert json.loads((tmp_path / "daemon.json.imageguard-bak").read_text()) == original
    code, out, _ = run(tmp_path, capsys)  # again: nothing to do
    assert code == 0 and "already right" in out


def test_dry_run_and_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(tmp_path, capsys, "--dry-run")
    assert code == 0 and '"imageguard"' in out and not (tmp_path / "daemon.json").exists()
    assert run(tmp_path, capsys)[0] == 0
    assert json.loads((tmp_path / "daemon.json").read_text()) == {"authorization-plugins": ["imageguard"]}


def test_bad_json_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    daemon = tmp_path / "daemon.json"
    daemon.write_text("{not json")
    code, _, err = run(tmp_path, capsys)
    assert code == 2 and "not valid JSON" in err and daemon.read_text() == "{not json"


def test_a_socket_elsewhere_gets_a_spec_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(tmp_path, capsys, socket="/run/imageguard/guard.sock")
    assert code == 0, err
    assert (tmp_path / "plugins" / "guard.spec").read_text() == "unix:///run/imageguard/guard.sock\n"
    assert json.loads((tmp_path / "daemon.json").read_text())["authorization-plugins"] == ["guard"]
