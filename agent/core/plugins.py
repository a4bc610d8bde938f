"""Who answers dockerd's authorization questions: spotting a takeover of ImageGuard's plugin slot.

dockerd looks an authorization plugin's name up among its managed plugins first, then among legacy socket
and spec files; so a managed plugin installed under ImageGuard's name takes its place at the next dockerd
start, and any other authorization plugin is a second opinion that ImageGuard does not control. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

AUTHZ_INTERFACE = "docker.authz/1.0"


@dataclass(frozen=True, slots=True)
class ManagedPlugin:
    name: str  # with its tag, e.g. "vieux/sshfs:latest"
    enabled: bool
    types: tuple[str, ...]  # interface types, e.g. "docker.authz/1.0"

    @property
    def base_name(self) -> str:
        return self.name.rsplit(":", 1)[0] if ":" in self.name.rsplit("/", 1)[-1] else self.name

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any]) -> ManagedPlugin | None:
        name = raw.get("Name")
        if not isinstance(name, str) or not name:
            return None
        interface = (raw.get("Config") or {}).get("Interface") or {}
        types = interface.get("Types") or ()
        return cls(name, bool(raw.get("Enabled")), tuple(str(t) for t in types if isinstance(t, str)))


def slot_findings(
    ours: Iterable[str], configured: Iterable[str], managed: Iterable[ManagedPlugin]
) -> list[str]:
    """What threatens the plugin slot: ``ours`` are the names ImageGuard's plugin goes by, ``configured``
    the authorization plugins dockerd uses, ``managed`` the engine's managed plugins."""
    names = set(ours)
    found: list[str] = []
    for m in managed:
        if m.name in names or m.base_name in names:
            found.append(
                f"managed plugin {m.name} carries the name of ImageGuard's authorization plugin: dockerd looks "
                "managed plugins up first, so it would ask that plugin instead (remove it: docker plugin rm -f "
                f"{m.name})"
            )
        elif AUTHZ_INTERFACE in m.types:
            found.append(f"managed plugin {m.name} is an authorization plugin ImageGuard does not control")
    for n in configured:
        if n not in names:
            found.append(f"dockerd also asks authorization plugin {n}, which ImageGuard does not control")
    return found
