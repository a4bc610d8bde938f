"""Kura's MQTT topic namespace for one device (kura-model.md section 1).

control   {prefix}/{account}/{device}/{app}/{METHOD}/{resource...}      (prefix default $EDC)
reply     {prefix}/{account}/{requester}/{app}/REPLY/{request.id}
data      {account}/{device}/{app}/{verdicts|alerts|policy|instances}
lifecycle {prefix}/{account}/{device}/MQTT/{BIRTH|DC|APPS}, LWT always under $EDC (Kura's lwt.topic default)
fleet     {prefix}/{account}/fleet/{group}/{app}/policy                 (our extension: group policy layers)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent import APP_ID

METHODS = ("GET", "PUT", "POST", "DEL", "EXEC")
DATA_KINDS = ("verdicts", "alerts", "policy", "instances")
LIFECYCLE_KINDS = ("BIRTH", "DC", "APPS", "LWT")
#: the client-id level of fleet topics; a device must not use it as its id
FLEET_LEVEL = "fleet"
#: Kura fixes the LWT topic's prefix to $EDC independently of the control prefix
LWT_PREFIX = "$EDC"

DataKind = Literal["verdicts", "alerts", "policy", "instances"]
LifecycleKind = Literal["BIRTH", "DC", "APPS", "LWT"]


def device_message(
    topic: str, *, account: str, prefix: str, data_kinds: tuple[str, ...] = DATA_KINDS
) -> tuple[str, str] | None:
    """(kind, device) of a device's data topic (``{account}/{device}/{app}/{kind}``) or lifecycle topic
    (``{prefix}/{account}/{device}/MQTT/{kind}``, LWT also under $EDC); None for any other topic. What a
    console reads: devices' telemetry and certificates."""
    parts = topic.split("/")
    if len(parts) == 4 and parts[0] == account and parts[2] == APP_ID and parts[3] in data_kinds and parts[1]:
        return parts[3], parts[1]
    if (
        len(parts) == 5
        and parts[0] in (prefix, LWT_PREFIX)
        and parts[1] == account
        and parts[3] == "MQTT"
        and parts[4] in LIFECYCLE_KINDS
        and parts[2]
    ):
        return parts[4], parts[2]
    return None


def valid_level(level: str) -> bool:
    """A single topic level we may publish to: non-empty, no separator, no wildcard, no NUL."""
    return (
        bool(level) and not any(c in level for c in "/+#\0") and len(level.encode("utf-8", "replace")) <= 1024
    )


@dataclass(frozen=True)
class ControlTopic:
    """An inbound control topic after the app id. ``method`` is None when ``word`` is not a Kura method
    (the dispatcher answers 400); ``REPLY`` / ``NOTIFY`` are traffic for requesters, not requests."""

    word: str
    method: str | None
    resource: tuple[str, ...]

    @property
    def is_reply_traffic(self) -> bool:
        return self.word in ("REPLY", "NOTIFY")


@dataclass(frozen=True)
class Topics:
    account: str
    device_id: str
    app_id: str = APP_ID
    control_prefix: str = "$EDC"

    def __post_init__(self) -> None:
        for name in ("account", "device_id", "app_id", "control_prefix"):
            if not valid_level(getattr(self, name)):
                raise ValueError(f"{name} {getattr(self, name)!r} cannot be an MQTT topic level")

    # --- device side ---------------------------------------------------------------------------------

    @property
    def control_base(self) -> str:
        return f"{self.control_prefix}/{self.account}/{self.device_id}/{self.app_id}"

    @property
    def control_filter(self) -> str:
        """Our subscription for requests addressed to this device and app."""
        return f"{self.control_base}/#"

    def request(self, method: str, *resource: str) -> str:
        """The topic a requester publishes a request to (used by tests and tools)."""
        return "/".join((self.control_base, method, *resource))

    def reply(self, requester: str, request_id: str) -> str:
        if not valid_level(requester) or not valid_level(request_id):
            raise ValueError("requester.client.id and request.id must be single topic levels")
        return f"{self.control_prefix}/{self.account}/{requester}/{self.app_id}/REPLY/{request_id}"

    def reply_filter(self, requester: str) -> str:
        return f"{self.control_prefix}/{self.account}/{requester}/{self.app_id}/REPLY/#"

    def data(self, kind: DataKind) -> str:
        if kind not in DATA_KINDS:
            raise ValueError(f"unknown data topic {kind!r}")
        return f"{self.account}/{self.device_id}/{self.app_id}/{kind}"

    def lifecycle(self, kind: LifecycleKind) -> str:
        if kind not in LIFECYCLE_KINDS:
            raise ValueError(f"unknown lifecycle topic {kind!r}")
        prefix = LWT_PREFIX if kind == "LWT" else self.control_prefix
        return f"{prefix}/{self.account}/{self.device_id}/MQTT/{kind}"

    def fleet_policy(self, group: str) -> str:
        if not valid_level(group):
            raise ValueError(f"group {group!r} cannot be an MQTT topic level")
        return f"{self.control_prefix}/{self.account}/{FLEET_LEVEL}/{group}/{self.app_id}/policy"

    # --- parsing -------------------------------------------------------------------------------------

    def parse_control(self, topic: str) -> ControlTopic | None:
        """Split a topic under :attr:`control_base`; None if it is not addressed to this device and app."""
        base = self.control_base + "/"
        if not topic.startswith(base):
            return None
        word, *resource = topic[len(base) :].split("/")
        return ControlTopic(word=word, method=word if word in METHODS else None, resource=tuple(resource))

    def parse_fleet(self, topic: str) -> str | None:
        """The group of a fleet policy topic, or None."""
        parts = topic.split("/")
        if (
            len(parts) == 6
            and parts[0] == self.control_prefix
            and parts[1] == self.account
            and parts[2] == FLEET_LEVEL
            and parts[4] == self.app_id
            and parts[5] == "policy"
            and parts[3]
        ):
            return parts[3]
        return None
