"""Every dashboard page and API document renders from a populated database (Flask's test client over a real
SQLite store; no broker: nothing here asks a device). The HTTP behaviour against the real service process
is in tests/integration/test_console_access.py and test_console_browser.py."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, cast

import pytest
from flask.testing import FlaskClient

from agent.config import ConsoleServiceConfig, ConsoleToken
from agent.console.fleetdb import FleetStore, Stored
from agent.console.orchestrator import Orchestrator
from agent.console.requester import Requester
from agent.console.web import WebContext, create_app
from agent.errors import BrokerError

TOKEN = "igc_unit"


class Unreachable:
    """No broker in a unit test: asking a device fails as it does when the broker is away."""

    def request(self, *_a: Any, **_k: Any) -> Any:
        raise BrokerError("no broker in this test")

    def ask(self, *_a: Any, **_k: Any) -> Any:
        raise BrokerError("no broker in this test")


AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(tmp_path: Path) -> FlaskClient:
    store = FleetStore(f"sqlite:///{tmp_path / 'c.db'}")
    store.migrate()
    now = time.time()
    store.store_messages(
        [
            Stored(
                "h:b1",
                "gw-1",
                "BIRTH",
                1,
                None,
                {"imageguard_groups": "plant", "imageguard_policy_layers": "group:plant=2"},
            ),
            Stored("h:b2", "gw-2", "BIRTH", 1, None, {"imageguard_groups": "plant,lab"}),
            Stored(
                "gw-1:a",
                "gw-1",
                "alerts",
                2,
                1,
                {"reason": "not-allowlisted", "image": "x:1", "container": {"name": "bad"}},
            ),
            Stored(
                "gw-1:v",
                "gw-1",
                "verdicts",
                2,
                2,
                {"verdict": "blocked", "reason": "not-allowlisted", "image": "x:1"},
            ),
            Stored(
                "gw-1:p",
                "gw-1",
                "policy",
                3,
                3,
                {"layer": "group:plant", "version": 2, "status": "applied", "source": "fleet:plant"},
            ),
            Stored(
                "gw-1:i",
                "gw-1",
                "instances",
                4,
                4,
                {"name": "web", "status": "running", "pinned_digest": "sha256:" + "a" * 64},
            ),
        ],
        "r1",
        now=now,
    )
    requester = cast(Requester, Unreachable())
    orch = Orchestrator(store, requester, owner="r1", publish_layer=lambda g, d: None)
    r = orch.create(group="plant", document={"version": 3}, user="alice", waves="1,100%", start=False)
    store.set_devices(r["id"], ["gw-1"], state="applied", answered_at=now)
    store.set_devices(
        r["id"],
        ["gw-2"],
        dry_run='{"would_block": 1, "running": 2, "version": 3, "containers": [{"name": "web", "now": "allowed", "then": "blocked", "reason": "not-allowlisted"}]}',
    )
    store.record("alice", "rollout.create", r["id"])
    cfg = ConsoleServiceConfig(tokens=(ConsoleToken("unit", hashlib.sha256(TOKEN.encode()).hexdigest()),))
    app = create_app(WebContext(config=cfg, store=store, orchestrator=orch, requester=requester))
    app.config["rollout"] = r["id"]
    app.config["store"] = store
    return app.test_client()


def test_every_page_renders(client: FlaskClient) -> None:
    rid = client.application.config["rollout"]
    for path, expect in (
        ("/", "gw-1"),
        ("/?fragment=1", "Rollouts"),
        ("/?window=24h", "last day"),
        ("/devices", "gw-2"),
        ("/devices?group=lab", "gw-2"),
        ("/devices/gw-1", "not-allowlisted"),
        ("/devices/gw-1", "fleet:plant"),
        ("/devices/gw-1", "sha256:" + "a" * 64),
        ("/rollouts", "plant v3"),
        (f"/rollouts/{rid}", "would block 1 of 2: web"),
        (f"/rollouts/{rid}?fragment=1", "Convergence over time"),
        ("/audit", "rollout.create"),
    ):
        r = client.get(path, headers=AUTH)
        assert r.status_code == 200, (path, r.text[:300])
        assert expect in r.text, path
    assert client.get("/devices/nobody", headers=AUTH).status_code == 404
    assert client.get("/rollouts/nope", headers=AUTH).status_code == 404


def test_api_documents(client: FlaskClient) -> None:
    fleet = client.get("/api/fleet", headers=AUTH).json
    assert fleet is not None and fleet["devices"] == 2 and fleet["alerts_total"] == 1
    assert {g["group"]: g["converged"] for g in fleet["groups"]}["plant"] == 0.0  # nobody reported v3 yet
    hist = client.get("/api/alerts/histogram", headers=AUTH).json
    assert hist is not None and sum(n for _, n in hist["series"]) == 1
    assert client.get("/api/openapi.json", headers=AUTH).json["openapi"] == "3.1.0"  # type: ignore[index]
    bad = client.post("/api/rollouts", headers=AUTH, json={"group": "plant", "document": {"version": 3}})
    assert bad.status_code == 400 and "not newer" in bad.json["error"]  # type: ignore[index]
    bad = client.post(
        "/api/rollouts",
        headers=AUTH,
        json={"group": "plant", "document": {"version": 9, "enforcement": {"mode": "audit"}}},
    )
    assert bad.status_code == 400
    bad = client.post("/api/rollouts", headers=AUTH, data="nonsense", content_type="application/json")
    assert bad.status_code == 400
    assert client.post("/api/rollouts/nope/pause", headers=AUTH).status_code == 404
    # a device the broker cannot reach: a clear 502, not a traceback
    live = client.get("/api/devices/gw-1/live/status", headers=AUTH)
    assert live.status_code == 502 and "no broker" in live.json["error"]  # type: ignore[index]


def test_the_alert_feed_misses_nothing_of_a_burst(client: FlaskClient) -> None:
    store = client.application.config["store"]
    first = client.get("/api/alerts", headers=AUTH).json
    assert first is not None
    cursor = first["cursor"]
    burst = [
        Stored(f"gw-2:{i}", "gw-2", "alerts", 10 + i, i, {"reason": "not-allowlisted", "n": i})
        for i in range(120)
    ]
    store.store_messages(burst, "r1")  # one batch, one commit: 120 alerts arrive at once
    seen: list[int] = []
    while True:
        page = client.get(f"/api/alerts?after={cursor}&limit=50", headers=AUTH).json
        assert page is not None
        seen += [a["data"]["n"] for a in page["alerts"]]
        cursor = page["cursor"]
        if not page["more"]:
            break
    assert seen == list(range(120))
