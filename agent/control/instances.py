"""Managed instances, the control side: edit the declared instances in the device layer, read models, and
the ``instances`` MQTT resources. The runtime's :class:`~agent.runtime.instances.InstanceManager` does the
pulling, verifying and running.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from agent.config import Config
from agent.control.service import ApplyResult, Service
from agent.core.instances import InstanceSpec, InstanceState
from agent.core.policy import DEVICE_LAYER
from agent.errors import Code, ControlError, ImageGuardError, NotFound, PolicyError
from agent.runtime.instances import InstanceManager, credentials_problem

# ---- editing the declared instances (CLI and control plane) ---------------------------------------------


def put_instance(service: Service, spec: InstanceSpec, *, source: str) -> ApplyResult:
    """Add or replace an instance in the device layer (a new layer version; the agent reconciles)."""
    check_spec(service.config, spec)
    current = service.layer(DEVICE_LAYER)
    old = next((i for i in current.instances if i.name == spec.name), None)
    if old is not None and old.document == spec.document:
        return ApplyResult(DEVICE_LAYER, current.version, "unchanged")
    kept = [i for i in current.instances if i.name != spec.name]
    return service.apply_layer(current.bumped(instances=(*kept, spec)), source=source)


def delete_instance(service: Service, name: str, *, source: str) -> ApplyResult:
    current = service.layer(DEVICE_LAYER)
    kept = tuple(i for i in current.instances if i.name != name)
    if len(kept) == len(current.instances):
        raise NotFound(f"instance {name!r} is not declared in the device policy")
    return service.apply_layer(current.bumped(instances=kept), source=source)


def check_spec(config: Config, spec: InstanceSpec) -> None:
    """Checks that need the configuration or the crypto stack (the schema cannot know them)."""
    if (problem := credentials_problem(config, spec)) is not None:
        raise PolicyError(f"instance {spec.name!r}: at /registry_credentials: {problem}")
    if spec.inline_anchor is not None:
        from agent.verify.schemes import validator_for

        try:
            validator_for(spec.inline_anchor).check_anchor(spec.inline_anchor)
        except ImageGuardError as exc:
            raise PolicyError(f"instance {spec.name!r}: at /trust_anchor: {exc}", code=exc.code) from None


def instance_view(spec: InstanceSpec | None, state: InstanceState | None) -> dict[str, Any]:
    """What ``instances show`` and ``GET instances/{name}`` answer: the declaration and the agent's state."""
    name = spec.name if spec is not None else state.name if state is not None else ""
    out: dict[str, Any] = {"name": name}
    if spec is not None:
        out["spec"] = spec.to_document()
        out["image"] = str(spec.image)
        out["enabled"] = spec.enabled
    if state is not None:
        out.update({k: v for k, v in state.to_dict().items() if k != "name"})
    else:
        out["status"] = "pending" if spec is None or spec.enabled else "disabled"
    if spec is None:
        out["declared"] = False  # being removed
    return out


def instance_views(service: Service) -> list[dict[str, Any]]:
    specs = {s.name: s for s in service.layer(DEVICE_LAYER).instances}
    states = service.store.instance_states()
    return [instance_view(specs.get(n), states.get(n)) for n in sorted(set(specs) | set(states))]


class RunningInstances(Protocol):
    @property
    def instances(self) -> InstanceManager | None: ...


# ---- control-plane resources (merged into the routing table of agent.control.resources) ---------------------------------


def control_routes(
    service: Service,
    running: RunningInstances,
    *,
    check_edit: Callable[[str], None],
    check_spec: Callable[[InstanceSpec], None],
    update_timeout: float = 120.0,
) -> dict[tuple[str, tuple[str, ...]], Callable[[Any], Any]]:
    """``GET instances``, ``GET|PUT|DEL instances/{name}``, ``EXEC instances/{name}/update``."""
    from agent.adapters.mqtt.requests import Request, Response

    def source(req: Request) -> str:
        return f"mqtt:{req.requester}"

    def find(name: str) -> dict[str, Any]:
        for view in instance_views(service):
            if view["name"] == name:
                return view
        raise ControlError(404, f"instance {name!r} is not declared", code=Code.NOT_FOUND)

    def get_all(req: Request) -> Response:
        return Response.of_json({"instances": instance_views(service)})

    def get_one(req: Request) -> Response:
        return Response.of_json(find(req.params["name"]))

    def put_one(req: Request) -> Response:
        check_edit(f"PUT instances/{req.params['name']}")
        doc = req.require_json()
        if isinstance(doc, dict) and doc.get("name", req.params["name"]) != req.params["name"]:
            raise ControlError(
                400, f"at /name: the body names {doc.get('name')!r}, the topic {req.params['name']!r}"
            )
        if isinstance(doc, dict):
            doc = {"name": req.params["name"], **doc}
        spec = InstanceSpec.from_document(doc, f"instance {req.params['name']!r}")
        check_spec(spec)
        return Response.of_json(put_instance(service, spec, source=source(req)).to_dict())

    def del_one(req: Request) -> Response:
        check_edit(f"DEL instances/{req.params['name']}")
        result = delete_instance(service, req.params["name"], source=source(req))  # NotFound -> 404
        return Response.of_json(result.to_dict())

    def exec_update(req: Request) -> Response:
        name = req.params["name"]
        find(name)
        m = running.instances
        if m is None:
            raise ControlError(503, "the instance manager is not running", code=Code.NOT_RUNNING)
        result = m.request_update(name).wait(update_timeout)
        if result is None:
            return Response.of_json({"name": name, "result": "in-progress"}, status=200)
        return Response.of_json({"name": name, **result.to_dict()})

    return {
        ("GET", ("instances",)): get_all,
        ("GET", ("instances", "{name}")): get_one,
        ("PUT", ("instances", "{name}")): put_one,
        ("DEL", ("instances", "{name}")): del_one,
        ("EXEC", ("instances", "{name}", "update")): exec_update,
    }
