"""Runtime constraints: an allowed image is not the same as trusted code running.

A container with an allowed digest can still run arbitrary code through how it is started: privileged mode,
host namespaces, added capabilities, host devices, a bind mount of a sensitive host path, an entrypoint or
command of the starter's choosing, seccomp or AppArmor switched off. :class:`RuntimeFacts` says how one
container is (or would be) started, read from the engine's inspect data or from a create request;
:class:`RuntimeRule` says what the policy allows for the images in its scope; :func:`violation` names the
first constraint broken. Pure: no I/O.

Without rules nothing is constrained, except that the agent protects itself: no container may bind a host
path that holds the agent's state or the authorization plugin's socket (``EffectivePolicy.protected``).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.core.imageref import ImageRef, scope_matches
from agent.errors import PolicyError

NAMESPACES = ("network", "pid", "ipc", "uts", "userns")
_HOST_MODES = {
    "network": "NetworkMode",
    "pid": "PidMode",
    "ipc": "IpcMode",
    "uts": "UTSMode",
    "userns": "UsernsMode",
}


@dataclass(frozen=True, slots=True)
class RuntimeFacts:
    """How a container is started, as far as it matters for what code runs with which rights."""

    privileged: bool = False
    host_namespaces: frozenset[str] = frozenset()
    capabilities: frozenset[str] = frozenset()  # added ones, upper case without ``CAP_``
    devices: tuple[str, ...] = ()  # host device paths
    binds: tuple[str, ...] = ()  # host source paths of bind mounts, normalised
    command_override: bool = False  # entrypoint or command differs from the image's
    unconfined: frozenset[str] = frozenset()  # "seccomp", "apparmor", "selinux"

    @classmethod
    def from_host_config(
        cls,
        host: Mapping[str, Any],
        *,
        entrypoint: Any,
        cmd: Any,
        image_config: Mapping[str, Any] | None,
        mounts: Iterable[Mapping[str, Any]] = (),
    ) -> RuntimeFacts:
        """From a ``HostConfig`` (inspect data or a create request) and the entrypoint and command given.

        ``entrypoint`` / ``cmd`` of None mean "the image's"; ``mounts`` are the inspect data's resolved
        mounts, read in addition to ``HostConfig.Binds`` and ``HostConfig.Mounts``.
        """
        image = image_config or {}
        override = (entrypoint is not None and _argv(entrypoint) != _argv(image.get("Entrypoint"))) or (
            cmd is not None and _argv(cmd) != _argv(image.get("Cmd"))
        )
        binds: list[str] = []
        for b in host.get("Binds") or ():
            source = str(b).split(":", 1)[0]
            if source.startswith("/"):  # else a named volume
                binds.append(source)
        for m in [*(host.get("Mounts") or ()), *mounts]:
            if isinstance(m, Mapping) and str(m.get("Type", "")).lower() == "bind" and m.get("Source"):
                binds.append(str(m["Source"]))
        unconfined: set[str] = set()
        for opt in host.get("SecurityOpt") or ():
            key, _, value = str(opt).replace(":", "=", 1).partition("=")
            if (key, value) in (("seccomp", "unconfined"), ("apparmor", "unconfined")):
                unconfined.add(key)
            elif (key, value) == ("label", "disable"):
                unconfined.add("selinux")
        return cls(
            privileged=bool(host.get("Privileged")),
            host_namespaces=frozenset(n for n, k in _HOST_MODES.items() if str(host.get(k) or "") == "host"),
            capabilities=frozenset(_cap(c) for c in host.get("CapAdd") or ()),
            devices=tuple(
                str(d.get("PathOnHost", "")) for d in host.get("Devices") or () if isinstance(d, Mapping)
            ),
            binds=tuple(dict.fromkeys(_norm(b) for b in binds)),
            command_override=bool(override),
            unconfined=frozenset(unconfined),
        )


@dataclass(frozen=True, slots=True)
class RuntimeRule:
    """What the images in ``scope`` may ask for. A field left out constrains nothing."""

    scope: tuple[str, ...]
    privileged: bool | None = None  # False: refused
    host_namespaces: frozenset[str] | None = None  # the ones allowed
    capabilities: frozenset[str] | None = None  # the added capabilities allowed
    devices: bool | None = None  # False: no host device
    deny_binds: tuple[str, ...] = ()  # host paths no bind may expose
    command_override: bool | None = None  # False: the image's own entrypoint and command only
    unconfined: bool | None = None  # False: seccomp, AppArmor and SELinux stay on

    def covers(self, ref: ImageRef | None) -> bool:
        if ref is None:  # a bare image id: only catch-all rules apply
            return any(p.strip() in ("*", "**") for p in self.scope)
        return any(scope_matches(p, ref) for p in self.scope)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> RuntimeRule:
        scope = tuple(d.get("scope") or ())
        if not scope:
            raise PolicyError(
                f"{where}: at /scope: a runtime rule needs the images it applies to ('**': every one)"
            )

        def opt_set(key: str, norm: Any) -> frozenset[str] | None:
            return frozenset(norm(v) for v in d[key]) if key in d else None

        return cls(
            scope=scope,
            privileged=d.get("privileged"),
            host_namespaces=opt_set("host_namespaces", str),
            capabilities=opt_set("capabilities", _cap),
            devices=d.get("devices"),
            deny_binds=tuple(_norm(p) for p in d.get("deny_binds", ())),
            command_override=d.get("command_override"),
            unconfined=d.get("unconfined"),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scope": list(self.scope)}
        for key in ("privileged", "devices", "command_override", "unconfined"):
            if (value := getattr(self, key)) is not None:
                out[key] = value
        if self.host_namespaces is not None:
            out["host_namespaces"] = sorted(self.host_namespaces)
        if self.capabilities is not None:
            out["capabilities"] = sorted(self.capabilities)
        if self.deny_binds:
            out["deny_binds"] = list(self.deny_binds)
        return out


def violation(
    facts: RuntimeFacts, ref: ImageRef | None, rules: Iterable[RuntimeRule], protected: Iterable[str]
) -> str | None:
    """The first constraint ``facts`` break, in words that name it; None when all hold."""
    for path in protected:
        if (bind := _exposing(facts.binds, _norm(path))) is not None:
            return f"runtime constraint 'agent-protection': the bind mount of {bind} exposes {path}, which ImageGuard protects"
    for rule in rules:
        if not rule.covers(ref):
            continue
        scope = ", ".join(rule.scope)
        if rule.privileged is False and facts.privileged:
            return f"runtime constraint 'privileged': privileged mode is not allowed for {scope}"
        if rule.host_namespaces is not None and (
            extra := sorted(facts.host_namespaces - rule.host_namespaces)
        ):
            return f"runtime constraint 'host_namespaces': the host's {', '.join(extra)} namespace is not allowed for {scope}"
        if rule.capabilities is not None and (caps := sorted(facts.capabilities - rule.capabilities)):
            return f"runtime constraint 'capabilities': adding {', '.join(caps)} is not allowed for {scope}"
        if rule.devices is False and facts.devices:
            return f"runtime constraint 'devices': host device {facts.devices[0]} is not allowed for {scope}"
        for denied in rule.deny_binds:
            if (bind := _exposing(facts.binds, denied)) is not None:
                return f"runtime constraint 'deny_binds': the bind mount of {bind} exposes {denied}"
        if rule.command_override is False and facts.command_override:
            return f"runtime constraint 'command_override': only the image's own entrypoint and command may run for {scope}"
        if rule.unconfined is False and facts.unconfined:
            return f"runtime constraint 'unconfined': {', '.join(sorted(facts.unconfined))} must stay on for {scope}"
    return None


def _exposing(binds: Iterable[str], path: str) -> str | None:
    """The bind that makes ``path`` visible: the path itself, a directory above it, or one below it."""
    for b in binds:
        if b == path or _under(path, b) or _under(b, path):
            return b
    return None


def _under(child: str, parent: str) -> bool:
    return parent == "/" or child.startswith(parent.rstrip("/") + "/")


def _norm(path: str) -> str:
    return posixpath.normpath("/" + str(path).lstrip("/"))


def _cap(name: Any) -> str:
    text = str(name).upper()
    return text.removeprefix("CAP_")


def _argv(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value) or None
