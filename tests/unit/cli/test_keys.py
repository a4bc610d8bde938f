"""Key files from the CLI: a passphrase is never silently empty, keys are 0600 and never written through
a symbolic link."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.unit.cli.test_errors import Cli


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.delenv("COSIGN_PASSWORD", raising=False)
    monkeypatch.chdir(tmp_path)
    return Cli(tmp_path, capsys)


class NotATerminal:
    def isatty(self) -> bool:
        return False


class Terminal:
    def isatty(self) -> bool:
        return True


def test_no_passphrase_source_off_a_terminal_is_an_error(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", NotATerminal())
    code, _, err = cli.run("generate-key-pair")
    assert code == 2 and "no passphrase" in err and "COSIGN_PASSWORD" in err
    assert not (cli.dir / "cosign.key").exists()


def test_on_a_terminal_the_passphrase_is_asked_twice(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", Terminal())
    answers = iter(["s3cret", "s3cret", "one", "two"])
    monkeypatch.setattr("getpass.getpass", lambda _prompt="": next(answers))
    code, _, err = cli.run("generate-key-pair")
    assert code == 0, err
    assert (cli.dir / "cosign.key").stat().st_mode & 0o777 == 0o600
    code, _, err = cli.run("generate-key-pair", "--output-key-prefix", "other")
    assert code == 2 and "do not match" in err


def test_an_empty_passphrase_only_when_asked_for(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COSIGN_PASSWORD", "")
    old = cli.dir / "cosign.key"
    old.write_text("old")
    old.chmod(0o644)
    code, _, err = cli.run("generate-key-pair", "--force")
    assert code == 0, err
    assert old.stat().st_mode & 0o777 == 0o600, "an existing file gets the key's mode too"
    assert b"ENCRYPTED SIGSTORE PRIVATE KEY" in old.read_bytes()


def test_a_key_is_never_written_through_a_symlink(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COSIGN_PASSWORD", "x")
    victim = cli.dir / "victim"
    victim.write_text("precious")
    os.symlink(victim, cli.dir / "cosign.key")
    code, _, err = cli.run("generate-key-pair", "--force")
    assert code == 2 and "symbolic link" in err
    assert victim.read_text() == "precious"
