"""Who may use the fleet console: sign-in, tokens, CSRF, the audit log, loopback by default. Against the
real ``console serve`` process and the real broker, attacking it the way a browser or a script on the
network would."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.agentproc import REPO
from tests.support.consolesvc import PASSWORD, USER, ConsoleService, console_toml
from tests.support.fixtures.mosquitto import MosquittoBroker
from tests.support.ports import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def service(tmp_path: Path, mosquitto: MosquittoBroker) -> Iterator[ConsoleService]:
    svc = ConsoleService(tmp_path, mosquitto).start()
    try:
        yield svc
    finally:
        svc.stop()


def test_nothing_without_sign_in_or_a_token(service: ConsoleService) -> None:
    for path in ("/api/fleet", "/api/devices", "/api/rollouts", "/api/audit", "/api/alerts"):
        r = service.api("GET", path, token=None)
        assert r.status_code == 401 and "sign in" in r.json()["error"], path
        assert service.api("GET", path, token="igc_guessed").status_code == 401, path
    r = requests.get(service.url + "/rollouts", allow_redirects=False, timeout=10)
    assert r.status_code == 302 and r.headers["Location"].startswith("/login")
    assert (
        service.api(
            "POST", "/api/rollouts", {"group": "g", "document": {"version": 1}}, token=None
        ).status_code
        == 401
    )
    # the health check alone is open, and says nothing secret
    health = requests.get(service.url + "/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["mqtt_connected"] is True
    # pages forbid framing and inline scripts
    page = requests.get(service.url + "/login", timeout=10)
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Frame-Options"] == "DENY"


def test_sign_in_csrf_and_audit(service: ConsoleService) -> None:
    bad = service.session(password="not the password")
    assert bad.page("/").url.endswith("/login?next=/?") or "/login" in bad.page("/").url
    s = service.session()
    overview = s.page("/")
    assert overview.status_code == 200 and "Fleet" in overview.text and USER in overview.text

    form = {"group": "g1", "document": '{"version": 1}', "waves": "100%", "start": "paused"}
    # a change without the CSRF token (a forged cross-site form) is refused and changes nothing
    forged = s.post_form("/rollouts", form, csrf=False)
    assert forged.status_code == 400 and "CSRF" in forged.text
    other = requests.Session()  # another browser's token does not fit this session either
    other_page = other.get(service.url + "/login", timeout=10).text
    stolen = re.search(r'name="csrf-token" content="([^"]+)"', other_page)
    assert stolen
    assert s.post_form("/rollouts", {**form, "csrf_token": stolen.group(1)}, csrf=False).status_code == 400
    assert service.get("/api/rollouts")["rollouts"] == []

    made = s.post_form("/rollouts", form)
    assert made.status_code == 302, made.text
    rid = made.headers["Location"].rsplit("/", 1)[-1]
    assert service.get(f"/api/rollouts/{rid}")["created_by"] == USER
    # the JSON API with the session cookie needs the token in a header
    assert s.http.post(f"{service.url}/api/rollouts/{rid}/abort", timeout=10).status_code == 400
    r = s.http.post(f"{service.url}/api/rollouts/{rid}/abort", headers={"X-CSRFToken": s.csrf}, timeout=10)
    assert r.status_code == 200, r.text

    log = service.get("/api/audit")["audit"]
    entries = [(e["user"], e["action"]) for e in log]
    assert (USER, "login") in entries and (USER, "login.failed") in entries
    assert (USER, "rollout.create") in entries and (USER, "rollout.abort") in entries
    assert s.post_form("/logout", {}).status_code == 302
    assert "/login" in s.page("/").url  # the session is gone


def test_failed_sign_ins_are_slowed_down(service: ConsoleService) -> None:
    s = service.session(password="wrong-1")
    for i in range(5):
        s.login(USER, f"wrong-{i}")
    r = s.login(USER, PASSWORD)  # even the right password waits now
    assert r.status_code == 401 and "too many failed sign-ins" in r.text


def _serve(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(config), "console", "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_it_refuses_to_start_open_or_exposed(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    port = free_port()
    no_users = console_toml(tmp_path / "a.toml", mosquitto, state=tmp_path / "a", port=port, users=False)
    no_users.write_text(re.sub(r"\[\[console.tokens\]\][^\[]*", "", no_users.read_text()))
    out = _serve(no_users)
    assert out.returncode == 2 and "never runs without sign-in" in out.stderr
    exposed = console_toml(tmp_path / "b.toml", mosquitto, state=tmp_path / "b", port=port)
    exposed.write_text(exposed.read_text().replace("127.0.0.1:", "0.0.0.0:"))
    out = _serve(exposed)
    assert out.returncode == 2 and "allow_remote" in out.stderr
    bad_hash = console_toml(tmp_path / "c.toml", mosquitto, state=tmp_path / "c", port=port)
    bad_hash.write_text(bad_hash.read_text().replace('password_hash = "scrypt:', 'password_hash = "plain:'))
    out = _serve(bad_hash)
    assert out.returncode == 2 and "password_hash" in out.stderr
