"""Configuration: TOML validated against the schema; errors name the file, the field and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import config as config_mod
from agent.config import DEFAULT_STATE_DIR, Config, EnforcementConfig, MqttConfig, load
from agent.errors import ConfigError, InputError


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "pointer", "expected"),
    [
        ('[enforcement]\nenabled = "yes"\n', "/enforcement/enabled", "boolean"),
        ('[enforcement]\nmode = "block"\n', "/enforcement/mode", "enforce"),
        ("[enforcement]\nstop_grace_seconds = 1.5\n", "/enforcement/stop_grace_seconds", "integer"),
        ("[enforcement]\nstop_grace_seconds = 61\n", "/enforcement/stop_grace_seconds", "maximum"),
        ("[enforcement]\nverify_timeout_seconds = 0\n", "/enforcement/verify_timeout_seconds", "minimum"),
        ("[enforcement]\nbogus = 1\n", "/enforcement/bogus", "unknown field"),
        ("[bogus]\nx = 1\n", "/bogus", "unknown field"),
        ("enforcement = 3\n", "/enforcement", "object"),
        ('[device]\nid = "a/b"\n', "/device/id", "does not match"),
        ('[device]\ngroups = ["ok", "ok"]\n', "/device/groups", "non-unique"),
        ('[engine]\nurl = "ftp://x"\n', "/engine/url", "does not match"),
        ('[logging]\nlevel = "loud"\n', "/logging/level", "debug"),
        ("[state]\ndir = 1979-05-27\n", "/state/dir", "string"),
        ('[[registries]]\nusername = "u"\n', "/registries/0/host", "'host' is a required property"),
        (
            '[[registries]]\nhost = "r:5000"\n[[registries]]\nhost = "q:5000"\nextra = 1\n',
            "/registries/1/extra",
            "unknown field",
        ),
        (
            '[[registries]]\nhost = "r:5000"\npassword_env = "1BAD"\n',
            "/registries/0/password_env",
            "does not match",
        ),
        ('[mqtt]\naccount = "a"\n', "/mqtt/url", "'url' is a required property"),
        ('[mqtt]\nurl = "http://broker"\n', "/mqtt/url", "does not match"),
        ('[mqtt]\nurl = "mqtt://b:1883"\nkeepalive_seconds = 1\n', "/mqtt/keepalive_seconds", "minimum of 5"),
        ('[mqtt]\nurl = "mqtt://b:1883"\nencoding = "xml"\n', "/mqtt/encoding", "kura-protobuf"),
        (
            '[mqtt]\nurl = "mqtt://b:1883"\nreconnect_min_seconds = 10\nreconnect_max_seconds = 5\n',
            "/mqtt/reconnect_max_seconds",
            ">= reconnect_min_seconds",
        ),
        ('[[registries]]\nhost = "r:5000"\n[[registries]]\nhost = "r:5000"\n', "/registries", "listed twice"),
    ],
)
def test_invalid_config_names_file_field_and_expectation(
    tmp_path: Path, text: str, pointer: str, expected: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load(path)
    message = str(exc.value)
    assert str(path) in message
    assert f"at {pointer}:" in message
    assert expected in message
    assert exc.value.code == "invalid-config"
    assert exc.value.exit_code == 2


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"[enforcement\n", "not valid TOML"),
        (b"enabled = = true\n", "not valid TOML"),
        (b'a = "x"\na = "y"\n', "not valid TOML"),
        (b"\xff\xfe[device]\n", "not valid TOML"),
    ],
)
def test_unparsable_file(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=expected) as exc:
        load(path)
    assert str(path) in str(exc.value)


def test_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="cannot read") as exc:
        load(path)
    assert str(path) in str(exc.value)
    assert isinstance(exc.value, InputError)


def test_embedded_default_when_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_mod, "DEFAULT_CONFIG_PATH", tmp_path / "absent" / "config.toml")
    cfg = load(None)
    assert cfg.source == "<embedded default>"
    assert cfg.state_dir == DEFAULT_STATE_DIR
    assert cfg.enforcement == EnforcementConfig()
    assert cfg.enforcement.enabled is True
    assert cfg.enforcement.mode == "enforce"
    assert cfg.engine.url == "unix:///var/run/docker.sock"
    assert cfg.mqtt is None
    assert cfg.registries == ()
    assert cfg.device.id  # the host name, made safe for a topic level
    assert not any(c in cfg.device.id for c in "/+#. ")


def test_default_path_is_used_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[device]\nid = "dev-1"\n')
    monkeypatch.setattr(config_mod, "DEFAULT_CONFIG_PATH", path)
    cfg = load(None)
    assert cfg.device.id == "dev-1"
    assert cfg.source == str(path)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, ""))
    assert cfg.enforcement == EnforcementConfig()
    assert cfg.state_dir == DEFAULT_STATE_DIR


def test_full_config(tmp_path: Path) -> None:
    text = """
[device]
id = "edge-7"
display_name = "Edge seven"
groups = ["plant-a", "lines.2"]

[engine]
url = "unix:///run/other.sock"
timeout_seconds = 5

[state]
dir = "state"

[enforcement]
enabled = false
mode = "audit"
stop_grace_seconds = 0
negative_cache_seconds = 0

[logging]
level = "debug"
format = "json"

[[registries]]
host = "registry.example:5000"
username = "robot"
password_file = "secrets/registry.pw"
ca_bundle = "/etc/ssl/ca.pem"

[[registries]]
host = "127.0.0.1:5001"
insecure = true
password_env = "REG_PW"

[mqtt]
url = "mqtts://broker.example:8883"
account = "acme"
password_file = "mqtt.pw"
ca_bundle = "../ca.pem"
client_cert = "/abs/cert.pem"
protocol = "5"
outbox_limit = 50
policy_signing_key = "keys/policy.pub"
"""
    path = write(tmp_path, text)
    cfg = load(path)
    assert isinstance(cfg, Config)
    assert cfg.source == str(path)
    assert (cfg.device.id, cfg.device.display_name, cfg.device.groups) == (
        "edge-7",
        "Edge seven",
        ("plant-a", "lines.2"),
    )
    assert (cfg.engine.url, cfg.engine.timeout_seconds) == ("unix:///run/other.sock", 5)
    assert cfg.enforcement == EnforcementConfig(
        enabled=False, mode="audit", stop_grace_seconds=0, negative_cache_seconds=0, mode_configured=True
    )
    assert (cfg.logging.level, cfg.logging.format) == ("debug", "json")
    # relative paths are resolved against the folder of the file, absolute ones kept
    assert cfg.state_dir == tmp_path / "state"
    reg = cfg.registry("registry.example:5000")
    assert reg is not None
    assert reg.username == "robot"
    assert reg.password_file == tmp_path / "secrets" / "registry.pw"
    assert reg.ca_bundle == Path("/etc/ssl/ca.pem")
    local = cfg.registry("127.0.0.1:5001")
    assert local is not None and local.insecure and local.password_env == "REG_PW"
    assert cfg.registry("elsewhere:5000") is None
    assert isinstance(cfg.mqtt, MqttConfig)
    assert cfg.mqtt.password_file == tmp_path / "mqtt.pw"
    assert cfg.mqtt.ca_bundle == tmp_path / ".." / "ca.pem"
    assert cfg.mqtt.client_cert == Path("/abs/cert.pem")
    assert cfg.mqtt.client_key is None
    assert cfg.mqtt.policy_signing_key == tmp_path / "keys" / "policy.pub"
    assert (cfg.mqtt.account, cfg.mqtt.protocol, cfg.mqtt.outbox_limit) == ("acme", "5", 50)
    assert cfg.mqtt.encoding == "kura-protobuf"


def test_relative_paths_use_the_file_folder_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load(write(conf_dir, '[state]\ndir = "st"\n'))
    assert cfg.state_dir == conf_dir / "st"


def test_display_name_defaults_to_id(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, '[device]\nid = "edge-9"\n'))
    assert cfg.device.display_name == "edge-9"


def test_password_is_not_read_at_load_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGEGUARD_TEST_PW", raising=False)
    text = (
        '[[registries]]\nhost = "a.example"\npassword_file = "missing.pw"\n'
        '[[registries]]\nhost = "b.example"\npassword_env = "IMAGEGUARD_TEST_PW"\n'
    )
    cfg = load(write(tmp_path, text))  # neither secret exists: loading still succeeds
    a, b = cfg.registry("a.example"), cfg.registry("b.example")
    assert a is not None and b is not None
    with pytest.raises(ConfigError, match="cannot read password_file") as exc:
        a.password()
    assert str(tmp_path / "missing.pw") in str(exc.value)
    with pytest.raises(ConfigError, match="IMAGEGUARD_TEST_PW is not set"):
        b.password()
    # the secret is read on use, so a change takes effect without reloading the configuration
    (tmp_path / "missing.pw").write_text("s3cret\n", encoding="utf-8")
    monkeypatch.setenv("IMAGEGUARD_TEST_PW", "from-env")
    assert a.password() == "s3cret"
    assert b.password() == "from-env"
    (tmp_path / "missing.pw").write_text("rotated\r\n", encoding="utf-8")
    assert a.password() == "rotated"


def test_no_password_configured(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, '[[registries]]\nhost = "a.example"\nusername = "u"\n'))
    reg = cfg.registry("a.example")
    assert reg is not None and reg.password() is None


def test_secrets_never_appear_in_the_config_repr(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("hunter2", encoding="utf-8")
    cfg = load(write(tmp_path, '[[registries]]\nhost = "a.example"\npassword_file = "pw"\n'))
    assert "hunter2" not in repr(cfg)
