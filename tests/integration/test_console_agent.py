"""``imageguard console request`` round trips with a real agent process, and the exit codes it gives."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.core.digest import Digest
from tests.support.dockerd import Dockerd
from tests.support.fixtures.mosquitto import MosquittoBroker
from tests.support.fleet import Fleet

pytestmark = pytest.mark.integration


@pytest.fixture
def fleet(tmp_path: Path, mosquitto: MosquittoBroker, engine: Dockerd) -> Iterator[Fleet]:
    f = Fleet(tmp_path, mosquitto, engine)
    try:
        f.start(("edge-1", ["plant"], "audit"), encoding="json")  # the console speaks protobuf: both work
        yield f
    finally:
        f.stop_all()


def test_round_trips_and_exit_codes(fleet: Fleet) -> None:
    digest = str(Digest.of(b"console round trip"))
    body = fleet.tmp / "add.json"
    body.write_text(json.dumps({"digests": [digest], "comment": "from the console"}))

    out = fleet.console("request", "edge-1", "GET", "status", "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)["body"]
    assert status["device"] == "edge-1" and status["groups"] == ["plant"] and status["mqtt"]["connected"]

    out = fleet.console("request", "edge-1", "POST", "allowlist", "--body", str(body))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.split("\n", 1)[1])["status"] == "applied"

    code, listed = fleet.request("edge-1", "GET", "allowlist")
    assert code == 200
    assert {"digest": digest, "comment": "from the console", "layer": "device"} in listed["allowlist"]

    code, enforcement = fleet.request("edge-1", "GET", "enforcement")
    assert (code, enforcement) == (200, {"enabled": True, "mode": "audit"})

    cases = [
        (["DEL", f"allowlist/{digest}"], 0, 200),
        (["DEL", f"allowlist/{digest}"], 1, 404),  # gone already
        (["GET", "no-such-resource"], 1, 404),
        (["PUT", "enforcement", "--body", str(body)], 2, 400),  # wrong body for the resource
        (["GET", "decisions"], 0, 200),
    ]
    for args, exit_code, response_code in cases:
        out = fleet.console("request", "edge-1", *args, "--json")
        assert out.returncode == exit_code, (args, out.stdout, out.stderr)
        assert json.loads(out.stdout)["response.code"] == response_code, args

    out = fleet.console("request", "edge-404", "GET", "status", "--timeout", "1")
    assert out.returncode == 3 and "no reply from edge-404" in out.stderr
