"""The fleet console service (``imageguard console serve``) as a separate process, the way operators run it,
and an HTTP client for its JSON API (bearer token) and its pages (signed-in session with CSRF token)."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from werkzeug.security import generate_password_hash

from tests.support.agentproc import REPO, wait_for
from tests.support.cloud import ACCOUNT
from tests.support.fixtures.mosquitto import MosquittoBroker
from tests.support.ports import free_port

USER, PASSWORD = "alice", "correct horse battery staple"
TOKEN = "igc_test-token-for-the-console-api-0123456789"
# hashed once per test session: scrypt is slow on purpose
_HASH = generate_password_hash(PASSWORD, method="scrypt")


def console_toml(
    path: Path,
    broker: MosquittoBroker,
    *,
    state: Path,
    port: int,
    replica: str = "r1",
    database: str | None = None,
    extra: str = "",
    users: bool = True,
    account: str = ACCOUNT,
) -> Path:
    db = f'database = "{database}"\n' if database else ""
    user_block = f'[[console.users]]\nname = "{USER}"\npassword_hash = "{_HASH}"\n' if users else ""
    path.write_text(
        f"""[device]
id = "console-1"
[state]
dir = "{state}"
[mqtt]
url = "{broker.url}"
account = "{account}"
[console]
listen = "127.0.0.1:{port}"
replica = "{replica}"
wave_timeout_seconds = 20
request_timeout_seconds = 10
{db}{extra}
{user_block}
[[console.tokens]]
name = "ci"
sha256 = "{hashlib.sha256(TOKEN.encode()).hexdigest()}"
"""
    )
    return path


@dataclass
class ConsoleService:
    tmp: Path
    broker: MosquittoBroker
    replica: str = "r1"
    database: str | None = None
    extra: str = ""
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.dir = self.tmp / f"console-{self.replica}"
        self.dir.mkdir(exist_ok=True)
        self.config = console_toml(
            self.dir / "console.toml",
            self.broker,
            state=self.dir / "state",
            port=self.port,
            replica=self.replica,
            database=self.database,
            extra=self.extra,
        )
        self.log_path = self.dir / "serve.log"
        self._offset = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ConsoleService:
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "--config", str(self.config), "console", "serve"],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={"PYTHONUNBUFFERED": "1", **_env()},
            )
        wait_for(self._serving, 60, what=f"console {self.replica} serving")
        return self

    def _serving(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"console serve exited with {self.proc.returncode}:\n{self.log()}")
        return "serving http://" in self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[self._offset :]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.proc = None

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    # --- the JSON API with the token ---------------------------------------------------------

    def api(
        self, method: str, path: str, body: Any = None, *, token: str | None = TOKEN
    ) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.request(method, self.url + path, json=body, headers=headers, timeout=30)

    def get(self, path: str) -> Any:
        r = self.api("GET", path)
        assert r.status_code == 200, (r.status_code, r.text)
        return r.json()

    def session(self, password: str = PASSWORD) -> Browserless:
        s = Browserless(self.url)
        s.login(USER, password)
        return s


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


class Browserless:
    """A signed-in session as a browser has it (cookie + CSRF token from the page), without a browser."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = requests.Session()
        self.csrf = ""

    def page(self, path: str) -> requests.Response:
        r = self.http.get(self.url + path, timeout=30)
        m = re.search(r'name="csrf-token" content="([^"]+)"', r.text)
        if m:
            self.csrf = m.group(1)
        return r

    def login(self, user: str, password: str) -> requests.Response:
        self.page("/login")
        return self.http.post(
            self.url + "/login",
            data={"username": user, "password": password, "csrf_token": self.csrf},
            timeout=30,
        )

    def post_form(self, path: str, data: dict[str, str], *, csrf: bool = True) -> requests.Response:
        if csrf:
            data = {**data, "csrf_token": self.csrf}
        return self.http.post(self.url + path, data=data, timeout=60, allow_redirects=False)


def json_body(r: requests.Response) -> Any:
    try:
        return r.json()
    except json.JSONDecodeError:
        raise AssertionError(f"not JSON ({r.status_code}): {r.text[:500]}") from None
