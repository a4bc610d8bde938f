"""Test-wide fixtures. Real services (dockerd, mosquitto, registry) are started by fixture modules."""

from __future__ import annotations

import os
import tempfile

pytest_plugins = [
    "tests.support.fixtures.docker",
    "tests.support.fixtures.registry",
    "tests.support.fixtures.mosquitto",
    "tests.support.fixtures.fleet",
    "tests.support.fixtures.postgres",
    "tests.support.fixtures.browser",
]

# per-user state (the console's device list when its state directory is not writable) stays inside this
# test session: no test reads or leaves anything in the real home directory
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="ig-test-state-home-")
