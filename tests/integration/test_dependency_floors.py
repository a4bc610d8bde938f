"""Issue 14: the dependency floors in pyproject.toml are true. Every core dependency is installed at exactly
its declared minimum, in a directory of its own, and the whole unit suite runs against those versions."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def floors() -> list[str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    out = []
    for dep in deps:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*", dep.split(";")[0])
        assert m, f"dependency {dep!r} has no '>=' floor to check"
        out.append(f"{m.group(1)}=={m.group(2)}")
    return out


def _release(version: str) -> tuple[int, ...]:
    parts = [int(p) for p in version.split(".") if p.isdigit()]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def test_the_unit_suite_passes_on_the_declared_minimum_versions(tmp_path: Path) -> None:
    target = tmp_path / "floors"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target", str(target),
         *floors()],
        check=True, timeout=900,
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(target)}  # ahead of site-packages: the floors win
    versions = subprocess.run(
        [sys.executable, "-c", "import cryptography, docker; print(cryptography.__version__, docker.__version__)"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    declared = dict(f.split("==") for f in floors())
    for name, got in zip(("cryptography", "docker"), versions, strict=True):
        assert _release(got) == _release(declared[name]), (name, got, declared[name])
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not integration", "tests/unit"],
        env=env, capture_output=True, text=True, timeout=900, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:]
