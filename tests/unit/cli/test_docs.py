"""Shell completion and the manual page come from the parser: every command is in them."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from agent.cli.docs import bash_script, manpage, walk
from agent.cli.main import build_parser


def _complete(script: str, *words: str) -> list[str]:
    line = " ".join(words)
    probe = (
        f"{script}\nCOMP_WORDS=(imageguard {line}); COMP_CWORD={len(words)}; _imageguard; "
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completes_commands_subcommands_and_options() -> None:
    script = bash_script(build_parser())
    assert "allowlist" in _complete(script, "al")
    assert _complete(script, "allowlist", "a") == ["add"]
    assert "--from-running" in _complete(script, "allowlist", "add", "--from")
    assert "--config" in _complete(script, "status", "--con")


def test_the_manual_page_names_every_command_and_the_exit_codes() -> None:
    parser = build_parser()
    page = manpage(parser)
    assert page.startswith(".TH IMAGEGUARD 1")
    for path, _ in walk(parser):
        if path:
            assert ".B imageguard " + " ".join(path).replace("-", "\\-") in page, path
    assert "3 could not check" in page


@pytest.mark.skipif(shutil.which("groff") is None, reason="needs groff")
def test_the_manual_page_renders_without_warnings() -> None:
    out = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww"],
        input=manpage(build_parser()),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and "warning" not in out.stderr, out.stderr[:500]
