"""Run the real agent as a separate process, the way users run it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def write_config(path: Path, sections: dict[str, dict[str, Any]], *, first_run_audit: bool = False) -> Path:
    """Write a TOML config from nested dicts (strings, numbers, booleans, lists of strings).

    The tests are about enforcing, so the mode is ``enforce`` unless they name one; ``first_run_audit``
    leaves it unset, as a new device's configuration would (the agent then audits until a policy is set).
    """
    if not first_run_audit:
        sections = {**sections, "enforcement": {"mode": "enforce", **sections.get("enforcement", {})}}
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        for k, v in values.items():
            lines.append(f"{k} = {_toml(v)}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return json.dumps(str(v))


def cli(
    config: Path, *args: str, check: bool = False, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``imageguard --config CONFIG ARGS...`` and return the finished process."""
    result = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"imageguard {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


def wait_for(
    predicate: Callable[[], bool], timeout: float = 15.0, interval: float = 0.05, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


@dataclass
class AgentProcess:
    config: Path
    log_path: Path
    extra_args: list[str] = field(default_factory=list)
    wrapper: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_scan: bool = True, timeout: float = 30) -> AgentProcess:
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *self.wrapper,
                    sys.executable,
                    "-m",
                    "agent",
                    "--config",
                    str(self.config),
                    "run",
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )
        if wait_scan:
            self.wait_log("scan done", timeout=timeout)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[self._offset :]

    def wait_log(self, text: str, timeout: float = 15, count: int = 1) -> None:
        def seen() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            return self.log().count(text) >= count

        wait_for(seen, timeout, what=f"agent log line {text!r}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.proc = None

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)
