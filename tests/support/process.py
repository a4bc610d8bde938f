"""Stopping the service processes tests start."""

from __future__ import annotations

import signal
import subprocess


def terminate(proc: subprocess.Popen[bytes], grace: float, after_kill: float | None = None) -> None:
    """SIGTERM, so the service can save its state; SIGKILL if it has not exited within ``grace`` seconds
    (then wait ``after_kill`` seconds for it, or without limit when None)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=after_kill)
