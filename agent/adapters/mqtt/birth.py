"""Kura lifecycle certificates: birth (MQTT/BIRTH), apps (MQTT/APPS) and disconnect (MQTT/DC).

Metric names are Kura's (kura-model.md section 3), all STRING; a fact we do not know is omitted, as Kura omits
null metrics. The runtime facts ``jvm_name`` / ``jvm_version`` carry the Python implementation and version,
``application_framework`` is ``ImageGuard``. Our own metrics for a console are prefixed ``imageguard_``.

Gathering facts (:func:`gather_device_facts`) reads /proc, /sys and the standard library once; building the
messages is pure.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent import APP_ID, __version__
from agent.adapters.mqtt.kurapayload import KuraMessage, KuraPosition, MetricValue

_SIOCGIFADDR = 0x8915


@dataclass(frozen=True)
class DeviceFacts:
    """Hardware / OS identity, gathered once. None = unknown (metric omitted)."""

    model_name: str | None = None
    model_id: str | None = None
    serial_number: str | None = None
    bios_version: str | None = None
    firmware_version: str | None = None
    cpu_version: str | None = None
    os: str | None = None
    os_version: str | None = None
    os_arch: str | None = None
    runtime_name: str | None = None
    runtime_version: str | None = None
    available_processors: int | None = None
    total_memory_kb: int | None = None
    #: (interface name, MAC, first IPv4 address or None) of each active non-loopback interface
    interfaces: tuple[tuple[str, str, str | None], ...] = ()


@dataclass(frozen=True)
class AgentInfo:
    """What the agent says about itself; ``policy_version`` and ``groups`` may change between births."""

    display_name: str
    groups: Sequence[str] = ()
    policy_version: str | None = None
    payload_encoding: str = "KURA_PROTOBUF"
    accept_gzip: bool = True
    application_ids: Sequence[str] = (APP_ID,)
    agent_version: str = __version__
    #: further imageguard_* metrics (name without prefix -> text)
    extra: Mapping[str, str] = field(default_factory=dict)


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().strip("\0").strip()
    except OSError:
        return None
    return text or None


def read_uptime_ms(proc: Path = Path("/proc")) -> int | None:
    """Milliseconds since boot from ``/proc/uptime`` (what Kura reports on Linux)."""
    text = _read(proc / "uptime")
    try:
        return int(float(text.split()[0]) * 1000) if text else None
    except ValueError:
        return None


def _cpu_model(proc: Path) -> str | None:
    text = _read(proc / "cpuinfo") or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Processor", "cpu model") and value.strip():
            return value.strip()
    return platform.processor() or None


def _mem_total_kb(proc: Path) -> int | None:
    for line in (_read(proc / "meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            with contextlib.suppress(ValueError, IndexError):
                return int(line.split()[1])
    return None


def _ipv4_of(ifname: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", ifname[:15].encode()))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def _interfaces(sys_net: Path) -> tuple[tuple[str, str, str | None], ...]:
    result = []
    try:
        names = sorted(p.name for p in sys_net.iterdir())
    except OSError:
        return ()
    for name in names:
        if name == "lo" or _read(sys_net / name / "operstate") != "up":
            continue
        mac = (_read(sys_net / name / "address") or "").upper()
        result.append((name, mac, _ipv4_of(name)))
    return tuple(result)


def gather_device_facts(root: Path = Path("/")) -> DeviceFacts:
    """Collect facts from ``root``'s /proc and /sys plus the standard library. Never raises."""
    dmi = root / "sys/class/dmi/id"
    dt = root / "sys/firmware/devicetree/base"
    uname = platform.uname()
    return DeviceFacts(
        model_name=_read(dmi / "product_name") or _read(dt / "model"),
        model_id=_read(dmi / "product_version") or _read(dt / "compatible"),
        serial_number=_read(dmi / "product_serial") or _read(dt / "serial-number"),
        bios_version=_read(dmi / "bios_version"),
        firmware_version=uname.version or None,
        cpu_version=_cpu_model(root / "proc"),
        os=uname.system or None,
        os_version=uname.release or None,
        os_arch=uname.machine or None,
        runtime_name=platform.python_implementation(),
        runtime_version=platform.python_version(),
        available_processors=os.cpu_count(),
        total_memory_kb=_mem_total_kb(root / "proc"),
        interfaces=_interfaces(root / "sys/class/net"),
    )


def _strings(pairs: Sequence[tuple[str, object]]) -> dict[str, MetricValue]:
    return {name: MetricValue.string(str(value)) for name, value in pairs if value is not None}


def birth_message(facts: DeviceFacts, agent: AgentInfo, *, uptime_ms: int | None, now_ms: int) -> KuraMessage:
    """The MQTT/BIRTH payload (the MQTT/APPS payload is the same, as in Kura)."""
    ifaces = facts.interfaces
    pairs: list[tuple[str, object]] = [
        ("uptime", uptime_ms),
        ("display_name", agent.display_name),
        ("model_name", facts.model_name),
        ("model_id", facts.model_id),
        ("serial_number", facts.serial_number),
        ("firmware_version", facts.firmware_version),
        ("bios_version", facts.bios_version),
        ("cpu_version", facts.cpu_version),
        ("os", facts.os),
        ("os_version", facts.os_version),
        ("os_arch", facts.os_arch),
        ("jvm_name", facts.runtime_name),
        ("jvm_version", facts.runtime_version),
        ("application_framework", "ImageGuard"),
        ("application_framework_version", agent.agent_version),
        ("connection_interface", ",".join(f"{n} ({mac})" for n, mac, _ in ifaces) or "UNKNOWN"),
        ("connection_ip", ",".join(ip for _, _, ip in ifaces if ip) or "UNKNOWN"),
        ("available_processors", facts.available_processors),
        ("total_memory", facts.total_memory_kb),
        ("accept_encoding", "gzip" if agent.accept_gzip else ""),
        ("application_ids", ",".join(agent.application_ids)),
        ("payload_encoding", agent.payload_encoding),
        ("imageguard_version", agent.agent_version),
        ("imageguard_groups", ",".join(agent.groups)),
        ("imageguard_policy_version", agent.policy_version),
        *((f"imageguard_{k}", v) for k, v in agent.extra.items()),
    ]
    # Kura sends a zero position when there is no GPS fix
    position = KuraPosition(latitude=0.0, longitude=0.0, altitude=0.0)
    return KuraMessage(timestamp_ms=now_ms, metrics=_strings(pairs), position=position)


def disconnect_message(agent: AgentInfo, *, uptime_ms: int | None, now_ms: int) -> KuraMessage:
    """The MQTT/DC payload: only ``uptime`` and ``display_name``."""
    pairs: list[tuple[str, object]] = [("uptime", uptime_ms), ("display_name", agent.display_name)]
    return KuraMessage(timestamp_ms=now_ms, metrics=_strings(pairs))
