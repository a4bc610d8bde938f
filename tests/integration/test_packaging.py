"""Issue 14: the package works however it is installed, not only as an editable checkout. A wheel is built
from the repository and installed with ``pip install --target`` into a directory of its own; the schemas
come along as package data, and the CLI runs from there with nothing of the checkout on its path."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]


def test_a_wheel_installed_with_target_runs_without_the_checkout(tmp_path: Path) -> None:
    subprocess.run(
        [*PIP, "wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(REPO)], check=True, timeout=600
    )
    (wheel,) = (tmp_path / "dist").glob("imageguard_agent-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    schemas = sorted(n for n in names if n.endswith(".schema.json"))
    assert (
        "agent/schemas/policy.schema.json" in schemas
        and "agent/schemas/control/drops.telemetry.schema.json" in schemas
    )
    assert len(schemas) == len(list((REPO / "agent" / "schemas").rglob("*.schema.json")))
    target = tmp_path / "target"
    subprocess.run(
        [*PIP, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=600
    )
    # the dependencies from this interpreter's site-packages, the package only from the target; -S keeps
    # the editable install's path hook (a .pth file) out
    site = sysconfig.get_paths()["purelib"]
    probe = (
        f"import sys; sys.path[:0] = [{str(target)!r}, {site!r}]; import agent; "
        f"assert agent.__file__.startswith({str(target)!r}), agent.__file__; "
        "from agent.cli.main import main; sys.exit(main(sys.argv[1:]))"
    )
    config = tmp_path / "config.toml"
    config.write_text(f'[state]\ndir = "{tmp_path / "state"}"\n')
    out = subprocess.run(
        [sys.executable, "-S", "-c", probe, "--config", str(config), "policy", "import", "-", "--json"],
        input='{"version": 3, "allowlist": []}', capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert '"version": 3' in out.stdout


def test_a_user_install_runs_without_the_checkout(tmp_path: Path) -> None:
    """``pip install --user``: the package in the user's site-packages, its dependencies where pip put them."""
    subprocess.run(
        [*PIP, "wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(REPO)], check=True, timeout=600
    )
    (wheel,) = (tmp_path / "dist").glob("imageguard_agent-*.whl")
    # a virtualenv that lets user site-packages in (as a system Python does); the base interpreter, so that
    # nothing of this checkout's editable install is visible
    base = getattr(sys, "_base_executable", sys.executable)
    env_dir = tmp_path / "venv"
    subprocess.run([base, "-m", "venv", "--system-site-packages", str(env_dir)], check=True, timeout=300)
    py = str(env_dir / "bin" / "python")
    user = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
        "PYTHONUSERBASE": str(tmp_path / "user"),
    }
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--user", str(wheel)],
        check=True, timeout=900, env=user,
    )  # fmt: skip
    config = tmp_path / "config.toml"
    config.write_text(f'[state]\ndir = "{tmp_path / "state"}"\n')
    probe = "import agent, sys; print(agent.__file__); from agent.cli.main import main; sys.exit(main(sys.argv[1:]))"
    out = subprocess.run(
        [py, "-c", probe, "--config", str(config), "policy", "import", "-", "--json"],
        input='{"version": 2}', capture_output=True, text=True, timeout=120, cwd=tmp_path, env=user,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith(str(tmp_path / "user")), out.stdout
