"""The CONTAINER-AUTH-V1 resources: what a console can read and change over Kura request/response.

This module is the routing table for :class:`agent.adapters.mqtt.requests.Dispatcher`: each handler validates its body
against ``schemas/control/<name>.schema.json`` (400 with the JSON pointer of the first error), then calls the
same library the CLI calls (:class:`agent.control.service.Service`), so a change made over MQTT reloads the agent and
rescans exactly like one made with ``imageguard allowlist add``.

Every whole-layer document (``PUT policy`` here, fleet layers in :mod:`agent.control.cloud`) goes through
:func:`accept_layer_document`, and every partial edit (allowlist, anchors, enforcement) through
:func:`check_partial_edit`: they are the one place where signed-policy checks apply.

Status codes (Kura's): 200, 400 (bad body, rollback, unusable anchor), 404 (unknown entry), 403 (a signed
document is required), 500 (unexpected; details only in the device log).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.adapters.dockerhost import DockerHost
from agent.adapters.engine import Engine, Gone
from agent.adapters.mqtt.requests import Handler, Request, Response, Route
from agent.config import Config
from agent.control.gate import PolicyGate
from agent.control.instances import control_routes
from agent.control.service import ApplyResult, Service
from agent.core.anchors import TrustAnchor
from agent.core.decision import Evidence, decide
from agent.core.digest import Digest
from agent.core.envelope import claimed_version
from agent.core.facts import ContainerFacts
from agent.core.imageref import ImageRef
from agent.core.instances import InstanceSpec, remote_problem
from agent.core.policy import DEVICE_LAYER, AllowlistEntry, PolicyLayer, group_layer
from agent.core.schemas import validate
from agent.errors import Code, ControlError, EngineError, ImageGuardError, InputError, SchemaError
from agent.runtime.enforcer import Enforcer
from agent.runtime.instances import InstanceManager

log = logging.getLogger(__name__)

DECISIONS_PAGE = 50


class Running(Protocol):
    """The agent's loops, once started (None before): :class:`agent.app.Agent` is the real one."""

    @property
    def enforcer(self) -> Enforcer | None: ...

    @property
    def instances(self) -> InstanceManager | None: ...


class NotRunning:
    """No loops: the resources that need them answer 500/503 (tests, and the agent before start)."""

    enforcer: Enforcer | None = None
    instances: InstanceManager | None = None


@dataclass
class ControlContext:
    """What the handlers may use: parts built by the composition root."""

    config: Config
    service: Service
    engine: Engine
    running: Running = field(default_factory=NotRunning)
    #: the cloud connection's view of itself (connected, counters); filled in by agent.control.cloud
    connection_status: Callable[[], dict[str, Any]] = field(default=lambda: {"connected": False})
    #: signature and target checks of MQTT policy changes (loads mqtt.policy_signing_key once: a bad key
    #: stops the agent at start-up rather than letting it accept unsigned changes)
    policy_gate: PolicyGate = field(init=False)

    def __post_init__(self) -> None:
        self.policy_gate = PolicyGate.from_config(self.config)


# --- the signed-policy hook points -----------------------------------------------------------------------


def accept_layer_document(ctx: ControlContext, doc: Any, layer_name: str, source: str) -> PolicyLayer:
    """Turn a whole layer document that arrived over MQTT into a :class:`PolicyLayer`, or raise.

    ``doc`` is a bare layer document or a signed envelope (agent/verify/policy_signature.py). With
    ``mqtt.policy_signing_key`` only a validly signed envelope naming this device (device layer) or this
    group (fleet layer) passes (else PolicySignatureError, 403); without it a ``target``, when present,
    must name this device or group (400). Then the policy schema and meaning are checked (a fleet layer has
    no enforcement). Versions are the policy service's: older -> RollbackError, equal -> unchanged.
    Rejections are not recorded here: the caller reports them with :func:`claimed_version`.
    """
    layer = ctx.policy_gate.accept(doc, layer_name)
    for spec in layer.instances:
        check_remote_spec(ctx, spec)
    return layer


def check_remote_spec(ctx: ControlContext, spec: InstanceSpec) -> None:
    """Refuse (403) a spec from MQTT that asks for the host: host network, sensitive binds, an anchor for
    every image, unless the device's configuration grants it ([mqtt] remote_instances_allow)."""
    granted = ctx.config.mqtt.remote_instances_allow if ctx.config.mqtt else ()
    if (problem := remote_problem(spec, granted, ctx.config.protected_paths)) is not None:
        raise ControlError(403, problem, code=Code.REMOTE_SPEC_NOT_PERMITTED)


def check_partial_edit(ctx: ControlContext, what: str) -> None:
    """Refuse piecemeal changes when the device requires signed whole-layer documents (403): logged,
    counted and reported like any refused policy change."""
    try:
        ctx.policy_gate.require_whole_document(what)
    except ImageGuardError as exc:
        ctx.service.record_rejection(DEVICE_LAYER, None, exc, "mqtt")
        raise


# --- helpers ---------------------------------------------------------------------------------------------


def _source(req: Request) -> str:
    return f"mqtt:{req.requester}"


def body(req: Request, schema: str, what: str, *, optional: bool = False) -> Any:
    """The request's JSON body validated against ``schemas/control/<schema>.schema.json``."""
    if optional and not req.body:
        return {}
    doc = req.require_json()
    validate(doc, f"control/{schema}", what)
    return doc


def no_body(req: Request, what: str) -> None:
    body(req, "empty.request", what, optional=True)


def _result(r: ApplyResult) -> Response:
    return Response.of_json(r.to_dict())


def _reject(ctx: ControlContext, layer: str, doc: Any, exc: ImageGuardError, source: str) -> None:
    ctx.service.record_rejection(layer, claimed_version(doc), exc, source)


# --- policy ----------------------------------------------------------------------------------------------


def get_policy(ctx: ControlContext, req: Request) -> Response:
    doc = body(req, "get-policy.request", "GET policy request", optional=True)
    name = doc.get("layer", DEVICE_LAYER)
    if name != DEVICE_LAYER and name not in {group_layer(g) for g in ctx.config.device.groups}:
        raise ControlError(
            404,
            f"layer {name!r} is not one this device holds (device groups: "
            f"{', '.join(ctx.config.device.groups) or 'none'})",
        )
    return Response.of_json(ctx.service.export_policy(name))


def put_policy(ctx: ControlContext, req: Request) -> Response:
    source = _source(req)
    doc: Any = None
    try:
        doc = req.require_json()
        validate(doc, "control/put-policy.request", "PUT policy request")
        layer = accept_layer_document(ctx, doc, DEVICE_LAYER, source)
    except ImageGuardError as exc:
        _reject(ctx, DEVICE_LAYER, doc, exc, source)
        raise
    return _result(ctx.service.apply_layer(layer, source=source))  # rollback: RollbackError -> 400


def _containers(ctx: ControlContext) -> list[ContainerFacts]:
    """Every container the engine knows now, with its facts (those removed meanwhile left out)."""
    try:
        ids = ctx.engine.container_ids()
    except EngineError as exc:
        raise ControlError(500, f"the container engine cannot be reached: {exc.message}") from None
    found = []
    for cid in ids:
        try:
            found.append(ctx.engine.container_facts(cid))
        except (Gone, EngineError):
            continue  # removed meanwhile
    return found


def _held_group(ctx: ControlContext, group: str) -> str:
    if group not in ctx.config.device.groups:
        raise ControlError(
            404,
            f"group {group!r} is not one of this device's groups "
            f"({', '.join(ctx.config.device.groups) or 'none'})",
        )
    return group_layer(group)


def put_fleet_layer(ctx: ControlContext, req: Request) -> Response:
    """A group's layer sent to this one device (a console rollout's wave), with every check a retained fleet
    layer gets: signature, target, schema, version. The outcome is acknowledged on ``.../policy`` too."""
    layer_name = _held_group(ctx, req.params["group"])
    source = _source(req)
    doc: Any = None
    try:
        doc = req.require_json()
        validate(doc, "control/put-policy.request", f"PUT fleet/{req.params['group']} request")
        layer = accept_layer_document(ctx, doc, layer_name, source)
    except ImageGuardError as exc:
        _reject(ctx, layer_name, doc, exc, source)
        raise
    return _result(ctx.service.apply_layer(layer, source=source))


def exec_policy_dry_run(ctx: ControlContext, req: Request) -> Response:
    """What a layer would do to the running containers, changing nothing: each is decided under the policy
    with that layer in place, from the allowlist and the verified digests (no registry is asked)."""
    doc = body(req, "exec-dry-run.request", "EXEC policy/dry-run request")
    layer_name = doc.get("layer", DEVICE_LAYER)
    if layer_name != DEVICE_LAYER:
        _held_group(ctx, layer_name.removeprefix("group:"))
    layer = ctx.policy_gate.accept(doc["document"], layer_name)
    held = next((lyr.version for lyr in ctx.service.store.layers() if lyr.name == layer_name), 0)
    now_policy, then_policy = ctx.service.effective(), ctx.service.effective(replacing=layer)
    evidence = Evidence(ctx.service.store.verified(), {})
    rows = []
    for facts in _containers(ctx):
        if facts.state != "running":
            continue
        now, then = decide(facts, now_policy, evidence), decide(facts, then_policy, evidence)
        rows.append(
            {
                "id": facts.id,
                "name": facts.name,
                "image": facts.image,
                "now": now.verdict or "needs-verification",
                "then": then.verdict or "needs-verification",
                "reason": str(then.reason),
                "detail": then.detail,
            }
        )
    return Response.of_json(
        {
            "layer": layer_name,
            "version": layer.version,
            "held_version": held,
            "version_status": "newer"
            if layer.version > held
            else "unchanged"
            if layer.version == held
            else "older",
            "running": len(rows),
            "would_block": sum(1 for r in rows if r["then"] != "allowed" and r["now"] == "allowed"),
            "containers": rows,
        }
    )


# --- allowlist -------------------------------------------------------------------------------------------


def get_allowlist(ctx: ControlContext, req: Request) -> Response:
    no_body(req, "GET allowlist request")
    entries = [
        {"digest": str(e.digest), "comment": e.comment, "layer": layer.name}
        for layer in ctx.service.store.layers()
        for e in layer.allowlist
    ]
    return Response.of_json({"allowlist": entries, "policy_version": ctx.service.effective().version})


def post_allowlist(ctx: ControlContext, req: Request) -> Response:
    doc = body(req, "post-allowlist.request", "POST allowlist request")
    check_partial_edit(ctx, "POST allowlist")
    if "digests" in doc:
        raw = [(f"/digests/{i}", d, doc.get("comment", "")) for i, d in enumerate(doc["digests"])]
    else:
        raw = [
            (f"/entries/{i}/digest", e["digest"], e.get("comment", "")) for i, e in enumerate(doc["entries"])
        ]
    entries = []
    for pointer, text, comment in raw:  # all or nothing: every digest is parsed before anything changes
        try:
            entries.append(AllowlistEntry(Digest.parse(text), comment))
        except InputError as exc:
            raise SchemaError("POST allowlist request", pointer, exc.message) from None
    return _result(ctx.service.allowlist_add_entries(entries, source=_source(req)))


def del_allowlist(ctx: ControlContext, req: Request) -> Response:
    no_body(req, "DEL allowlist request")
    check_partial_edit(ctx, "DEL allowlist")
    digest = Digest.parse(req.params["digest"])
    return _result(ctx.service.allowlist_remove(digest, source=_source(req)))  # NotFound -> 404


# --- trust anchors ---------------------------------------------------------------------------------------


def get_trust_anchors(ctx: ControlContext, req: Request) -> Response:
    no_body(req, "GET trust-anchors request")
    anchors = [
        {**a.to_dict(), "layer": layer.name, "fingerprint": a.fingerprint}
        for layer in ctx.service.store.layers()
        for a in layer.trust_anchors
    ]
    return Response.of_json({"trust_anchors": anchors})


def put_trust_anchor(ctx: ControlContext, req: Request) -> Response:
    doc = body(req, "put-trust-anchor.request", "PUT trust-anchors request")
    name = req.params["name"]
    if doc["name"] != name:
        raise SchemaError(
            "PUT trust-anchors request", "/name", f"{doc['name']!r} does not match the topic's {name!r}"
        )
    check_partial_edit(ctx, "PUT trust-anchors")
    anchor = TrustAnchor.from_dict(doc, f"trust anchor {name!r}")
    # unusable key material: check_anchors raises PolicyError -> 400, nothing stored
    return _result(ctx.service.put_anchor(anchor, source=_source(req)))


def del_trust_anchor(ctx: ControlContext, req: Request) -> Response:
    no_body(req, "DEL trust-anchors request")
    check_partial_edit(ctx, "DEL trust-anchors")
    return _result(ctx.service.delete_anchor(req.params["name"], source=_source(req)))  # NotFound -> 404


# --- enforcement -----------------------------------------------------------------------------------------


def get_enforcement(ctx: ControlContext, req: Request) -> Response:
    no_body(req, "GET enforcement request")
    return Response.of_json(ctx.service.effective().enforcement.to_dict())


def put_enforcement(ctx: ControlContext, req: Request) -> Response:
    doc = body(req, "put-enforcement.request", "PUT enforcement request")
    check_partial_edit(ctx, "PUT enforcement")
    result = ctx.service.set_enforcement(
        enabled=doc.get("enabled"), mode=doc.get("mode"), source=_source(req)
    )
    return Response.of_json(
        {**result.to_dict(), "enforcement": ctx.service.effective().enforcement.to_dict()}
    )


# --- observation -----------------------------------------------------------------------------------------


def status_document(ctx: ControlContext) -> dict[str, Any]:
    """``imageguard status --json`` without paths or secrets, plus the connection status."""
    doc = {**ctx.service.summary(), "mqtt": ctx.connection_status()}
    if (enforcer := ctx.running.enforcer) is not None:
        # what the running agent holds in memory and could not store yet
        live = enforcer.recorder.stats()
        storage = doc["storage"]
        storage["backlog"], storage["backlog_limit"] = live["backlog"], live["backlog_limit"]
        storage["write_failures"] = live["write_failures"]
        if live["problem"] is not None:
            storage["state"], storage["problem"] = "failing", live["problem"]
        for kind, n in live["lost"].items():
            storage["records_lost"][kind] = max(storage["records_lost"].get(kind, 0), n)
    return doc


def get_status(ctx: ControlContext, req: Request) -> Response:
    no_body(req, "GET status request")
    doc = status_document(ctx)
    try:
        info = ctx.engine.ping()
        doc["engine"] = {
            "reachable": True,
            "version": info.get("Version"),
            "api_version": info.get("ApiVersion"),
        }
    except EngineError as exc:
        doc["engine"] = {"reachable": False, "error": exc.message}
    return Response.of_json(doc)


def get_decisions(ctx: ControlContext, req: Request) -> Response:
    doc = body(req, "get-decisions.request", "GET decisions request", optional=True)
    limit = int(doc.get("limit", DECISIONS_PAGE))
    rows = ctx.service.store.decisions(limit + 1, doc.get("before"))
    page = rows[:limit]
    nxt = page[-1][0] if len(rows) > limit else None
    return Response.of_json({"decisions": [rec for _, rec in page], "next": nxt})


def get_containers(ctx: ControlContext, req: Request) -> Response:
    no_body(req, "GET containers request")
    out = []
    for facts in _containers(ctx):
        last = ctx.service.store.last_decision_for(facts.id)
        out.append(
            {
                "id": facts.id,
                "name": facts.name,
                "image": facts.image,
                "state": facts.state,
                "verdict": last["verdict"] if last else None,
                "reason": last["reason"] if last else None,
                "decided_at": last["time"] if last else None,
                "decision_id": last["id"] if last else None,
            }
        )
    return Response.of_json({"containers": out})


# --- commands --------------------------------------------------------------------------------------------


def exec_scan(ctx: ControlContext, req: Request) -> Response:
    doc = body(req, "exec-scan.request", "EXEC scan request", optional=True)
    enforcer = ctx.running.enforcer
    if enforcer is None:
        raise ControlError(500, "the agent is not enforcing yet; retry in a moment")
    dry_run = bool(doc.get("dry_run", False))
    try:
        results = enforcer.scan(dry_run=dry_run, trigger="mqtt")
    except EngineError as exc:
        raise ControlError(500, f"scan failed: {exc.message}") from None
    records = [r.record.to_dict() for r in results]
    allowed = sum(1 for r in results if r.record.allowed)
    return Response.of_json(
        {
            "dry_run": dry_run,
            "scanned": len(records),
            "allowed": allowed,
            "not_allowed": len(records) - allowed,
            "decisions": records,
        }
    )


def exec_verify(ctx: ControlContext, req: Request) -> Response:
    doc = body(req, "exec-verify.request", "EXEC verify request")
    try:
        ref = ImageRef.parse(doc["image"])
    except InputError as exc:
        raise SchemaError("EXEC verify request", "/image", exc.message) from None
    anchors = ctx.service.effective().anchors_for(ref)
    if not anchors:
        raise ControlError(
            400, f"no trust anchor of the device policy covers {ref.name}", code=Code.NO_ANCHOR
        )
    from agent.adapters.registry import RegistryClient  # the crypto and HTTP stack load only when needed
    from agent.runtime.verification import verify_reference

    with RegistryClient(ctx.config, docker_host=DockerHost()) as client:
        result = verify_reference(client, ref, anchors, now=time.time(), full_report=True)
    return Response.of_json(result.to_dict())


# --- the table -------------------------------------------------------------------------------------------

_TABLE: Mapping[Route, Callable[[ControlContext, Request], Response]] = {
    ("GET", ("policy",)): get_policy,
    ("PUT", ("policy",)): put_policy,
    ("PUT", ("fleet", "{group}")): put_fleet_layer,
    ("EXEC", ("policy", "dry-run")): exec_policy_dry_run,
    ("GET", ("allowlist",)): get_allowlist,
    ("POST", ("allowlist",)): post_allowlist,
    ("DEL", ("allowlist", "{digest}")): del_allowlist,
    ("GET", ("trust-anchors",)): get_trust_anchors,
    ("PUT", ("trust-anchors", "{name}")): put_trust_anchor,
    ("DEL", ("trust-anchors", "{name}")): del_trust_anchor,
    ("GET", ("enforcement",)): get_enforcement,
    ("PUT", ("enforcement",)): put_enforcement,
    ("GET", ("status",)): get_status,
    ("GET", ("decisions",)): get_decisions,
    ("GET", ("containers",)): get_containers,
    ("EXEC", ("scan",)): exec_scan,
    ("EXEC", ("verify",)): exec_verify,
}


def routes(ctx: ControlContext) -> dict[Route, Handler]:
    """The dispatcher's routing table, bound to ``ctx``."""

    def bind(fn: Callable[[ControlContext, Request], Response]) -> Handler:
        return lambda req: fn(ctx, req)

    table = {route: bind(fn) for route, fn in _TABLE.items()}
    # managed instances: GET instances, GET|PUT|DEL instances/{name}, EXEC instances/{name}/update
    table.update(
        control_routes(
            ctx.service,
            ctx.running,
            check_edit=lambda what: check_partial_edit(ctx, what),
            check_spec=lambda spec: check_remote_spec(ctx, spec),
        )
    )
    return table
