from __future__ import annotations

import pytest

from agent.adapters.mqtt.topics import ControlTopic, Topics

T = Topics(account="acme", device_id="dev-1")


def test_topic_builders() -> None:
    assert T.control_filter == "$EDC/acme/dev-1/CONTAINER-AUTH-V1/#"
    assert T.reply("console", "42") == "$EDC/acme/console/CONTAINER-AUTH-V1/REPLY/42"
    assert T.data("verdicts") == "acme/dev-1/CONTAINER-AUTH-V1/verdicts"
    assert T.lifecycle("BIRTH") == "$EDC/acme/dev-1/MQTT/BIRTH"
    assert T.fleet_policy("line-a") == "$EDC/acme/fleet/line-a/CONTAINER-AUTH-V1/policy"
    custom = Topics(account="acme", device_id="dev-1", control_prefix="$CTL")
    # Kura keeps the LWT under $EDC whatever the control prefix
    assert custom.lifecycle("LWT") == "$EDC/acme/dev-1/MQTT/LWT"
    assert custom.lifecycle("DC") == "$CTL/acme/dev-1/MQTT/DC"


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("$EDC/acme/dev-1/CONTAINER-AUTH-V1/GET/allowlist", ControlTopic("GET", "GET", ("allowlist",))),
        (
            "$EDC/acme/dev-1/CONTAINER-AUTH-V1/DEL/allowlist/sha256:ab",
            ControlTopic("DEL", "DEL", ("allowlist", "sha256:ab")),
        ),
        ("$EDC/acme/dev-1/CONTAINER-AUTH-V1/EXEC", ControlTopic("EXEC", "EXEC", ())),
        ("$EDC/acme/dev-1/CONTAINER-AUTH-V1/SUBMIT/x", ControlTopic("SUBMIT", None, ("x",))),
        ("$EDC/acme/dev-1/CONTAINER-AUTH-V1/get/x", ControlTopic("get", None, ("x",))),
        ("$EDC/acme/dev-1/CONTAINER-AUTH-V1/REPLY/1", ControlTopic("REPLY", None, ("1",))),
        ("$EDC/acme/dev-2/CONTAINER-AUTH-V1/GET/x", None),
        ("$EDC/acme/dev-1/OTHER-APP/GET/x", None),
        ("acme/dev-1/CONTAINER-AUTH-V1/GET/x", None),
        ("$EDC/acme/dev-1/CONTAINER-AUTH-V1", None),
    ],
)
def test_parse_control(topic: str, expected: ControlTopic | None) -> None:
    assert T.parse_control(topic) == expected


def test_reply_traffic_flag() -> None:
    parsed = T.parse_control("$EDC/acme/dev-1/CONTAINER-AUTH-V1/REPLY/1")
    assert parsed is not None and parsed.is_reply_traffic


@pytest.mark.parametrize(
    ("topic", "group"),
    [
        ("$EDC/acme/fleet/line-a/CONTAINER-AUTH-V1/policy", "line-a"),
        ("$EDC/acme/fleet/line-a/CONTAINER-AUTH-V1/other", None),
        ("$EDC/other/fleet/line-a/CONTAINER-AUTH-V1/policy", None),
        ("$EDC/acme/fleet//CONTAINER-AUTH-V1/policy", None),
    ],
)
def test_parse_fleet(topic: str, group: str | None) -> None:
    assert T.parse_fleet(topic) == group


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "x\0"])
def test_levels_are_validated(bad: str) -> None:
    with pytest.raises(ValueError):
        Topics(account="acme", device_id=bad)
    with pytest.raises(ValueError):
        T.reply(bad, "1")
    with pytest.raises(ValueError):
        T.fleet_policy(bad)
