"""``imageguard instances`` and the MQTT instance resources, without an agent: edits of the device layer,
bad input (exit 2 / 400 with the field path, nothing changed), views of the stored state."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.adapters.mqtt.codec import PayloadCodec
from agent.adapters.mqtt.kurapayload import KuraMessage, MetricValue, encode_protobuf
from agent.adapters.mqtt.requests import Dispatcher
from agent.adapters.mqtt.topics import Topics
from agent.adapters.store import Store
from agent.cli.main import main
from agent.config import from_dict
from agent.control.instances import control_routes
from agent.control.resources import NotRunning
from agent.control.service import Service
from agent.core.digest import Digest
from agent.core.instances import InstanceSpec, InstanceState, pin_key
from agent.runtime.instances import parse_update_message, update_message

D1 = Digest.of(b"one")
PEM = (
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)


def spec_doc(name: str = "web", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "image": "registry.example:5000/acme/web",
        "tag": "1",
        "trust_anchor": {"pem": PEM},
        **extra,
    }


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[device]\nid = "edge-1"\n[state]\ndir = "{tmp_path / "state"}"\n'
        '[[registries]]\nhost = "registry.example:5000"\nusername = "u"\npassword_env = "IG_TEST_PW"\n'
    )
    return path


def run(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["--config", str(config), "instances", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def write(tmp_path: Path, doc: Any) -> str:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(doc))
    return str(path)


def device_version(config: Path) -> int:
    store = Store(config.parent / "state")
    try:
        return store.layer().version
    finally:
        store.close()


def test_apply_list_show_enable_delete(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(config_file, capsys, "apply", write(tmp_path, [spec_doc(), spec_doc("api")]), "--json")
    assert code == 0 and [r["status"] for r in json.loads(out)["results"]] == ["applied", "applied"]
    assert device_version(config_file) == 2
    code, out, _ = run(config_file, capsys, "apply", write(tmp_path, spec_doc()))
    assert code == 0 and "unchanged" in out and device_version(config_file) == 2
    code, out, _ = run(config_file, capsys, "list", "--json")
    views = json.loads(out)["instances"]
    assert [(v["name"], v["status"], v["enabled"]) for v in views] == [
        ("api", "pending", True),
        ("web", "pending", True),
    ]
    assert run(config_file, capsys, "disable", "web")[0] == 0
    code, out, _ = run(config_file, capsys, "show", "web", "--json")
    assert (
        code == 0 and json.loads(out)["status"] == "disabled" and json.loads(out)["spec"]["enabled"] is False
    )
    assert run(config_file, capsys, "enable", "web")[0] == 0
    assert run(config_file, capsys, "delete", "api")[0] == 0
    code, out, _ = run(config_file, capsys, "list")
    assert code == 0 and "web" in out and "api" not in out
    assert run(config_file, capsys, "show", "api")[0] == 1
    # not found is a negative result (exit 1), as for allowlist remove
    assert run(config_file, capsys, "delete", "api")[0] == 1


@pytest.mark.parametrize(
    ("doc", "where"),
    [
        (spec_doc(run={"ports": [{"container": 0}]}), "at /run/ports/0/container"),
        (spec_doc(run={"bogus": True}), "at /run/bogus"),
        ([spec_doc(), spec_doc("second", bogus=1)], "at /1/bogus"),
        (spec_doc(registry_credentials="unknown.example"), "at /registry_credentials"),
        (
            spec_doc(trust_anchor={"pem": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"}),
            "at /trust_anchor",
        ),
        ("not an object", "at /"),
        ([], "empty"),
    ],
)
def test_bad_specs_exit_2_and_change_nothing(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], doc: Any, where: str
) -> None:
    code, _, err = run(config_file, capsys, "apply", write(tmp_path, doc))
    assert code == 2 and where in err, err
    assert "Traceback" not in err
    assert device_version(config_file) == 0


def test_update_needs_a_running_agent(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(config_file, capsys, "update", "web")[0] == 2  # not declared
    run(config_file, capsys, "apply", write(tmp_path, spec_doc()))
    code, _, err = run(config_file, capsys, "update", "web")
    assert code == 2 and "no agent is running" in err


def test_update_message_fits_the_notify_buffer() -> None:
    msg = update_message("w" * 40, "0123abcd")
    assert len(msg) <= 64
    assert parse_update_message(msg) == ("w" * 40, "0123abcd")
    assert parse_update_message(b"reload") is None and parse_update_message(b"iu:nothing") is None


def test_view_shows_the_stored_state(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(config_file, capsys, "apply", write(tmp_path, spec_doc()))
    store = Store(tmp_path / "state")
    try:
        s = InstanceSpec.from_document(spec_doc())
        store.put_instance_state(
            InstanceState(
                "web", "running", pinned_digest=D1, pin_key=pin_key(s, s.inline_anchor), container_id="c1"
            )
        )
        store.put_instance_state(InstanceState("gone", "running"))  # declared no more: being removed
    finally:
        store.close()
    _, out, _ = run(config_file, capsys, "list", "--json")
    views = {v["name"]: v for v in json.loads(out)["instances"]}
    assert views["web"]["pinned_digest"] == str(D1) and views["web"]["container_id"] == "c1"
    assert views["gone"]["declared"] is False
    # the pin of an enabled instance allows containers; disabled, it does not
    cfg = from_dict({"device": {"id": "edge-1"}, "state": {"dir": str(tmp_path / "state")}}, "test")
    service = Service(cfg, Store(cfg.state_dir))
    assert service.effective().instance_digests == {D1}
    run(config_file, capsys, "disable", "web")
    assert service.effective().instance_digests == frozenset()
    service.store.close()


# ---- MQTT resources --------------------------------------------------------------------------------------

T = Topics(account="acme", device_id="edge-1")


class Harness:
    def __init__(self, tmp_path: Path, signed_only: bool = False) -> None:
        self.config = from_dict(
            {"device": {"id": "edge-1"}, "state": {"dir": str(tmp_path / "state")}}, "test"
        )
        self.service = Service(self.config, Store(self.config.state_dir))
        self.sent: list[tuple[str, bytes]] = []

        def check(what: str) -> None:
            if signed_only:
                from agent.errors import ControlError

                raise ControlError(403, f"{what}: signed documents only")

        routes = control_routes(self.service, NotRunning(), check_edit=check, check_spec=lambda _s: None)
        self.dispatcher = Dispatcher(T, routes, lambda t, p: self.sent.append((t, p)), codec=PayloadCodec())

    def request(self, path: str, body: Any = None) -> tuple[int, Any, str]:
        metrics = {
            "request.id": MetricValue.string("1"),
            "requester.client.id": MetricValue.string("console"),
        }
        raw = json.dumps(body).encode() if body is not None else None
        self.dispatcher.handle(f"{T.control_base}/{path}", encode_protobuf(KuraMessage(1, metrics, raw)))
        _, payload = self.sent.pop()
        reply = PayloadCodec().decode(payload)
        status = reply.integer("response.code")
        message = reply.string("response.exception.message") or ""
        return int(status or 0), json.loads(reply.body) if reply.body else None, message


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.service.store.close()


def test_mqtt_put_get_delete(h: Harness) -> None:
    status, body, _ = h.request("PUT/instances/web", {k: v for k, v in spec_doc().items() if k != "name"})
    assert status == 200 and body["status"] == "applied", body
    status, body, _ = h.request("GET/instances")
    assert status == 200 and [v["name"] for v in body["instances"]] == ["web"]
    status, body, _ = h.request("GET/instances/web")
    assert status == 200 and body["spec"]["tag"] == "1" and body["status"] == "pending"
    assert h.request("GET/instances/nope")[0] == 404
    assert h.request("DEL/instances/web")[0] == 200
    assert h.request("DEL/instances/web")[0] == 404
    assert h.request("EXEC/instances/web/update")[0] == 404


@pytest.mark.parametrize(
    ("body", "part"),
    [
        (
            {"image": "registry.example:5000/acme/web", "tag": "1", "trust_anchor": "a", "run": {"x": 1}},
            "at /run/x",
        ),
        ({"image": "registry.example:5000/acme/web", "tag": "1"}, "at /trust_anchor"),
        ({"name": "other", "image": "x", "tag": "1", "enforcement_digest": str(D1)}, "at /name"),
        (["not", "an", "object"], "at /"),
    ],
)
def test_mqtt_bad_specs_are_400_with_the_field_path(h: Harness, body: Any, part: str) -> None:
    status, _, message = h.request("PUT/instances/web", body)
    assert status == 400 and part in message, message
    assert h.service.layer().version == 0


def test_mqtt_edits_refused_when_signed_documents_are_required(tmp_path: Path) -> None:
    h = Harness(tmp_path, signed_only=True)
    assert h.request("PUT/instances/web", spec_doc())[0] == 403
    assert h.request("GET/instances")[0] == 200
    h.service.store.close()


def test_mqtt_update_without_a_manager_is_503(h: Harness) -> None:
    h.request("PUT/instances/web", spec_doc())
    assert h.request("EXEC/instances/web/update")[0] == 503


def test_control_table_serves_the_instance_resources(h: Harness) -> None:
    from agent.adapters.engine import Engine
    from agent.control.resources import ControlContext, routes

    ctx = ControlContext(h.config, h.service, Engine("unix:///nonexistent.sock"))
    table = routes(ctx)
    for route in (
        ("GET", ("instances",)),
        ("GET", ("instances", "{name}")),
        ("PUT", ("instances", "{name}")),
        ("DEL", ("instances", "{name}")),
        ("EXEC", ("instances", "{name}", "update")),
    ):
        assert route in table, route
