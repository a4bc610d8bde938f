"""Device-side commands: run, scan, allowlist, enforcement, policy, status, decisions."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from agent import logs
from agent.cli.common import (
    EXIT_NEGATIVE,
    EXIT_OK,
    emit,
    format_table,
    json_flag,
    load_config,
    read_json_file,
    warn_issuer_only,
)
from agent.config import Config
from agent.control.service import ApplyResult, Service
from agent.core.digest import Digest
from agent.core.facts import allowlist_digests
from agent.errors import EngineError, InputError, NotFound


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="run the agent (monitor the engine and enforce the policy)")
    p.add_argument(
        "--policy", metavar="FILE", help="import this policy document at start (if its version is newer)"
    )
    p.add_argument("--log-format", choices=["text", "json"], help="log format (default: from config, text)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="log level")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("scan", help="decide on every container now and remove those not allowed")
    p.add_argument(
        "--dry-run", action="store_true", help="only report what would happen: no action, nothing recorded"
    )
    json_flag(p)
    p.set_defaults(handler=cmd_scan)

    p = sub.add_parser("allowlist", help="show or change the device allowlist")
    asub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = asub.add_parser("list", help="list the effective allowlist (device and fleet layers)")
    json_flag(q)
    q.set_defaults(handler=cmd_allowlist_list)
    q = asub.add_parser(
        "add",
        help="allow digests, local images, what runs now, or what audit mode would have blocked",
        description="Sources can be combined. --from-running and --from-decisions show what they would add "
        "and ask before changing anything (--yes to skip the question).",
    )
    q.add_argument("digests", nargs="*", metavar="DIGEST", help="sha256:<64 hex>")
    q.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="REF",
        help="a local image (tag, digest reference or id): its registry digests, or its id if it has none",
    )
    q.add_argument("--from-running", action="store_true", help="the images of every running container")
    q.add_argument(
        "--from-decisions",
        action="store_true",
        help="the images audit mode recorded as would-block (imageguard decisions)",
    )
    q.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    q.add_argument("--comment", default="", help="why it is allowed (kept with the entry)")
    json_flag(q)
    q.set_defaults(handler=cmd_allowlist_add)
    q = asub.add_parser("remove", help="withdraw a digest; its containers are removed at once")
    q.add_argument("digest", metavar="DIGEST")
    json_flag(q)
    q.set_defaults(handler=cmd_allowlist_remove)

    p = sub.add_parser("enforcement", help="show or switch enforcement (enabled, mode)")
    p.add_argument("--enable", dest="enabled", action="store_const", const=True, help="switch enforcement on")
    p.add_argument(
        "--disable", dest="enabled", action="store_const", const=False, help="switch enforcement off"
    )
    p.add_argument("--mode", choices=["enforce", "audit"], help="enforce: remove; audit: only record")
    json_flag(p)
    p.set_defaults(handler=cmd_enforcement)

    p = sub.add_parser("policy", help="import or export the device policy document")
    psub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = psub.add_parser(
        "import", help="replace the device policy with a document (its version must be newer)"
    )
    q.add_argument("file", metavar="FILE", help="policy JSON ('-' for standard input)")
    q.add_argument(
        "--dry-run", action="store_true", help="show what would change (as 'policy diff'); change nothing"
    )
    q.add_argument(
        "--force",
        action="store_true",
        help="replace the layer whatever its version (recovery; this device only)",
    )
    json_flag(q)
    q.set_defaults(handler=cmd_policy_import)
    q = psub.add_parser(
        "diff", help="what importing FILE would change: entries, containers removed, digests revoked"
    )
    q.add_argument("file", metavar="FILE", help="policy JSON ('-' for standard input)")
    q.add_argument("--layer", default="device", help="'device' (default) or 'group:NAME'")
    json_flag(q)
    q.set_defaults(handler=cmd_policy_diff)
    q = psub.add_parser("reset", help="give the device layer a new version, keeping its content (recovery)")
    q.add_argument("--version", type=int, default=1, metavar="N", help="the new version (default 1)")
    json_flag(q)
    q.set_defaults(handler=cmd_policy_reset)
    q = psub.add_parser("export", help="print a policy layer document")
    q.add_argument("--layer", default="device", help="'device' (default) or 'group:NAME'")
    q.set_defaults(handler=cmd_policy_export, json=True)

    p = sub.add_parser("status", help="agent, engine and policy status")
    json_flag(p)
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("decisions", help="recent decisions, newest first")
    p.add_argument("--limit", type=_positive, default=20, help="how many (default 20)")
    p.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="then print new decisions as they are made, oldest first (with --json: one object per line)",
    )
    json_flag(p)
    p.set_defaults(handler=cmd_decisions)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1 or value > 100_000:
        raise argparse.ArgumentTypeError("must be between 1 and 100000")
    return value


def _service(cfg: Config, *, reading: bool = False) -> Service:
    from agent.app import policy_service

    return policy_service(cfg, reading=reading)


def _applied_text(r: ApplyResult) -> str:
    if r.status == "unchanged":
        return f"nothing new: layer {r.layer} stays at version {r.version}"
    extra = f", {r.revoked} verified digests revoked" if r.revoked else ""
    return f"layer {r.layer} is now version {r.version}{extra}"


# -- commands ------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    logs.setup(args.log_level or cfg.logging.level, args.log_format or cfg.logging.format)
    from agent.app import Agent, LazyVerifier

    agent = Agent(cfg, verifier=LazyVerifier(cfg))
    if args.policy:
        doc = read_json_file(args.policy, "policy file")
        result = agent.service.import_policy(doc, source=f"file {args.policy}")
        logging.getLogger("agent").info("policy file %s: %s", args.policy, _applied_text(result))
    agent.run_forever()
    return EXIT_OK


def cmd_scan(args: argparse.Namespace) -> int:
    from agent.app import scan_once

    results = scan_once(load_config(args), dry_run=args.dry_run)
    records = [r.record for r in results]
    not_allowed = [r for r in records if not r.allowed]

    def text() -> str:
        lines = [
            f"{r.verdict or 'needs-verification':<18} {r.container_name[:30]:<30} {r.image[:40]:<40} "
            f"{r.reason.value}"
            for r in records
        ]
        head = "dry run: nothing was changed\n" if args.dry_run else ""
        return (
            head
            + ("\n".join(lines) if lines else "no containers")
            + f"\n{len(not_allowed)} of {len(records)} not allowed"
        )

    emit(args, {"dry_run": args.dry_run, "decisions": [r.to_dict() for r in records]}, text)
    return EXIT_NEGATIVE if not_allowed else EXIT_OK


def cmd_allowlist_list(args: argparse.Namespace) -> int:
    service = _service(load_config(args), reading=True)
    entries = []
    for layer in service.store.layers():
        for e in layer.allowlist:
            entries.append({"digest": str(e.digest), "comment": e.comment, "layer": layer.name})
    emit(
        args,
        {"allowlist": entries, "policy_version": service.effective().version},
        lambda: (
            format_table(
                ("DIGEST", "LAYER", "COMMENT"),
                ((e["digest"], e["layer"], e["comment"] or "-") for e in entries),
            )
            if entries
            else "allowlist is empty"
        ),
    )
    return EXIT_OK


def cmd_allowlist_add(args: argparse.Namespace) -> int:
    if not (args.digests or args.image or args.from_running or args.from_decisions):
        raise InputError("name what to allow: DIGEST..., --image REF, --from-running or --from-decisions")
    cfg = load_config(args)
    # all or nothing: every source is read and validated before anything changes
    found: dict[Digest, tuple[str, str]] = {}  # digest -> (where from, what)
    for text in args.digests:
        found.setdefault(Digest.parse(text), ("argument", text))
    if args.image or args.from_running:
        from agent.adapters.engine import Engine, Gone

        engine = Engine(cfg.engine.url, cfg.engine.timeout_seconds)
        for ref in args.image:
            try:
                digests = engine.image_digests(ref)
            except Gone:
                raise InputError(f"--image {ref}: the engine at {cfg.engine.url} has no such image") from None
            for d in digests:
                found.setdefault(d, ("image", ref))
        if args.from_running:
            for cid in engine.container_ids():
                try:
                    facts = engine.container_facts(cid)
                except Gone:
                    continue
                if facts.state == "running":
                    for d in allowlist_digests(facts.repo_digests, facts.image_id):
                        found.setdefault(d, ("running", f"{facts.name} ({facts.image})"))
    service = _service(cfg)
    if args.from_decisions:
        for _, rec in service.store.decisions(10_000):
            if rec.get("verdict") == "would-block" and rec.get("digests"):
                what = f"{rec['container'].get('name', '?')} ({rec.get('image', '?')})"
                found.setdefault(Digest.parse(rec["digests"][0]), ("decisions", what))
    held = {e.digest for e in service.layer().allowlist}
    new = {d: src for d, src in found.items() if d not in held}
    if not new:
        emit(
            args,
            {"added": [], "already_allowed": [str(d) for d in found]},
            "nothing new: all already allowed",
        )
        return EXIT_OK
    if (args.from_running or args.from_decisions) and not args.yes:
        _confirm(new, args)
    result = service.allowlist_add(list(new), args.comment)
    emit(
        args,
        {
            **result.to_dict(),
            "added": [{"digest": str(d), "from": s, "what": w} for d, (s, w) in new.items()],
        },
        lambda: _applied_text(result) + f"; added {len(new)} digests",
    )
    return EXIT_OK


def _confirm(new: dict[Digest, tuple[str, str]], args: argparse.Namespace) -> None:
    """Show what would be allowed and ask; off a terminal, --yes is required."""
    print(
        format_table(("DIGEST", "FROM", "WHAT"), [(str(d), s, w) for d, (s, w) in new.items()]),
        file=sys.stderr,
    )
    if not sys.stdin.isatty():
        raise InputError(f"would allow the {len(new)} digests above; run again with --yes to do it")
    answer = input(f"Allow these {len(new)} digests? [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise InputError("nothing changed")


def cmd_allowlist_remove(args: argparse.Namespace) -> int:
    digest = Digest.parse(args.digest)
    try:
        result = _service(load_config(args)).allowlist_remove(digest)
    except NotFound as exc:
        emit(args, {"error": {"code": exc.code, "message": str(exc)}}, f"imageguard: {exc}")
        return EXIT_NEGATIVE
    emit(args, result.to_dict(), _applied_text(result))
    return EXIT_OK


def cmd_enforcement(args: argparse.Namespace) -> int:
    changing = args.enabled is not None or args.mode is not None
    service = _service(load_config(args), reading=not changing)
    if args.enabled is not None or args.mode is not None:
        result = service.set_enforcement(enabled=args.enabled, mode=args.mode)
        if not args.json:
            print(_applied_text(result))
    e = service.effective().enforcement
    emit(args, e.to_dict(), f"enforcement {'enabled' if e.enabled else 'disabled'}, mode {e.mode}")
    return EXIT_OK


def cmd_policy_import(args: argparse.Namespace) -> int:
    doc = read_json_file(args.file, "policy file")
    _warn_about(doc)
    if args.dry_run:
        return _show_preview(args, doc, "device")
    result = _service(load_config(args)).import_policy(doc, source="cli", force=args.force)
    emit(args, result.to_dict(), _applied_text(result))
    return EXIT_OK


def _warn_about(doc: Any) -> None:
    """Warnings about a policy document that is valid but may not mean what its author thinks."""
    if not isinstance(doc, dict):
        return  # the import itself reports what is wrong
    from agent.core.anchors import TrustAnchor
    from agent.errors import ImageGuardError

    anchors = []
    for i, a in enumerate(doc.get("trust_anchors") or ()):
        try:
            anchors.append(TrustAnchor.from_dict(a, f"trust anchor {i}"))
        except (ImageGuardError, KeyError, TypeError):
            continue
    warn_issuer_only(anchors)


def cmd_policy_diff(args: argparse.Namespace) -> int:
    return _show_preview(args, read_json_file(args.file, "policy file"), args.layer)


def cmd_policy_reset(args: argparse.Namespace) -> int:
    if not 0 <= args.version <= 2**53 - 2:
        raise InputError(f"--version {args.version}: expected 0 .. {2**53 - 2}")
    result = _service(load_config(args)).reset_version(args.version)
    emit(args, result.to_dict(), f"device layer now at version {result.version}; its content is unchanged")
    return EXIT_OK


def _show_preview(args: argparse.Namespace, doc: Any, layer: str) -> int:
    from agent.app import preview_policy

    preview = preview_policy(load_config(args), doc, layer)

    def text() -> str:
        v = preview["version"]
        lines = [f"layer {preview['layer']}: version {v['held']} -> {v['new']}: {v['verdict']}"]
        lines += [f"  {c}" for c in preview["changes"]] or ["  no change of content"]
        lines.append(f"verified digests revoked: {preview['verified_revoked']}")
        if preview["containers"] is None:
            lines.append(preview["note"])
        else:
            for c in preview["containers"]:
                lines.append(f"  {c['outcome']}: {c['name'] or c['id'][:12]} ({c['image']}): {c['reason']}")
            lines.append(f"containers affected: {len(preview['containers'])}")
        return "\n".join(lines)

    emit(args, preview, text)
    return EXIT_OK


def cmd_policy_export(args: argparse.Namespace) -> int:
    service = _service(load_config(args), reading=True)
    emit(args, service.export_policy(args.layer), "")
    return EXIT_OK


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()))


def cmd_status(args: argparse.Namespace) -> int:
    from agent.adapters.engine import Engine
    from agent.app import LOCK_NAME, read_lock

    cfg = load_config(args)
    service = _service(cfg, reading=True)
    agent = read_lock(cfg.state_dir / LOCK_NAME)
    engine: dict[str, Any] = {"url": cfg.engine.url}
    try:
        info = Engine(cfg.engine.url, min(cfg.engine.timeout_seconds, 5)).ping()
        engine.update(reachable=True, version=info.get("Version"), api_version=info.get("ApiVersion"))
    except EngineError as exc:
        engine.update(reachable=False, error=str(exc))
    status: dict[str, Any] = {
        **service.summary(),
        "config": cfg.source,
        "state_dir": str(cfg.state_dir),
        "agent": {"running": agent is not None, **(agent or {})},
        "engine": engine,
        "mqtt": {"configured": cfg.mqtt is not None, "url": cfg.mqtt.url if cfg.mqtt else None},
    }

    def text() -> str:
        a = status["agent"]
        running = (
            f"running (pid {a.get('pid')}, since {time.ctime(a['started'])})"
            if a["running"]
            else "not running"
        )
        if disabled := a.get("disabled"):
            running += "; DISABLED: " + "; ".join(f"{part} ({why})" for part, why in sorted(disabled.items()))
        e = status["engine"]
        eng = f"reachable (Docker {e.get('version')})" if e["reachable"] else f"UNREACHABLE: {e.get('error')}"
        p = status["policy"]
        enf = status["enforcement"]
        layers = ", ".join(f"{k}={v}" for k, v in sorted(p["layers"].items())) or "none"
        st = status["storage"]
        storage = "ok" if st["state"] == "ok" else f"{st['state'].upper()}: {st['problem']}"
        if lost := st["records_lost"]:
            storage += f"; records lost: {_counts(lost)}"
        if poison := st["poison_rows"]:
            storage += f"; undecodable rows set aside: {_counts(poison)} (table poison_rows)"
        counted = {k: status["counters"].get(k, 0) for k in _ENFORCEMENT_COUNTERS}
        actions = (
            ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counted.items() if v) or "nothing to report"
        )
        return "\n".join(
            [
                f"device:       {status['device']}  (config {status['config']})",
                f"agent:        {running}",
                f"engine:       {cfg.engine.url} {eng}",
                f"enforcement:  {'enabled' if enf['enabled'] else 'DISABLED'}, mode {enf['mode']}",
                f"policy:       version {p['version']}, layers {layers}, {p['allowlist']} digests, "
                f"anchors {', '.join(p['trust_anchors']) or 'none'}",
                f"verified:     {status['verified_digests']} digests",
                f"decisions:    {status['decisions']} recorded",
                f"enforcing:    {actions}",
                f"outbox:       {status['outbox']['queued']} queued",
                f"storage:      {storage}",
            ]
        )

    emit(args, status, text)
    healthy = status["agent"]["running"] and engine["reachable"]
    return EXIT_OK if healthy else EXIT_NEGATIVE


#: what enforcement counts (agent/runtime/enforcer.py): kills before an entrypoint ran, and every failure
_ENFORCEMENT_COUNTERS = (
    "killed_before_entrypoint",
    "retries",
    "engine_errors",
    "removal_failures",
    "enforcement_errors",
    "thaw_failures",
)

_DECISION_COLUMNS = ("TIME", "VERDICT", "CONTAINER", "IMAGE", "REASON", "DIGEST")


def _decision_row(r: dict[str, Any]) -> tuple[str, ...]:
    return (
        r["time"],
        r["verdict"],
        r["container"].get("name", "")[:28],
        r.get("image", "")[:40],
        r["reason"],
        (r.get("digests") or ["-"])[0],  # the digest to allow (imageguard allowlist add DIGEST)
    )


def cmd_decisions(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    if args.follow:
        return _follow_decisions(cfg, args)
    service = _service(cfg, reading=True)
    rows = [rec for _, rec in service.store.decisions(args.limit)]

    def text() -> str:
        if not rows:
            return "no decisions recorded"
        return format_table(_DECISION_COLUMNS, (_decision_row(r) for r in rows))

    emit(args, {"decisions": rows}, text)
    return EXIT_OK


def _follow_decisions(cfg: Config, args: argparse.Namespace, interval: float = 0.5) -> int:
    """The last ``--limit`` decisions, then each new one as it is stored, until interrupted."""
    import json as json_mod

    from agent.adapters.store import DB_NAME

    while not (cfg.state_dir / DB_NAME).exists():  # nothing yet: wait for the agent to create it
        time.sleep(interval)
    service = _service(cfg, reading=True)
    last = 0
    widths = [25, 11, 28, 40, 26]

    def show(rec: dict[str, Any]) -> None:
        if args.json:
            print(json_mod.dumps(rec, sort_keys=True), flush=True)
        else:
            row = _decision_row(rec)
            print(
                "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1], flush=True
            )

    if not args.json:
        print("  ".join(c.ljust(w) for c, w in zip(_DECISION_COLUMNS, widths, strict=False)) + "  DIGEST")
    for seq, rec in reversed(service.store.decisions(args.limit)):
        show(rec)
        last = max(last, seq)
    while True:
        time.sleep(interval)
        newer = [(seq, rec) for seq, rec in service.store.decisions(1000) if seq > last]
        for seq, rec in reversed(newer):
            show(rec)
            last = max(last, seq)
