"""Issue 6 on a real dockerd: the agent as its authorization plugin (preventive enforcement).

The module starts its own dockerd with ``--authorization-plugin=<unique name>`` and a plugin spec file in
/etc/docker/plugins pointing at this run's socket, and the real agent in this process (so a test can make
its verifier slow). Images are tiny busybox images; signed ones are pushed to a loopback registry and signed
with ``imageguard sign``.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket as socket_mod
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from agent import config as config_mod
from agent.app import Agent
from agent.core.decision import VerificationOutcome, VerifyTarget
from agent.core.digest import Digest
from agent.core.policy import EffectivePolicy
from agent.core.schemas import validate
from agent.errors import Code
from agent.runtime.enforcer import Verifier
from agent.runtime.verification import build_verifier
from tests.support.agentproc import cli, wait_for
from tests.support.dockerd import Dockerd
from tests.support.fixtures.registry import RegistryServer
from tests.support.signing import generate_keys, registry_entry, repo_digest, write_agent_config

pytestmark = pytest.mark.integration

PLUGIN_SPEC_DIR = Path("/etc/docker/plugins")
NEVER_STARTED = "0001-01-01T00:00:00Z"
VERIFY_TIMEOUT = 1.0
ALLOWED = "ig-az/allowed:1"
OTHER = "ig-az/other:1"
WRITER = "ig-az/writer:1"  # its entrypoint writes a new file into /out


class SwitchableVerifier:
    """The agent's real verifier, made slow on demand (the "plugin answering slowly" case)."""

    def __init__(self) -> None:
        self.inner: Verifier | None = None
        self.delay = 0.0

    def verify(self, targets: tuple[VerifyTarget, ...], timeout: float) -> VerificationOutcome:
        if self.delay:
            time.sleep(self.delay)
        if self.inner is None:
            return VerificationOutcome(None, Code.VERIFICATION_ERROR, "no verifier")
        return self.inner.verify(targets, timeout)


@dataclass
class Env:
    root: Path
    name: str
    config: Path
    engine: Dockerd
    registry: RegistryServer
    verifier: SwitchableVerifier = field(default_factory=SwitchableVerifier)
    agent: Agent | None = None
    images: dict[str, str] = field(default_factory=dict)

    @property
    def socket(self) -> Path:
        return self.root / "plugins" / "plugin.sock"  # its directory is protected: nothing else in it

    def image(self, name: str) -> str:
        return f"{self.registry.host}/ig-az/{name}:1"

    def start_agent(self) -> None:
        cfg = config_mod.load(self.config)
        if self.verifier.inner is None:
            self.verifier.inner = build_verifier(cfg)
        self.agent = Agent(cfg, verifier=self.verifier)
        self.agent.start()

    def stop_agent(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = None

    @property
    def policy(self) -> EffectivePolicy:
        assert self.agent is not None and self.agent.enforcer is not None
        return self.agent.enforcer.policy

    def wait_policy(self, predicate: Callable[[EffectivePolicy], bool], what: str) -> None:
        wait_for(lambda: predicate(self.policy), timeout=10, what=what)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.engine.docker("run", *args, check=False)

    def decisions(self) -> list[dict[str, Any]]:
        out = cli(self.config, "decisions", "--limit", "1000", "--json", check=True)
        records: list[dict[str, Any]] = json.loads(out.stdout)["decisions"]
        for record in records:
            validate(record, "decision", "decision record")
        return records

    def state(self, name: str, fmt: str = "{{.State.Status}}") -> str:
        out = self.engine.docker("inspect", "--format", fmt, name, check=False)
        return out.stdout.strip() if out.returncode == 0 else "absent"


@pytest.fixture(scope="module")
def env(registry_plain: RegistryServer) -> Iterator[Env]:
    root = Path(tempfile.mkdtemp(prefix="ig-az-", dir="/tmp"))  # short: socket paths are limited
    # mkdtemp's suffix may hold "_", which a plugin reference may not end with or follow a "-" with
    name = f"imageguard-test-{root.name.removeprefix('ig-az-').replace('_', 'x')}"
    PLUGIN_SPEC_DIR.mkdir(parents=True, exist_ok=True)
    spec = PLUGIN_SPEC_DIR / f"{name}.spec"
    spec.write_text(f"unix://{root / 'plugins' / 'plugin.sock'}\n")
    engine = Dockerd(root / "d", extra_args=[f"--authorization-plugin={name}"])
    config = write_agent_config(
        root / "config.toml",
        {
            "device": {"id": "authz-test"},
            "engine": {"url": engine.url},
            "state": {"dir": str(root / "state")},
            "enforcement": {"stop_grace_seconds": 0, "verify_timeout_seconds": VERIFY_TIMEOUT},
            # builds are refused by default; this module builds its test images on the engine
            "preventive": {
                "enabled": True,
                "socket": str(root / "plugins" / "plugin.sock"),
                "allow_build": True,
            },
        },
        [registry_entry(registry_plain)],
    )
    e = Env(root, name, config, engine, registry_plain)
    try:
        e.start_agent()  # the plugin socket must exist before dockerd starts
        engine.start()
        _prepare_images(e)
        yield e
    finally:
        try:
            if e.agent is None:
                e.start_agent()  # dockerd needs its plugin to clean up
            engine.remove_all_containers()
        finally:
            engine.stop()
            e.stop_agent()
            spec.unlink(missing_ok=True)
            subprocess.run(["rm", "-rf", str(root)], check=False)


def _prepare_images(e: Env) -> None:
    eng = e.engine
    e.images[ALLOWED] = eng.build_image(ALLOWED, "authz-allowed")
    e.images[OTHER] = eng.build_image(OTHER, "authz-other")
    e.images[WRITER] = eng.build_image(WRITER, "authz-writer", ["/bin/busybox", "mktemp", "/out/ran.XXXXXX"])
    for name in ("signed", "unsigned", "slow", "renamed"):
        tag = e.image(name)
        eng.build_image(tag, f"authz-{name}")
        eng.docker("push", "-q", tag)
    key, pub, pw = generate_keys(e.config, e.root / "cosign", "authz test")
    for name in ("signed", "slow", "renamed"):
        cli(
            e.config,
            "sign",
            e.image(name),
            "--key",
            str(key),
            "--passphrase-file",
            str(pw),
            check=True,
        )
    scope = f"{e.registry.host}/ig-az/*"
    cli(e.config, "anchors", "add", "acme", "--key", str(pub), "--scope", scope, check=True)
    cli(e.config, "allowlist", "add", e.images[ALLOWED], check=True)
    allowed = Digest.parse(e.images[ALLOWED])
    e.wait_policy(lambda p: allowed in p.allowlist and p.anchor("acme") is not None, "allowlist and anchor")


@pytest.fixture(autouse=True)
def clean(env: Env) -> Iterator[None]:
    env.engine.remove_all_containers()
    yield
    if env.agent is not None:
        env.engine.remove_all_containers()


def by_name(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(r["container"]["name"], []).append(r)
    return out


def create_past_the_create_check(env: Env, name: str, image: str, **host: Any) -> str:
    """Create a container whose create the plugin cannot judge: dockerd forwards no request body over 1 MiB
    to an authorization plugin, so only its start is judged (as for a container created before a policy
    change). Tests of the start path need such containers; the plugin refuses other disallowed creates."""
    api = docker.APIClient(base_url=env.engine.url, version="auto", timeout=60)
    try:
        config = api.create_host_config(**host) if host else None
        created = api.create_container(image, name=name, labels={"pad": "x" * (1 << 20)}, host_config=config)
        return str(created["Id"])
    finally:
        api.close()


# -- prevention ------------------------------------------------------------------------------------------


def test_unlisted_image_never_executes(env: Env) -> None:
    out = env.root / "out"
    out.mkdir(mode=0o777, exist_ok=True)
    names = [f"writer-{i}" for i in range(100)]
    for name in names:
        r = env.run("--name", name, "-v", f"{out}:/out", WRITER)
        assert r.returncode != 0, r.stdout
        assert (
            f"authorization denied by plugin {env.name}: ImageGuard: image {WRITER} is not allowed"
            in r.stderr
        )
        assert "not-allowlisted" in r.stderr
    assert list(out.iterdir()) == []
    assert all(env.state(n) == "absent" for n in names)  # refused at create: nothing left behind
    records = [r for r in env.decisions() if r["container"]["name"].startswith("writer-")]
    assert len(records) == 100
    assert {(r["trigger"], r["verdict"], r["action"], r["reason"]) for r in records} == {
        ("prevented", "blocked", "deny", "not-allowlisted")
    }
    # control: the same image, once allowed, does write its file (so the empty directory above means something)
    cli(env.config, "allowlist", "add", env.images[WRITER], check=True)
    writer = Digest.parse(env.images[WRITER])
    try:
        env.wait_policy(lambda p: writer in p.allowlist, "writer allowlisted")
        r = env.run("--name", "writer-allowed", "-v", f"{out}:/out", WRITER)
        assert r.returncode == 0, r.stderr
        assert len(list(out.iterdir())) == 1
    finally:
        cli(env.config, "allowlist", "remove", env.images[WRITER], check=True)
        env.wait_policy(lambda p: writer not in p.allowlist, "writer withdrawn")


def raw_request(socket_path: Path, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request on the engine's socket with the request target exactly as given."""
    with socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(socket_path))
        head = f"{method} {target} HTTP/1.1\r\nHost: docker\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        s.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize(
    "target",
    [
        "http://docker/v1.41/containers/{name}/start",
        "https://evil.example:1/containers/{name}/start",
        "unix://x/v1.41/containers/{name}/restart",
        "/v1.41/containers/{name}/start",
        "/v1.41/containers/{name}%2Fstart",
        "//v1.41/containers/{name}/start",
    ],
)
def test_raw_start_in_any_request_form_never_executes(env: Env, target: str) -> None:
    out = env.root / "out-raw"
    out.mkdir(mode=0o777, exist_ok=True)
    name = "raw-writer"
    create_past_the_create_check(env, name, WRITER, binds=[f"{out}:/out"])
    status, body = raw_request(env.engine.socket, "POST", target.format(name=name))
    assert list(out.iterdir()) == []
    assert env.state(name, "{{.State.StartedAt}}") == NEVER_STARTED
    if status == 301:  # dockerd's router redirects an uncleaned path: nothing was started
        return
    assert status == 403 and b"ImageGuard" in body, (status, body)
    assert any(
        r["container"]["name"] == name and r["trigger"] == "prevented" and r["verdict"] == "blocked"
        for r in env.decisions()
    )


def test_unclassifiable_state_changing_request_is_refused(env: Env) -> None:
    status, body = raw_request(env.engine.socket, "POST", "/v1.41/containers/x%zz/start")
    assert status in (400, 403), body  # Go's server may refuse the broken escape before the plugin sees it
    # dockerd answers routes it does not have itself (404); the plugin's refusal of targets it cannot
    # classify guards routes a newer dockerd may add (tests/unit/core/test_api.py)
    status, body = raw_request(env.engine.socket, "POST", "/v1.41/no-such-route")
    assert status == 404, body
    status, _ = raw_request(env.engine.socket, "GET", "/v1.41/containers/json")
    assert status == 200  # reads pass


def test_exec_into_and_copy_into_a_blocked_container_are_refused(env: Env) -> None:
    # exec is judged on the container: an allowed running one passes, a blocked one cannot be written into
    env.engine.docker("run", "-d", "--name", "ok-exec", ALLOWED)
    assert env.engine.docker("exec", "ok-exec", "/bin/busybox", "true", check=False).returncode == 0
    create_past_the_create_check(env, "blocked-cp", OTHER)
    src = env.root / "planted"
    src.write_text("#!/bin/busybox sh\n")
    r = env.engine.docker("cp", str(src), "blocked-cp:/planted", check=False)
    assert r.returncode != 0 and "ImageGuard" in r.stderr, r.stderr


def test_plugins_swarm_and_builds_follow_the_switches(env: Env) -> None:
    status, body = raw_request(
        env.engine.socket, "POST", "/v1.41/plugins/pull?remote=evil/p&name=imageguard", b"[]"
    )
    assert status == 403 and b"managed plugin 'imageguard' is not allowed" in body, body
    status, body = raw_request(env.engine.socket, "POST", "http://docker/v1.41/plugins/create?name=evil")
    assert status == 403 and b"not allowed" in body, body
    r = env.engine.docker("swarm", "init", "--advertise-addr", "127.0.0.1", check=False)
    assert r.returncode != 0 and "swarm operations are refused" in r.stderr, r.stderr
    r = env.engine.docker("service", "create", "--name", "s", ALLOWED, check=False)
    assert r.returncode != 0, r.stdout
    # builds: allowed by this module's configuration; refused once the switch is off
    cfg = env.config.read_text()
    env.stop_agent()
    env.config.write_text(cfg.replace("allow_build = true", "allow_build = false"))
    try:
        env.start_agent()
        with pytest.raises(RuntimeError, match="image builds are refused"):
            env.engine.build_image("ig-az/built:1", "never")
    finally:
        env.stop_agent()
        env.config.write_text(cfg)
        env.start_agent()


def test_refused_run_leaves_no_container_behind(env: Env) -> None:
    for _ in range(2):  # the retry gets the same answer, not a name conflict
        r = env.run("--name", "refused", OTHER)
        assert r.returncode != 0 and "ImageGuard: image ig-az/other:1 is not allowed" in r.stderr, r.stderr
        assert env.state("refused") == "absent"
    assert any(
        d["container"]["name"] == "refused" and d["trigger"] == "prevented" and d["action"] == "deny"
        for d in env.decisions()
    )


def set_runtime_rules(env: Env, rules: list[dict[str, Any]]) -> None:
    doc = json.loads(cli(env.config, "policy", "export", check=True).stdout)
    doc["version"] += 1
    doc["runtime"] = rules
    path = env.root / "policy-runtime.json"
    path.write_text(json.dumps(doc))
    cli(env.config, "policy", "import", str(path), check=True)
    env.wait_policy(lambda p: len(p.runtime) == len(rules), "runtime rules in force")


def test_runtime_constraints_refuse_an_allowed_image_started_unsafely(env: Env) -> None:
    out = env.root / "out-rt"
    out.mkdir(mode=0o777, exist_ok=True)
    # the agent protects itself with no rule at all: its state directory cannot be bound
    r = env.run("--name", "grab-state", "-v", f"{env.root / 'state'}:/s", WRITER)
    assert r.returncode != 0 and "agent-protection" in r.stderr, r.stderr
    r = env.run("--name", "grab-parent", "-v", f"{env.root / 'plugins'}:/s", WRITER)
    assert r.returncode != 0 and "agent-protection" in r.stderr, r.stderr
    cli(env.config, "allowlist", "add", env.images[WRITER], check=True)
    writer = Digest.parse(env.images[WRITER])
    env.wait_policy(lambda p: writer in p.allowlist, "writer allowlisted")
    try:
        set_runtime_rules(
            env,
            [
                {
                    "scope": ["**"],
                    "privileged": False,
                    "host_namespaces": [],
                    "command_override": False,
                    "deny_binds": ["/etc"],
                }
            ],
        )
        attempts = {
            "priv": ["--privileged"],
            "hostpid": ["--pid", "host"],
            "etc": ["-v", "/etc:/host-etc:ro"],
            "override": ["--entrypoint", "/bin/busybox"],
        }
        for name, opts in attempts.items():
            args = ["--name", f"rt-{name}", "-v", f"{out}:/out", *opts, WRITER]
            if name == "override":
                args += ["mktemp", "/out/override.XXXXXX"]
            r = env.run(*args)
            assert r.returncode != 0 and "runtime constraint" in r.stderr, (name, r.stderr)
            assert env.state(f"rt-{name}") == "absent", name  # refused at create: nothing left behind
        assert list(out.iterdir()) == []  # no entrypoint ran
        r = env.run("--name", "rt-plain", "-v", f"{out}:/out", WRITER)
        assert r.returncode == 0, r.stderr  # the same image, started plainly, runs
        assert len(list(out.iterdir())) == 1
        reasons = {
            d["container"]["name"]: d["reason"]
            for d in env.decisions()
            if d["container"]["name"].startswith("rt-")
        }
        assert reasons["rt-priv"] == "runtime-constraint" and reasons["rt-plain"] == "allowlisted"
    finally:
        set_runtime_rules(env, [])
        cli(env.config, "allowlist", "remove", env.images[WRITER], check=True)
        env.wait_policy(lambda p: writer not in p.allowlist, "writer withdrawn")


def test_a_start_after_a_judged_create_needs_no_engine_lookup(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """dockerd shows the plugin the create's response: the container is looked up before its start arrives."""
    caplog.set_level(logging.DEBUG, logger="agent.runtime.enforcer")
    cid = env.engine.docker("run", "-d", "--name", "quick", ALLOWED).stdout.strip()
    assert env.state("quick") == "running"
    assert any(
        "decided on the facts fetched after its create" in r.getMessage() and cid[:12] in r.getMessage()
        for r in caplog.records
    )


def test_allowed_and_signed_images_run(env: Env) -> None:
    env.engine.docker("run", "-d", "--name", "ok", ALLOWED)
    env.engine.docker("run", "-d", "--name", "signed", env.image("signed"))
    assert env.state("ok") == "running" and env.state("signed") == "running"
    r = env.run("-d", "--name", "unsigned", env.image("unsigned"))
    assert r.returncode != 0 and "authorization denied by plugin" in r.stderr
    assert env.state("unsigned", "{{.State.StartedAt}}") == NEVER_STARTED
    records = by_name(env.decisions())
    first = {
        n: next(r for r in records[n] if r["trigger"] == "prevented") for n in ("ok", "signed", "unsigned")
    }
    assert (first["ok"]["verdict"], first["ok"]["reason"]) == ("allowed", "allowlisted")
    assert (first["signed"]["verdict"], first["signed"]["reason"]) == ("allowed", "signature-verified")
    assert first["signed"]["anchor"] == "acme"
    assert first["unsigned"]["verdict"] == "blocked" and first["unsigned"]["action"] == "deny"
    assert first["unsigned"]["reason"] in r.stderr


def test_concurrent_starts(env: Env) -> None:
    """Each start is decided while dockerd asks about the agent's own lookups on other connections."""
    api = docker.APIClient(base_url=env.engine.url, version="auto", timeout=60)
    try:
        ids = [api.create_container(ALLOWED, name=f"par-{i}")["Id"] for i in range(12)]
        bad = [create_past_the_create_check(env, f"par-bad-{i}", OTHER) for i in range(4)]
        errors: list[str] = []

        def start(cid: str) -> None:
            try:
                api.start(cid)
            except docker.errors.APIError as exc:
                errors.append(str(exc))

        threads = [threading.Thread(target=start, args=(c,)) for c in ids + bad]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(errors) == len(bad) and all("not-allowlisted" in e for e in errors)
        assert all(api.inspect_container(c)["State"]["Running"] for c in ids)
        assert not any(api.inspect_container(c)["State"]["StartedAt"] != NEVER_STARTED for c in bad)
    finally:
        api.close()


def test_slow_verification_is_denied_at_the_timeout(env: Env) -> None:
    env.verifier.delay = VERIFY_TIMEOUT + 2
    try:
        t0 = time.monotonic()
        r = env.run("-d", "--name", "slow", env.image("slow"))
        waited = time.monotonic() - t0
    finally:
        env.verifier.delay = 0
    assert r.returncode != 0
    assert "authorization denied by plugin" in r.stderr and "verification-timeout" in r.stderr
    assert VERIFICATION_WINDOW[0] <= waited < VERIFICATION_WINDOW[1], waited
    assert env.state("slow", "{{.State.StartedAt}}") == NEVER_STARTED
    # the verification ran on in the background; once it has succeeded, the next start is allowed at once
    slow = repo_digest(env.engine, env.image("slow"))
    assert env.agent is not None
    wait_for(lambda: slow in env.agent.store.verified(), timeout=15, what="background verification")  # type: ignore[union-attr]
    env.agent.enforcer.reload_verified()  # type: ignore[union-attr]
    env.engine.docker("start", "slow")
    assert env.state("slow") == "running"
    reasons = [
        (r["verdict"], r["reason"]) for r in by_name(env.decisions())["slow"] if r["trigger"] == "prevented"
    ]
    assert reasons == [("allowed", "verified-before"), ("blocked", "verification-timeout")]  # newest first


VERIFICATION_WINDOW = (VERIFY_TIMEOUT, VERIFY_TIMEOUT + 1.5)


def test_no_rename_or_removal_while_a_start_is_decided(env: Env) -> None:
    """The decision is bound to the container dockerd starts: the name cannot be moved to another one."""
    env.engine.docker("create", "--name", "judged", env.image("renamed"))
    create_past_the_create_check(env, "impostor", OTHER)
    env.verifier.delay = VERIFY_TIMEOUT * 0.6  # a signature check in progress: the start is pending
    results: dict[str, subprocess.CompletedProcess[str]] = {}
    starter = threading.Thread(
        target=lambda: results.update(start=env.engine.docker("start", "judged", check=False))
    )
    try:
        starter.start()
        time.sleep(VERIFY_TIMEOUT * 0.2)
        moved = env.engine.docker("rename", "judged", "elsewhere", check=False)
        removed = env.engine.docker("rm", "-f", "judged", check=False)
        starter.join(timeout=30)
    finally:
        env.verifier.delay = 0
    assert moved.returncode != 0 and "a start of" in moved.stderr and "rename" in moved.stderr, moved.stderr
    assert removed.returncode != 0 and "removal" in removed.stderr, removed.stderr
    assert results["start"].returncode == 0, results["start"].stderr
    assert env.state("judged") == "running" and env.state("impostor", "{{.State.StartedAt}}") == NEVER_STARTED
    # once dockerd has started it, renames are free again
    assert env.engine.docker("rename", "impostor", "impostor-2", check=False).returncode == 0


# -- modes and the second line ---------------------------------------------------------------------------


def test_audit_mode_lets_starts_through_and_enforce_removes_them(env: Env) -> None:
    cli(env.config, "enforcement", "--mode", "audit", check=True)
    try:
        env.wait_policy(lambda p: p.enforcement.mode == "audit", "audit mode")
        env.engine.docker("run", "-d", "--name", "audited", OTHER)
        assert env.state("audited") == "running"
        wait_for(lambda: "audited" in by_name(env.decisions()), 10, what="audit record")
        assert by_name(env.decisions())["audited"][0]["verdict"] == "would-block"
    finally:
        cli(env.config, "enforcement", "--mode", "enforce", check=True)
    env.wait_policy(lambda p: p.enforcement.mode == "enforce", "enforce mode")
    wait_for(lambda: env.state("audited") == "absent", 15, what="rescan removes the audited container")
    r = env.run("-d", "--name", "again", OTHER)
    assert r.returncode != 0 and "not-allowlisted" in r.stderr


def test_container_started_while_the_plugin_was_off_is_removed(env: Env) -> None:
    """dockerd restarts a --restart=always container by itself, asking no plugin: the monitor catches it."""
    eng = env.engine
    eng.stop()
    env.stop_agent()
    plugin_args = eng.extra_args
    eng.extra_args = []
    try:
        eng.start()
        eng.docker("run", "-d", "--restart=always", "--stop-timeout=1", "--name", "slipped", OTHER)
        eng.stop()
    finally:
        eng.extra_args = plugin_args
    env.start_agent()
    eng.start()
    wait_for(lambda: env.state("slipped") == "absent", 30, what="the monitor removes the slipped container")
    record = by_name(env.decisions())["slipped"][0]
    assert record["verdict"] == "blocked" and record["action"] == "remove"
    assert record["trigger"] in ("start", "scan")


# -- set-up: doctor, the agent stopped, dockerd without its plugin ---------------------------------------


def doctor(env: Env) -> tuple[int, dict[str, dict[str, Any]]]:
    out = cli(env.config, "doctor", "--json", timeout=60)
    doc = json.loads(out.stdout)
    return out.returncode, {c["name"]: c for c in doc["checks"]}


def test_doctor_reports_a_healthy_setup(env: Env) -> None:
    code, checks = doctor(env)
    assert code == 0, checks
    assert checks["engine"]["status"] == "ok"
    assert checks["plugin socket"]["status"] == "ok"
    assert checks["plugin wiring"]["status"] == "ok" and env.name in checks["plugin wiring"]["detail"]
    assert checks["state directory"]["status"] == "ok"
    assert checks["broker"]["status"] == "skip"
    assert checks["clock"]["status"] == "ok"
    assert checks["plugin slot"]["status"] == "ok"


def restarted_with(env: Env, preventive_line: str) -> None:
    """Restart the agent with one more line in its [preventive] section (the original comes back after)."""
    cfg = env.config.read_text()
    env.stop_agent()
    env.config.write_text(cfg.replace("[preventive]\n", f"[preventive]\n{preventive_line}\n"))
    env.start_agent()
    env.config.write_text(cfg)  # the file is read at start only


def test_swarm_services_are_refused_even_on_a_swarm_manager(env: Env) -> None:
    """A swarm's tasks are started by the daemon itself, with no request the plugin sees: refuse services."""
    restarted_with(env, "allow_swarm = true")  # the device owner made this engine a swarm manager
    try:
        env.engine.docker("swarm", "init", "--advertise-addr", "127.0.0.1", timeout=120)
        env.stop_agent()
        env.start_agent()  # swarm switched off again
        r = env.engine.docker("service", "create", "--name", "evil-svc", OTHER, check=False, timeout=120)
        assert r.returncode != 0 and "swarm operations are refused" in r.stderr, r.stderr
        services = env.engine.docker("service", "ls", "--format", "{{.Name}}", check=False).stdout.split()
        assert "evil-svc" not in services
    finally:
        restarted_with(env, "allow_swarm = true")
        env.engine.docker("swarm", "leave", "--force", check=False, timeout=120)
        env.stop_agent()
        env.start_agent()


def plugin_dir(root: Path) -> Path:
    """A managed plugin's bundle: a root filesystem with busybox and a config that claims the authz interface."""
    bundle = root / "evil-plugin"
    (bundle / "rootfs").mkdir(parents=True, exist_ok=True)
    shutil.copy(
        "/usr/bin/busybox" if Path("/usr/bin/busybox").exists() else "/bin/busybox",
        bundle / "rootfs" / "busybox",
    )
    config = {
        "Description": "an authorization plugin that allows everything",
        "Documentation": "none",
        "Entrypoint": ["/busybox", "sleep", "3600"],
        "Interface": {"Socket": "evil.sock", "Types": ["docker.authz/1.0"]},
        "Network": {"Type": "host"},
    }
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def test_a_plugin_taking_the_slot_is_refused_and_if_let_in_reported(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    bundle = plugin_dir(env.root)
    r = env.engine.docker("plugin", "create", env.name, str(bundle), check=False)
    assert r.returncode != 0 and "is not allowed" in r.stderr, r.stderr  # preventive mode refuses it
    # let in (as if installed while the plugin was not configured): the agent and doctor say so
    cfg = env.config.read_text()
    env.stop_agent()
    env.config.write_text(cfg.replace("[preventive]\n", f'[preventive]\nallow_plugins = ["{env.name}"]\n'))
    try:
        env.start_agent()
        caplog.clear()
        env.engine.docker("plugin", "create", env.name, str(bundle))
        wait_for(
            lambda: any(
                "carries the name of ImageGuard's authorization plugin" in r.getMessage()
                for r in caplog.records
            ),
            15,
            what="the agent's alarm on the plugin event",
        )
        code, checks = doctor(env)
        assert code != 0 and checks["plugin slot"]["status"] == "fail", checks["plugin slot"]
        assert env.name in checks["plugin slot"]["detail"]
        # without the permission, enabling it is refused too
        env.stop_agent()
        env.config.write_text(cfg)
        env.start_agent()
        r = env.engine.docker("plugin", "enable", env.name, check=False)
        assert r.returncode != 0 and "is not allowed" in r.stderr, r.stderr
    finally:
        env.stop_agent()
        env.config.write_text(
            cfg.replace("[preventive]\n", f'[preventive]\nallow_plugins = ["{env.name}"]\n')
        )
        env.start_agent()
        env.engine.docker("plugin", "rm", "-f", env.name, check=False)
        env.stop_agent()
        env.config.write_text(cfg)
        env.start_agent()


def test_agent_stopped(env: Env) -> None:
    """dockerd holds each request while it retries the plugin (about 15 s), then refuses it."""
    env.stop_agent()
    api = docker.APIClient(base_url=env.engine.url, version="1.41", timeout=90)
    try:
        assert not env.socket.exists()
        t0 = time.monotonic()
        with pytest.raises(docker.errors.APIError) as refused:
            api.containers(all=True)
        held = time.monotonic() - t0
        assert f"plugin {env.name} failed with error" in str(refused.value)
        assert held > 5, held
        code, checks = doctor(env)
        assert code == 1
        assert (
            checks["plugin socket"]["status"] == "fail"
            and "does not exist" in checks["plugin socket"]["detail"]
        )
        assert checks["engine"]["status"] == "fail" and "refuses it" in checks["engine"]["hint"]
        wiring = checks["plugin wiring"]
        assert (
            wiring["status"] == "ok" and "command line" in wiring["detail"] and env.name in wiring["detail"]
        )
    finally:
        env.start_agent()
    t0 = time.monotonic()
    try:
        api.containers(all=True)  # back at once: dockerd reconnects to the plugin on the next request
    finally:
        api.close()
    assert time.monotonic() - t0 < 5


def test_dockerd_will_not_start_without_its_plugin() -> None:
    root = Path(tempfile.mkdtemp(prefix="ig-az-", dir="/tmp"))
    name = f"imageguard-absent-{root.name.removeprefix('ig-az-')}"
    spec = PLUGIN_SPEC_DIR / f"{name}.spec"
    PLUGIN_SPEC_DIR.mkdir(parents=True, exist_ok=True)
    spec.write_text(f"unix://{root / 'nobody.sock'}\n")
    d = Dockerd(root / "d", extra_args=[f"--authorization-plugin={name}"])
    try:
        t0 = time.monotonic()
        with pytest.raises((RuntimeError, subprocess.TimeoutExpired)):
            d.start(timeout=60)
        assert d.proc is not None
        assert d.proc.wait(timeout=60) != 0
        assert time.monotonic() - t0 > 5  # it retried the plugin before giving up
        log = (root / "d" / "dockerd.log").read_text()
        assert "failed to validate authorization plugin" in log
    finally:
        d.stop()
        spec.unlink(missing_ok=True)
        _unmount_under(root)  # a dockerd that died in start-up leaves its data root bind-mounted
        shutil.rmtree(root, ignore_errors=True)
    assert not root.exists()


def _unmount_under(root: Path) -> None:
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(f"{root}/")), key=len, reverse=True):
        subprocess.run(["umount", mount], check=False, capture_output=True)
