"""CLI input errors: exit codes, messages that name the file and the field, and nothing changed.

These run ``agent.cli.main.main`` in-process (and ``python -m agent`` for a few) against a temporary config whose
state directory is a temporary folder. No container engine is needed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.cli.main import build_parser, main
from agent.core.digest import Digest

REPO_ROOT = Path(__file__).resolve().parents[3]
D1, D2, D3 = (str(Digest.of(bytes([i]))) for i in range(3))


class Cli:
    def __init__(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.dir = tmp_path
        self.capsys = capsys
        self.config = tmp_path / "config.toml"
        self.config.write_text(
            '[state]\ndir = "state"\n[engine]\nurl = "unix:///nonexistent/imageguard-test.sock"\ntimeout_seconds = 1\n',
            encoding="utf-8",
        )

    def run(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(["--config", str(self.config), *args])
        out, err = self.capsys.readouterr()
        return code, out, err

    def export(self) -> Any:
        code, out, _ = self.run("policy", "export")
        assert code == 0
        return json.loads(out)

    def file(self, name: str, content: str) -> str:
        path = self.dir / name
        path.write_text(content, encoding="utf-8")
        return str(path)


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(tmp_path, capsys)


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60
    )


# -- configuration -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ("[state\n", ["not valid TOML"]),
        ('[enforcement]\nenabled = "yes"\n', ["at /enforcement/enabled", "boolean"]),
        ("[enforcement]\nstop_grace_seconds = -1\n", ["at /enforcement/stop_grace_seconds", "minimum"]),
        ("[bogus]\nx = 1\n", ["at /bogus:", "unknown field"]),
        ("[engine]\nsocket = 1\n", ["at /engine/socket", "unknown field"]),
    ],
    ids=["bad-toml", "wrong-type", "out-of-range", "unknown-table", "unknown-key"],
)
@pytest.mark.parametrize("command", [["allowlist", "list"], ["policy", "export"], ["status"]])
def test_malformed_config(cli: Cli, content: str, fragments: list[str], command: list[str]) -> None:
    cli.config.write_text(content, encoding="utf-8")
    code, _out, err = cli.run(*command)
    assert code == 2
    assert str(cli.config) in err
    for fragment in fragments:
        assert fragment in err
    assert "Traceback" not in err
    assert not (cli.dir / "state").exists()  # nothing was created


def test_missing_config_file(cli: Cli) -> None:
    cli.config.unlink()
    code, _, err = cli.run("allowlist", "list")
    assert code == 2
    assert str(cli.config) in err and "cannot read" in err


def test_malformed_config_via_python_m(cli: Cli) -> None:
    cli.config.write_text("[enforcement]\nmode = 1\n", encoding="utf-8")
    proc = run_module("--config", str(cli.config), "allowlist", "list", "--json")
    assert proc.returncode == 2
    assert f"configuration {cli.config}: at /enforcement/mode" in proc.stderr
    assert json.loads(proc.stdout)["error"]["code"] == "invalid-config"


def test_unusable_state_is_exit_2(cli: Cli) -> None:
    state = cli.dir / "state"
    state.mkdir(mode=0o700)
    (state / "state.db").write_bytes(b"garbage" * 500)
    code, _, err = cli.run("allowlist", "list")
    assert code == 2
    assert "is unreadable" in err and str(state / "state.db") in err
    assert (state / "state.db").read_bytes() == b"garbage" * 500


# -- policy files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ('{"version": 5,', ["not valid JSON"]),
        ("", ["not valid JSON"]),
        ("[1, 2]", ["at /:", "object"]),
        ('{"version": 5, "allowlist": [{"digest": "' + D1 + '", "extra": 1}]}', ["at /allowlist/0"]),
        ('{"version": 5, "enforcement": {"mode": "block"}}', ["at /enforcement/mode"]),
        ('{"version": -5}', ["at /version"]),
        ('{"version": 5, "trust_anchors": [{"name": "a", "kind": "key"}]}', ["at /trust_anchors/0", "'pem'"]),
        (
            '{"version": 5, "allowlist": [{"digest": "' + D1 + '"}, {"digest": "sha256:1234"}]}',
            ["at /allowlist/1/digest", "64"],
        ),
        ('{"version": 5, "allowlist": [{"digest": "sha512:' + "a" * 128 + '"}]}', ["at /allowlist/0/digest"]),
    ],
    ids=[
        "truncated-json",
        "empty",
        "not-object",
        "unknown-key",
        "bad-mode",
        "negative-version",
        "anchor-no-pem",
        "short-digest",
        "sha512",
    ],
)
def test_malformed_policy_file_changes_nothing(cli: Cli, content: str, fragments: list[str]) -> None:
    assert cli.run("allowlist", "add", D3)[0] == 0
    before = cli.export()
    path = cli.file("policy.json", content)
    code, _out, err = cli.run("policy", "import", path)
    assert code == 2
    for fragment in fragments:
        assert fragment in err
    assert "Traceback" not in err
    assert cli.export() == before


def test_policy_file_errors_name_the_file(cli: Cli) -> None:
    path = cli.file("broken.json", "{")
    code, _, err = cli.run("policy", "import", path)
    assert code == 2
    assert path in err
    code, _, err = cli.run("policy", "import", str(cli.dir / "absent.json"))
    assert code == 2
    assert "absent.json" in err and "cannot read" in err
    (cli.dir / "latin1.json").write_bytes(b'{"comment": "\xe9"}')
    code, _, err = cli.run("policy", "import", str(cli.dir / "latin1.json"))
    assert code == 2 and "not UTF-8" in err


def test_policy_import_versions(cli: Cli) -> None:
    doc = {"version": 4, "allowlist": [{"digest": D1}]}
    code, out, _ = cli.run("policy", "import", cli.file("v4.json", json.dumps(doc)))
    assert code == 0 and "version 4" in out
    before = cli.export()
    code, out, err = cli.run("policy", "import", cli.file("v3.json", json.dumps({"version": 3})))
    assert code == 2
    assert "older than the held version 4" in err
    assert cli.export() == before
    # the same version with other content is a conflict that shows the difference, never "nothing new"
    code, out, err = cli.run("policy", "import", "--json", cli.file("v4b.json", json.dumps({"version": 4})))
    assert code == 1
    assert json.loads(out)["error"]["code"] == "policy-conflict"
    assert (
        "already held with different content (allowlist -1" in err
        and "give the new document version 5" in err
    )
    assert cli.export() == before
    code, out, _ = cli.run("policy", "import", cli.file("v4c.json", json.dumps(doc)))
    assert code == 0 and "nothing new" in out
    assert cli.export() == before


def test_rollback_with_json_reports_the_code(cli: Cli) -> None:
    cli.run("policy", "import", cli.file("v4.json", '{"version": 4}'))
    code, out, _ = cli.run("policy", "import", "--json", cli.file("v1.json", '{"version": 1}'))
    assert code == 2
    assert json.loads(out)["error"]["code"] == "policy-rollback"


# -- allowlist -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["sha256:1234", "sha512:" + "a" * 128, "", "sha256:", D1[:-1] + "g", "busybox:latest"]
)
def test_allowlist_add_is_all_or_nothing(cli: Cli, bad: str) -> None:
    before = cli.export()
    code, out, err = cli.run("allowlist", "add", D1, bad, D2)
    assert code == 2
    assert "invalid digest" in err
    assert cli.export() == before
    code, out, _ = cli.run("allowlist", "list", "--json")
    assert json.loads(out)["allowlist"] == []


def test_allowlist_add_normalises_and_lists(cli: Cli) -> None:
    code, out, _ = cli.run("allowlist", "add", "--json", f"  {D1.upper()} ", D2, "--comment", "base")
    assert code == 0
    doc = json.loads(out)
    assert {k: doc[k] for k in ("layer", "version", "status", "revoked")} == {
        "layer": "device",
        "version": 1,
        "status": "applied",
        "revoked": 0,
    }
    assert [a["from"] for a in doc["added"]] == ["argument", "argument"]
    code, out, _ = cli.run("allowlist", "list", "--json")
    listed = json.loads(out)
    assert {e["digest"] for e in listed["allowlist"]} == {D1, D2}
    assert {e["comment"] for e in listed["allowlist"]} == {"base"}
    assert listed["policy_version"] == 1
    code, out, _ = cli.run("allowlist", "add", D1)
    assert code == 0 and "nothing new" in out


def test_allowlist_remove(cli: Cli) -> None:
    cli.run("allowlist", "add", D1)
    before = cli.export()
    code, out, err = cli.run("allowlist", "remove", D2)
    assert code == 1
    assert D2 in out + err and "not on the device allowlist" in out + err
    code, out, _ = cli.run("allowlist", "remove", "--json", D2)
    assert code == 1
    assert json.loads(out)["error"]["code"] == "not-found"
    assert cli.export() == before
    code, _, err = cli.run("allowlist", "remove", "sha256:nope")
    assert code == 2 and "invalid digest" in err
    code, out, _ = cli.run("allowlist", "remove", D1.upper())
    assert code == 0
    assert cli.export()["allowlist"] == []


def test_enforcement(cli: Cli) -> None:
    code, out, _ = cli.run("enforcement", "--json")  # no policy ever set: a first run audits
    assert (code, json.loads(out)) == (0, {"enabled": True, "mode": "audit"})
    code, out, _ = cli.run("enforcement", "--mode", "enforce", "--json")  # the explicit step
    assert (code, json.loads(out)) == (0, {"enabled": True, "mode": "enforce"})
    code, out, _ = cli.run("enforcement", "--mode", "audit", "--disable", "--json")
    assert (code, json.loads(out)) == (0, {"enabled": False, "mode": "audit"})
    assert cli.export()["enforcement"] == {"enabled": False, "mode": "audit"}


# -- usage -------------------------------------------------------------------------------------------------


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.extend(_commands(sub, (*prefix, name)))
    return out


COMMANDS = _commands(build_parser())


def test_every_command_is_listed() -> None:
    assert {
        ("run",),
        ("scan",),
        ("allowlist", "add"),
        ("allowlist", "remove"),
        ("policy", "import"),
        ("status",),
    } <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) or "imageguard" for c in COMMANDS])
def test_help_exits_0(command: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    assert "usage: imageguard" in capsys.readouterr().out


def test_help_via_python_m() -> None:
    proc = run_module("--help")
    assert proc.returncode == 0
    assert "Exit codes" in proc.stdout


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nonsense"],
        ["allowlist"],
        ["decisions", "--limit", "0"],
        ["enforcement", "--mode", "x"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_allowlist_add_without_anything_to_add_exits_2(cli: Cli) -> None:
    code, _, err = cli.run("allowlist", "add")
    assert code == 2 and "--from-running" in err


@pytest.mark.parametrize(
    "command",
    [
        ["allowlist", "list", "--json"],
        ["enforcement", "--json"],
        ["decisions", "--json"],
        ["policy", "export"],
    ],
)
def test_json_output_parses(cli: Cli, command: list[str]) -> None:
    cli.run("allowlist", "add", D1)
    code, out, _ = cli.run(*command)
    assert code == 0
    assert isinstance(json.loads(out), dict)


def test_status_json_parses(cli: Cli) -> None:
    # a separate process: docker-py leaks a socket when the engine is unreachable (a ResourceWarning here)
    cli.run("allowlist", "add", D1)
    proc = run_module("--config", str(cli.config), "status", "--json")
    assert proc.returncode == 1  # no agent runs and the engine is unreachable
    data = json.loads(proc.stdout)
    assert data["engine"]["reachable"] is False
    assert data["agent"]["running"] is False
    assert data["policy"]["allowlist"] == 1
    assert data["state_dir"] == str(cli.dir / "state")


def test_policy_diff_dry_run_and_reset(cli: Cli) -> None:
    doc = {"version": 4, "allowlist": [{"digest": D1}]}
    cli.run("policy", "import", cli.file("v4.json", json.dumps(doc)))
    before = cli.export()
    for args in (["policy", "diff"], ["policy", "import", "--dry-run"]):
        code, out, _ = cli.run(*args, "--json", cli.file("v5.json", json.dumps({"version": 5})))
        assert code == 0
        preview = json.loads(out)
        assert preview["version"] == {"held": 4, "new": 5, "verdict": "applies"}
        assert preview["changes"] == [f"allowlist -1: {D1}"]
        assert preview["containers"] is None and "containers not checked" in preview["note"]
        assert cli.export() == before  # nothing changed
    code, out, _ = cli.run("policy", "diff", cli.file("v3.json", json.dumps({"version": 3})))
    assert code == 0 and "refused: policy layer 'device': version 3 is older" in out
    code, out, _ = cli.run("policy", "reset", "--version", "1")
    assert code == 0 and "version 1" in out
    after = cli.export()
    assert after["version"] == 1 and after["allowlist"] == before["allowlist"]
    code, _, err = cli.run("policy", "reset", "--version", "-1")
    assert code == 2 and "--version" in err


def test_config_is_accepted_anywhere_and_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nope.toml"
    for argv in (
        ["--config", str(missing), "allowlist", "list"],
        ["allowlist", "list", "--config", str(missing)],
    ):
        assert main(argv) == 2
        assert str(missing) in capsys.readouterr().err
    monkeypatch.setenv("IMAGEGUARD_CONFIG", str(missing))
    assert main(["allowlist", "list"]) == 2
    assert str(missing) in capsys.readouterr().err
    other = tmp_path / "other.toml"
    assert main(["allowlist", "list", "--config", str(other)]) == 2  # the command line wins
    assert str(other) in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["decisions"],
        ["allowlist", "list"],
        ["anchors", "list"],
        ["policy", "export"],
        ["enforcement"],
        ["instances", "list"],
    ],
)
def test_reading_commands_create_no_state(cli: Cli, argv: list[str]) -> None:
    cli.run(*argv)
    assert not (cli.dir / "state").exists(), "a reading command left state behind"


def test_an_edit_creates_the_state(cli: Cli) -> None:
    assert cli.run("allowlist", "add", D1)[0] == 0
    assert (cli.dir / "state" / "state.db").exists()


def test_a_bug_is_one_line_and_exit_70_not_a_traceback(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.cli.agent as agent_cli

    def broken(_args: argparse.Namespace) -> int:
        raise RuntimeError("something impossible")

    monkeypatch.setattr(agent_cli, "cmd_decisions", broken)
    monkeypatch.delenv("IMAGEGUARD_DEBUG", raising=False)
    code, _, err = cli.run("decisions")
    assert code == 70
    assert "internal error: RuntimeError: something impossible" in err and "Traceback" not in err
