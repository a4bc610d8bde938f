"""Agent configuration: a TOML file validated against ``schemas/config.schema.json``.

Every field has a sane default, so the agent runs with no file at all (the embedded default).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent.core.schemas import validate
from agent.errors import ConfigError, SchemaError

DEFAULT_CONFIG_PATH = Path("/etc/imageguard/config.toml")
DEFAULT_STATE_DIR = Path("/var/lib/imageguard")
Mode = Literal["enforce", "audit"]


@dataclass(frozen=True)
class DeviceConfig:
    id: str
    display_name: str
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class EngineConfig:
    url: str = "unix:///var/run/docker.sock"
    timeout_seconds: float = 30.0


@dataclass(frozen=True)
class EnforcementConfig:
    enabled: bool = True
    mode: Mode = "enforce"
    #: time a blocked container gets between SIGTERM and SIGKILL
    stop_grace_seconds: int = 1
    verify_timeout_seconds: float = 10.0
    #: how long a failed verification is remembered, so a burst of starts costs one verification
    negative_cache_seconds: float = 60.0
    #: how often every container is checked against what was decided (catches anything missed)
    reconcile_seconds: float = 30.0
    #: freeze a container the moment the runtime makes its cgroup, before its entrypoint runs, and kill it
    #: there when it cannot be allowed (agent/runtime/enforcer.py, Enforcer.gate)
    freeze_on_create: bool = True
    #: whether the configuration names the mode: if not, a device on which no policy was ever set runs in
    #: audit mode, so that the first start of the agent removes nothing
    mode_configured: bool = False


@dataclass(frozen=True)
class PreventiveConfig:
    """The authorization plugin (agent/runtime/authz.py): answers dockerd before it starts a container."""

    enabled: bool = False
    socket: Path = Path("/run/docker/plugins/imageguard.sock")
    #: ``POST /build`` (and BuildKit's /session, /grpc): RUN steps execute code from any base image
    allow_build: bool = False
    #: swarm init/join and services: the swarm executor starts task containers the plugin never sees
    allow_swarm: bool = False
    #: managed plugins that may be installed or enabled, by name ("vieux/sshfs" means ":latest" too)
    allow_plugins: tuple[str, ...] = ()


@dataclass(frozen=True)
class MetricsConfig:
    """The optional HTTP endpoint: ``/metrics`` (Prometheus text format) and ``/healthz``."""

    enabled: bool = False
    #: host:port; loopback by default, so that nothing is exposed unless the configuration says so
    listen: str = "127.0.0.1:9464"


@dataclass(frozen=True)
class ConsoleUser:
    name: str
    #: werkzeug's format (``scrypt:...``), made by ``imageguard console hash-password``
    password_hash: str


@dataclass(frozen=True)
class ConsoleToken:
    name: str
    #: hex SHA-256 of the token (``imageguard console new-token`` prints both); the token itself is never stored
    sha256: str


@dataclass(frozen=True)
class ConsoleServiceConfig:
    """``imageguard console serve``: the always-on fleet console (agent/console/serve.py)."""

    #: host:port of the dashboard and JSON API; loopback unless ``allow_remote``
    listen: str = "127.0.0.1:8480"
    allow_remote: bool = False
    #: SQLAlchemy URL; default ``sqlite:///<state dir>/console.db``; ``postgresql+psycopg://...`` for fleets
    database: str | None = None
    #: this replica's name: its MQTT client ids and its rollout leases (default: the host name)
    replica: str | None = None
    #: the MQTT shared-subscription group all replicas of one console join
    share_group: str = "imageguard-console"
    users: tuple[ConsoleUser, ...] = ()
    tokens: tuple[ConsoleToken, ...] = ()
    #: set when a TLS-terminating proxy is in front (the session cookie is then sent over HTTPS only)
    cookie_secure: bool = False
    request_timeout_seconds: float = 10.0
    #: how long a rollout wave waits for acknowledgements before the silent devices count as offline
    wave_timeout_seconds: float = 60.0


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: Literal["text", "json"] = "text"


@dataclass(frozen=True)
class RegistryConfig:
    host: str
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    ca_bundle: Path | None = None
    insecure: bool = False
    #: hosts that mirror this registry and may receive its credentials (only the configuration says so)
    mirrors: tuple[str, ...] = ()
    #: HTTP(S) proxy for this registry (default: HTTPS_PROXY / HTTP_PROXY / NO_PROXY from the environment)
    proxy: str | None = None

    def password(self) -> str | None:
        """Read the secret on use, never at load time, and never log it."""
        if self.password_file is not None:
            try:
                return self.password_file.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(
                    f"registry {self.host}: cannot read password_file {self.password_file}: {exc.strerror}"
                ) from None
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(
                    f"registry {self.host}: environment variable {self.password_env} is not set"
                )
            return value
        return None


@dataclass(frozen=True)
class MqttConfig:
    url: str
    account: str = "imageguard"
    username: str | None = None
    password_file: Path | None = None
    ca_bundle: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    keepalive_seconds: int = 30
    control_prefix: str = "$EDC"
    encoding: Literal["kura-protobuf", "json"] = "kura-protobuf"
    clean_session: bool = False
    outbox_limit: int = 10000
    #: how far a policy document arriving over MQTT may raise a layer's version at once
    max_version_step: int = 1_000_000
    max_payload_bytes: int = 256 * 1024
    policy_signing_key: Path | None = None
    #: without a policy_signing_key, policy changes over MQTT are refused unless this says otherwise
    allow_unsigned_policy: bool = False
    #: plaintext mqtt:// to a broker that is not on this host (credentials and policy readable on the wire)
    allow_plaintext: bool = False
    #: what an instance spec arriving over MQTT may ask for (see agent/core/instances.py REMOTE_GRANTS)
    remote_instances_allow: tuple[str, ...] = ()
    reconnect_min_seconds: float = 1.0
    reconnect_max_seconds: float = 60.0


@dataclass(frozen=True)
class Config:
    device: DeviceConfig
    engine: EngineConfig = field(default_factory=EngineConfig)
    state_dir: Path = DEFAULT_STATE_DIR
    enforcement: EnforcementConfig = field(default_factory=EnforcementConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    preventive: PreventiveConfig = field(default_factory=PreventiveConfig)
    registries: tuple[RegistryConfig, ...] = ()
    mqtt: MqttConfig | None = None
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    console: ConsoleServiceConfig = field(default_factory=ConsoleServiceConfig)
    source: str = "<embedded default>"

    def registry(self, host: str) -> RegistryConfig | None:
        return next((r for r in self.registries if r.host == host), None)

    @property
    def protected_paths(self) -> tuple[str, ...]:
        """Host paths no container may bind: the agent's state and the plugin socket's directory."""
        return (str(self.state_dir), str(self.preventive.socket.parent))


def is_loopback(host: str) -> bool:
    """Whether a host name or address (IPv6 with or without brackets) is this host's loopback."""
    host = host.strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _default_device_id() -> str:
    # the id becomes a topic level: Kura replaces / + # . with '-'
    name = socket.gethostname() or "imageguard"
    return "".join("-" if c in "/+#." or c.isspace() else c for c in name)


def _path(value: Any, base: Path) -> Path | None:
    if value is None:
        return None
    p = Path(value)
    return p if p.is_absolute() else base / p


def _engine(data: dict[str, Any]) -> EngineConfig:
    """As the docker CLI does: the configuration's url, else ``DOCKER_HOST``, else the default socket."""
    e = dict(data)
    if "url" not in e and os.environ.get("DOCKER_HOST"):
        e["url"] = os.environ["DOCKER_HOST"]
    return EngineConfig(**e)


def _preventive(data: dict[str, Any]) -> PreventiveConfig:
    p = dict(data)
    if "socket" in p:
        p["socket"] = Path(p["socket"])
    if "allow_plugins" in p:
        p["allow_plugins"] = tuple(p["allow_plugins"])
    return PreventiveConfig(**p)


def from_dict(data: dict[str, Any], source: str = "<dict>", base: Path | None = None) -> Config:
    """Build a :class:`Config` from parsed TOML; relative paths are resolved against ``base``."""
    try:
        validate(data, "config", f"configuration {source}")
    except SchemaError as exc:
        raise ConfigError(str(exc)) from None
    base = base or Path.cwd()
    dev = data.get("device", {})
    device = DeviceConfig(
        id=dev.get("id") or _default_device_id(),
        display_name=dev.get("display_name") or dev.get("id") or _default_device_id(),
        groups=tuple(dev.get("groups", ())),
    )
    mqtt = None
    if "mqtt" in data:
        m = dict(data["mqtt"])
        for key in ("password_file", "ca_bundle", "client_cert", "client_key", "policy_signing_key"):
            m[key] = _path(m.get(key), base)
        m["remote_instances_allow"] = tuple(m.get("remote_instances_allow", ()))
        mqtt = MqttConfig(**m)
        if mqtt.reconnect_max_seconds < mqtt.reconnect_min_seconds:
            raise ConfigError(
                f"configuration {source}: at /mqtt/reconnect_max_seconds: must be >= reconnect_min_seconds"
            )
    registries = []
    for r in data.get("registries", ()):
        r = dict(r)
        if "mirrors" in r:
            r["mirrors"] = tuple(r["mirrors"])
        for key in ("password_file", "ca_bundle"):
            r[key] = _path(r.get(key), base)
        registries.append(RegistryConfig(**r))
    hosts = [r.host for r in registries]
    if len(hosts) != len(set(hosts)):
        raise ConfigError(f"configuration {source}: at /registries: a host is listed twice")
    state_dir = _path(data.get("state", {}).get("dir"), base) or DEFAULT_STATE_DIR
    c = dict(data.get("console", {}))
    c["users"] = tuple(ConsoleUser(**u) for u in c.get("users", ()))
    c["tokens"] = tuple(ConsoleToken(**t) for t in c.get("tokens", ()))
    names = [u.name for u in c["users"]] + [t.name for t in c["tokens"]]
    if len(names) != len(set(names)):
        raise ConfigError(f"configuration {source}: at /console: a user or token name is listed twice")
    return Config(
        device=device,
        engine=_engine(data.get("engine", {})),
        state_dir=state_dir,
        enforcement=EnforcementConfig(
            **data.get("enforcement", {}), mode_configured="mode" in data.get("enforcement", {})
        ),
        logging=LoggingConfig(**data.get("logging", {})),
        preventive=_preventive(data.get("preventive", {})),
        registries=tuple(registries),
        mqtt=mqtt,
        metrics=MetricsConfig(**data.get("metrics", {})),
        console=ConsoleServiceConfig(**c),
        source=source,
    )


def load(path: Path | None) -> Config:
    """Load the config file. ``None`` means the default path if it exists, else the embedded default."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return from_dict({}, "<embedded default>")
        path = DEFAULT_CONFIG_PATH
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"configuration {path}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"configuration {path}: not valid TOML: {exc}") from None
    return from_dict(data, str(path), path.parent)
