"""The console service's own commands: hash-password, new-token, db upgrade/revision, and serve refusing
to start without what it needs (before it touches the broker)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from werkzeug.security import check_password_hash

from agent.config import from_dict
from tests.unit.cli.test_errors import Cli


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    monkeypatch.delenv("IMAGEGUARD_CONSOLE_PASSWORD", raising=False)
    monkeypatch.delenv("IMAGEGUARD_CONSOLE_DATABASE", raising=False)
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield Cli(tmp_path, capsys)
    # a command that set up logging must not leave a handler on this test's captured stderr behind
    root.handlers[:] = handlers
    root.setLevel(level)


def test_hash_password(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = cli.run(
        "console", "hash-password", "--password-file", cli.file("pw", "a long passphrase here\n")
    )
    assert (
        code == 0 and out.startswith("scrypt:") and check_password_hash(out.strip(), "a long passphrase here")
    )
    code, _, err = cli.run("console", "hash-password", "--password-file", cli.file("short", "short"))
    assert code == 2 and "shorter than 12" in err
    with open("/dev/null") as devnull:  # not a terminal, and no password given
        monkeypatch.setattr("sys.stdin", devnull)
        code, _, err = cli.run("console", "hash-password")
    assert code == 2 and "--password-file" in err
    # what it prints is what the configuration accepts
    from_dict({"console": {"users": [{"name": "alice", "password_hash": out.strip()}]}})


def test_new_token(cli: Cli) -> None:
    code, out, _ = cli.run("console", "new-token", "ci", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["token"].startswith("igc_")
    assert hashlib.sha256(doc["token"].encode()).hexdigest() == doc["sha256"]
    from_dict({"console": {"tokens": [{"name": "ci", "sha256": doc["sha256"]}]}})
    code, _, err = cli.run("console", "new-token", "bad name")
    assert code == 2 and "token name" in err


def test_db_upgrade_and_revision(cli: Cli) -> None:
    url = f"sqlite:///{cli.dir / 'c.db'}"
    code, out, _ = cli.run("console", "db", "revision", "--database", url)
    assert code == 0 and "never migrated" in out
    code, out, _ = cli.run("console", "db", "upgrade", "--database", url)
    assert code == 0 and "revision 0002" in out
    code, out, _ = cli.run("console", "db", "revision", "--database", url)
    assert out.strip() == "0002"
    code, _, err = cli.run("console", "db", "upgrade", "--database", "mysql://nowhere/x")
    assert code == 2 and "cannot be used" in err


def test_serve_refuses_to_start_without_what_it_needs(cli: Cli) -> None:
    code, _, err = cli.run("console", "serve")
    assert code == 2 and "[mqtt]" in err
    cli.config.write_text('[state]\ndir = "state"\n[mqtt]\nurl = "mqtt://127.0.0.1:1"\naccount = "a"\n')
    code, _, err = cli.run("console", "serve")
    assert code == 2 and "never runs without sign-in" in err
