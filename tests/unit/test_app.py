"""The composition root's own rules: which MQTT transports it accepts."""

from __future__ import annotations

import pytest

from agent.app import check_transport
from agent.config import MqttConfig
from agent.errors import ConfigError


@pytest.mark.parametrize(
    "url",
    ["mqtts://broker.example:8883", "mqtt://127.0.0.1:1883", "mqtt://localhost:1883", "mqtt://[::1]:1883"],
)
def test_tls_or_loopback_is_accepted(url: str) -> None:
    check_transport(MqttConfig(url=url))


@pytest.mark.parametrize(
    "url", ["mqtt://broker.example:1883", "mqtt://10.0.0.5:1883", "mqtt://127.0.0.1.nip.io"]
)
def test_plaintext_to_another_host_needs_an_explicit_setting(url: str) -> None:
    with pytest.raises(ConfigError, match=r"plaintext MQTT to a broker on another host.*allow_plaintext"):
        check_transport(MqttConfig(url=url))
    check_transport(MqttConfig(url=url, allow_plaintext=True))
