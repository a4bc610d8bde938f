"""Test-wide fixtures. Real services (dockerd, mosquitto, registry) are started by fixture modules."""

pytest_plugins = [
    "tests.support.fixtures.docker",
    "tests.support.fixtures.registry",
    "tests.support.fixtures.mosquitto",
    "tests.support.fixtures.fleet",
]
