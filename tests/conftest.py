"""Test-wide fixtures. Real services (dockerd, mosquitto, registry) are started by fixture modules."""

pytest_plugins = [
    "tests.fixtures.docker",
    "tests.fixtures.registry",
    "tests.fixtures.mosquitto",
    "tests.fixtures.fleet",
]
