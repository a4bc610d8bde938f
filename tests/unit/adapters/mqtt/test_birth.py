from __future__ import annotations

from pathlib import Path

from agent.adapters.mqtt.birth import (
    AgentInfo,
    DeviceFacts,
    birth_message,
    disconnect_message,
    gather_device_facts,
    read_uptime_ms,
)
from agent.adapters.mqtt.kurapayload import MetricType


def _fake_root(tmp_path: Path) -> Path:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/uptime").write_text("12345.67 99.0\n")
    (tmp_path / "proc/meminfo").write_text("MemTotal:        2048000 kB\nMemFree: 1 kB\n")
    (tmp_path / "proc/cpuinfo").write_text("processor\t: 0\nmodel name\t: Test CPU 9000\n")
    dmi = tmp_path / "sys/class/dmi/id"
    dmi.mkdir(parents=True)
    (dmi / "product_name").write_text("Edge Box\n")
    (dmi / "bios_version").write_text("1.2.3\n")
    net = tmp_path / "sys/class/net"
    for name, state, mac in (
        ("lo", "unknown", "00:00:00:00:00:00"),
        ("eth9", "up", "aa:bb:cc:dd:ee:ff"),
        ("wl0", "down", "11:22:33:44:55:66"),
    ):
        (net / name).mkdir(parents=True)
        (net / name / "operstate").write_text(state + "\n")
        (net / name / "address").write_text(mac + "\n")
    return tmp_path


def test_facts_from_proc_and_sys(tmp_path: Path) -> None:
    root = _fake_root(tmp_path)
    facts = gather_device_facts(root)
    assert facts.model_name == "Edge Box"
    assert facts.bios_version == "1.2.3"
    assert facts.cpu_version == "Test CPU 9000"
    assert facts.total_memory_kb == 2048000
    # only active, non-loopback interfaces; eth9 does not exist here so it has no address
    assert facts.interfaces == (("eth9", "AA:BB:CC:DD:EE:FF", None),)
    assert read_uptime_ms(root / "proc") == 12345670
    assert read_uptime_ms(tmp_path / "nowhere") is None


def test_real_host_facts_do_not_raise() -> None:
    facts = gather_device_facts()
    assert facts.os == "Linux" and facts.runtime_name


def test_birth_metrics_are_kura_strings() -> None:
    facts = DeviceFacts(
        model_name="Box", os="Linux", available_processors=4, interfaces=(("eth0", "AA", "10.0.0.2"),)
    )
    agent = AgentInfo(display_name="Dev 1", groups=("a", "b"), policy_version="7", extra={"mode": "enforce"})
    msg = birth_message(facts, agent, uptime_ms=1000, now_ms=5)
    assert all(m.type is MetricType.STRING for m in msg.metrics.values())
    expected = {
        "uptime": "1000",
        "display_name": "Dev 1",
        "model_name": "Box",
        "os": "Linux",
        "available_processors": "4",
        "connection_interface": "eth0 (AA)",
        "connection_ip": "10.0.0.2",
        "application_ids": "CONTAINER-AUTH-V1",
        "payload_encoding": "KURA_PROTOBUF",
        "accept_encoding": "gzip",
        "application_framework": "ImageGuard",
        "imageguard_groups": "a,b",
        "imageguard_policy_version": "7",
        "imageguard_mode": "enforce",
    }
    assert {k: msg.string(k) for k in expected} == expected
    # unknown facts are omitted, as Kura omits null metrics
    assert "serial_number" not in msg.metrics and "bios_version" not in msg.metrics
    assert msg.timestamp_ms == 5 and msg.position is not None


def test_birth_without_network_says_unknown() -> None:
    msg = birth_message(DeviceFacts(), AgentInfo(display_name="d"), uptime_ms=None, now_ms=1)
    assert msg.string("connection_ip") == "UNKNOWN" and "uptime" not in msg.metrics


def test_disconnect_has_only_uptime_and_name() -> None:
    msg = disconnect_message(AgentInfo(display_name="d"), uptime_ms=7, now_ms=1)
    assert set(msg.metrics) == {"uptime", "display_name"}
