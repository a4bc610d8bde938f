"""``imageguard instances``: declare managed containers; the running agent pulls, verifies, pins and runs them.

These commands change the device policy layer and wake the agent; they never pull or start anything
themselves. ``update`` asks the running agent and waits for its answer.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from typing import Any

from agent.adapters.wakeup import notify_agent
from agent.cli.common import (
    EXIT_NEGATIVE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    emit,
    format_table,
    json_flag,
    load_config,
    read_json_file,
)
from agent.config import Config
from agent.control.service import ApplyResult, Service
from agent.core.instances import UpdateOutcome
from agent.core.policy import DEVICE_LAYER
from agent.errors import InputError, StateError


def register(sub: Any) -> None:
    p = sub.add_parser("instances", help="managed containers: declare, inspect, update")
    isub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = isub.add_parser("list", help="every declared instance and its status")
    json_flag(q)
    q.set_defaults(handler=cmd_list)
    q = isub.add_parser("show", help="one instance: its declaration, status and pinned digest")
    q.add_argument("name")
    json_flag(q)
    q.set_defaults(handler=cmd_show)
    q = isub.add_parser("apply", help="declare or change instances from a JSON file (one spec or a list)")
    q.add_argument("file", metavar="FILE", help="instance spec JSON ('-' for standard input)")
    json_flag(q)
    q.set_defaults(handler=cmd_apply)
    q = isub.add_parser("delete", help="remove an instance; its container goes and its digest allows nothing")
    q.add_argument("name")
    json_flag(q)
    q.set_defaults(handler=cmd_delete)
    for action, enabled in (("enable", True), ("disable", False)):
        q = isub.add_parser(action, help=f"{action} an instance")
        q.add_argument("name")
        json_flag(q)
        q.set_defaults(handler=cmd_enable, enabled=enabled)
    q = isub.add_parser(
        "update", help="re-resolve the tag; a new digest runs only if it verifies (exit 1 if it does not)"
    )
    q.add_argument("name")
    q.add_argument("--timeout", type=float, default=120.0, metavar="S", help="wait this long (default 120)")
    json_flag(q)
    q.set_defaults(handler=cmd_update)


def _service(cfg: Config, *, reading: bool = False) -> Service:
    from agent.app import policy_service

    return policy_service(cfg, reading=reading)


def _applied(results: list[tuple[str, ApplyResult]]) -> str:
    lines = []
    for name, r in results:
        what = "unchanged" if r.status == "unchanged" else f"declared (device policy version {r.version})"
        lines.append(f"instance {name}: {what}")
    return "\n".join(lines)


def _table(views: list[dict[str, Any]]) -> str:
    if not views:
        return "no instances declared"
    return format_table(
        ("NAME", "STATUS", "IMAGE", "PINNED", "REASON"),
        (
            (
                v["name"],
                v["status"],
                v.get("image", "-"),
                (v.get("pinned_digest") or "-")[:19],
                v.get("reason") or "-",
            )
            for v in views
        ),
    )


def cmd_list(args: argparse.Namespace) -> int:
    from agent.control.instances import instance_views

    views = instance_views(_service(load_config(args), reading=True))
    emit(args, {"instances": views}, lambda: _table(views))
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    from agent.control.instances import instance_views

    views = [v for v in instance_views(_service(load_config(args), reading=True)) if v["name"] == args.name]
    if not views:
        emit(args, {"error": {"code": "not-found", "message": f"no instance {args.name!r}"}}, "")
        print(f"imageguard: no instance {args.name!r} is declared")
        return EXIT_NEGATIVE
    view = views[0]

    def text() -> str:
        lines = [f"{k}: {view[k]}" for k in ("name", "status", "reason", "detail", "image") if view.get(k)]
        lines.append(f"pinned digest: {view.get('pinned_digest') or '-'}")
        lines.append(f"container: {view.get('container_id') or '-'}")
        if last := view.get("last_update"):
            # a sentence, not a Python dict: when, how it ended, to what, and why
            outcome = f"{last.get('result', '?')} at {last.get('time', '?')}"
            if last.get("digest"):
                outcome += f" (digest {last['digest']})"
            if last.get("reason"):
                outcome += f": {last['reason']}" + (f", {last['detail']}" if last.get("detail") else "")
            lines.append(f"last update: {outcome}")
        return "\n".join(lines)

    emit(args, view, text)
    return EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    from agent.control.instances import check_spec, put_instance
    from agent.core.instances import InstanceSpec

    cfg = load_config(args)
    doc = read_json_file(args.file, "instance file")
    items = doc if isinstance(doc, list) else [doc]
    if not items:
        raise InputError(f"instance file {args.file}: the list is empty")
    # check every spec before changing anything
    specs = []
    for i, item in enumerate(items):
        spec = InstanceSpec.from_document(
            item, f"instance file {args.file}", f"/{i}" if isinstance(doc, list) else ""
        )
        check_spec(cfg, spec)
        specs.append(spec)
    service = _service(cfg)
    results = [(s.name, put_instance(service, s, source="cli")) for s in specs]
    emit(args, {"results": [{"name": n, **r.to_dict()} for n, r in results]}, lambda: _applied(results))
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    from agent.control.instances import delete_instance

    result = delete_instance(_service(load_config(args)), args.name, source="cli")
    emit(args, {"name": args.name, **result.to_dict()}, f"instance {args.name}: deleted")
    return EXIT_OK


def cmd_enable(args: argparse.Namespace) -> int:
    from agent.control.instances import put_instance

    service = _service(load_config(args))
    spec = next((i for i in service.layer(DEVICE_LAYER).instances if i.name == args.name), None)
    if spec is None:
        raise InputError(f"no instance {args.name!r} is declared in the device policy")
    result = put_instance(service, spec.with_enabled(args.enabled), source="cli")
    emit(args, {"name": args.name, **result.to_dict()}, f"instance {args.name}: {args.action}d")
    return EXIT_OK


def cmd_update(args: argparse.Namespace) -> int:
    from agent.runtime.instances import update_message

    cfg = load_config(args)
    service = _service(cfg)
    if not any(i.name == args.name for i in service.layer(DEVICE_LAYER).instances):
        raise InputError(f"no instance {args.name!r} is declared in the device policy")
    ticket = uuid.uuid4().hex[:8]
    if not notify_agent(cfg.state_dir, update_message(args.name, ticket)):
        raise StateError(
            f"no agent is running on {cfg.state_dir}: start it (imageguard run) to update instances"
        )
    deadline = time.monotonic() + args.timeout
    # progress for a person at a terminal: what the instance is doing now (pulling, verifying, ...)
    progress = sys.stderr.isatty() and not args.json
    shown = ""
    while time.monotonic() < deadline:
        state = service.store.instance_states().get(args.name)
        last = state.last_update if state is not None else None
        if last is not None and last.id == ticket:
            if progress and shown:
                print(file=sys.stderr)
            emit(args, {"name": args.name, **last.to_dict()}, _update_text(args.name, last))
            return EXIT_OK if last.succeeded else EXIT_NEGATIVE
        now = state.status if state is not None else "waiting for the agent"
        if progress and now != shown:
            print(f"\rinstance {args.name}: {now}...".ljust(60), end="", file=sys.stderr, flush=True)
            shown = now
        time.sleep(0.2)
    if progress and shown:
        print(file=sys.stderr)
    emit(
        args, {"name": args.name, "result": "in-progress"}, f"instance {args.name}: update still in progress"
    )
    return EXIT_UNAVAILABLE  # could not see it finish in time


def _update_text(name: str, outcome: UpdateOutcome) -> str:
    if outcome.result == "updated":
        return f"instance {name}: updated to {outcome.digest}"
    if outcome.result == "unchanged":
        return f"instance {name}: up to date ({outcome.digest})"
    reason = outcome.reason.value if outcome.reason else "unknown"
    return f"instance {name}: update {outcome.result} ({reason}): {outcome.detail or ''}"
