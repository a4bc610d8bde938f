"""The fleet console's dashboard and JSON API (Flask; server-rendered pages, a little JavaScript, no build).

Access control:

* Every page and API call needs a signed-in user (``[[console.users]]``, werkzeug scrypt hashes) or an API
  token (``Authorization: Bearer``, ``[[console.tokens]]``, stored as SHA-256). ``/healthz`` alone is open.
* Every change made with a session cookie carries a CSRF token (Flask-WTF): a form field, or the
  ``X-CSRFToken`` header the page's script sends. A bearer token is never sent by a browser on its own,
  so token calls need none.
* Failed sign-ins are slowed down per user name and address; every change and every sign-in is written to
  the audit log with the user.
* Pages send a strict Content-Security-Policy (scripts only from ``/static``), no framing, no referrer.

The pages refresh their live parts by fetching the same URL with ``?fragment=1`` (the part's HTML) and the
alert feed by long-polling ``/api/alerts``; the JSON API (``/api/...``) serves the same data, described by
``/api/openapi.json`` (agent/schemas/console-api.openapi.json).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

from flask import Flask, Response, abort, g, jsonify, redirect, render_template, request, session, url_for
from flask_wtf.csrf import CSRFError, CSRFProtect, generate_csrf
from werkzeug.security import check_password_hash

from agent.config import ConsoleServiceConfig
from agent.console.fleetdb import ACTIVE, HOLDS, FleetDbError, FleetStore
from agent.console.orchestrator import Orchestrator, RolloutError
from agent.console.requester import Requester
from agent.console.rollouts import convergence_series, summary
from agent.errors import ImageGuardError

log = logging.getLogger(__name__)

#: what the device page may fetch live from a device (GET over request/response)
LIVE_RESOURCES = ("status", "containers", "decisions", "policy", "instances")
_LOGIN_DELAY_AFTER = 5
_LOGIN_LOCK_SECONDS = 30.0


@dataclass
class WebContext:
    """What the web layer uses: parts built by the composition root (agent/console/serve.py)."""

    config: ConsoleServiceConfig
    store: FleetStore
    orchestrator: Orchestrator
    requester: Requester
    #: ingest and connection figures for /healthz and the overview
    health: Callable[[], dict[str, Any]] = field(default=lambda: {})
    #: notified when new alerts were stored by this replica (long polls wake at once)
    alerts_changed: threading.Condition = field(default_factory=threading.Condition)


class LoginThrottle:
    """Failed sign-ins per (user, address): after a few, that pair waits before it may try again."""

    def __init__(self) -> None:
        self._failures: dict[tuple[str, str], tuple[int, float]] = {}
        self._lock = threading.Lock()

    def locked_for(self, key: tuple[str, str], now: float) -> float:
        with self._lock:
            count, at = self._failures.get(key, (0, 0.0))
        if count < _LOGIN_DELAY_AFTER:
            return 0.0
        return max(0.0, at + _LOGIN_LOCK_SECONDS - now)

    def failed(self, key: tuple[str, str], now: float) -> None:
        with self._lock:
            count, _ = self._failures.get(key, (0, 0.0))
            self._failures[key] = (count + 1, now)
            if len(self._failures) > 10000:  # bounded: the oldest entries go
                for k in sorted(self._failures, key=lambda k: self._failures[k][1])[:5000]:
                    del self._failures[k]

    def succeeded(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._failures.pop(key, None)


def _when(ts: Any) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ago(ts: Any) -> str:
    if not ts:
        return "-"
    s = max(0, int(time.time() - float(ts)))
    if s < 90:
        return f"{s}s ago"
    if s < 5400:
        return f"{s // 60}m ago"
    if s < 172800:
        return f"{s // 3600}h ago"
    return f"{s // 86400}d ago"


def create_app(ctx: WebContext) -> Flask:
    cfg = ctx.config
    app = Flask(
        __name__,
        template_folder=str(resources.files("agent.console") / "templates"),
        static_folder=str(resources.files("agent.console") / "static"),
    )
    app.config.update(
        SECRET_KEY=ctx.store.secret("session-key"),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=cfg.cookie_secure,
        SESSION_COOKIE_NAME="imageguard_console",
        PERMANENT_SESSION_LIFETIME=timedelta(hours=12),
        WTF_CSRF_CHECK_DEFAULT=False,  # checked below, for cookie-authenticated changes only
        WTF_CSRF_TIME_LIMIT=None,  # bound to the session, which expires itself
        WTF_CSRF_SSL_STRICT=cfg.cookie_secure,
        MAX_CONTENT_LENGTH=1024 * 1024,
        JSON_SORT_KEYS=False,
    )
    csrf = CSRFProtect(app)
    throttle = LoginThrottle()
    users = {u.name: u.password_hash for u in cfg.users}
    tokens = {t.sha256: t.name for t in cfg.tokens}
    app.jinja_env.filters["when"] = _when
    app.jinja_env.filters["ago"] = _ago
    app.jinja_env.globals["csrf_token"] = generate_csrf

    def api_call() -> bool:
        return request.path.startswith("/api/")

    @app.before_request
    def authenticate() -> Any:
        g.started = time.perf_counter()
        g.user = None
        g.by_token = False
        if request.endpoint in ("static", "healthz", "login"):
            return None
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            digest = hashlib.sha256(auth[7:].strip().encode()).hexdigest()
            name = next((n for h, n in tokens.items() if hmac.compare_digest(h, digest)), None)
            if name is None:
                return _error(401, "the API token is not known to this console")
            g.user, g.by_token = f"token:{name}", True
            return None
        user = session.get("user")
        if user not in users:
            if api_call():
                return _error(401, "sign in, or send an API token (Authorization: Bearer ...)")
            return redirect(url_for("login", next=request.full_path if request.method == "GET" else "/"))
        g.user = user
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            csrf.protect()
        return None

    @app.after_request
    def headers(resp: Response) -> Response:
        resp.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
        )
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers.setdefault("Cache-Control", "no-store")
        if "started" in g:  # what the page cost the server (bench/fleet.py reads it)
            resp.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - g.started) * 1000:.1f}"
        return resp

    @app.errorhandler(CSRFError)
    def csrf_failed(exc: CSRFError) -> Any:
        return _error(
            400, f"the request's CSRF token is missing or wrong ({exc.description}); reload the page"
        )

    @app.errorhandler(FleetDbError)
    def db_failed(exc: FleetDbError) -> Any:
        log.error("console: %s", exc)
        return _error(503, f"the console database does not answer: {exc.message}")

    @app.errorhandler(404)
    def not_found(_exc: Any) -> Any:
        return _error(404, "no such page or resource")

    @app.errorhandler(413)
    def too_large(_exc: Any) -> Any:
        return _error(413, "the request is larger than 1 MiB")

    def _error(code: int, message: str) -> Any:
        if api_call() or request.accept_mimetypes.best == "application/json":
            return jsonify({"error": message, "code": code}), code
        return render_template("error.html", code=code, message=message, user=getattr(g, "user", None)), code

    def audit(action: str, target: str = "", **detail: Any) -> None:
        ctx.store.record(g.user or "anonymous", action, target, detail)

    # --- sign-in ---------------------------------------------------------------------------------

    @app.route("/login", methods=["GET", "POST"])
    def login() -> Any:
        error = ""
        if request.method == "POST":
            csrf.protect()
            name = request.form.get("username", "")[:64]
            password = request.form.get("password", "")
            key = (name, request.remote_addr or "")
            now = time.time()
            wait_s = throttle.locked_for(key, now)
            hashed = users.get(name)
            if wait_s:
                error = f"too many failed sign-ins; try again in {wait_s:.0f} s"
            elif hashed is not None and check_password_hash(hashed, password):
                throttle.succeeded(key)
                session.clear()
                session["user"] = name
                session.permanent = True
                ctx.store.record(name, "login", "", {"address": request.remote_addr})
                target = request.args.get("next", "/")
                return redirect(target if target.startswith("/") and not target.startswith("//") else "/")
            else:
                if hashed is None:  # the same work either way: no telling which user names exist
                    check_password_hash(_DUMMY_HASH, password)
                throttle.failed(key, now)
                ctx.store.record(name or "anonymous", "login.failed", "", {"address": request.remote_addr})
                error = "wrong user name or password"
        return render_template("login.html", error=error, user=None), (401 if error else 200)

    @app.post("/logout")
    def logout() -> Any:
        audit("logout")
        session.clear()
        return redirect(url_for("login"))

    @app.get("/healthz")
    def healthz() -> Any:
        doc = ctx.health()
        return jsonify(doc), (200 if doc.get("ok", True) else 503)

    # --- data shared by pages and API ------------------------------------------------------------

    def rollout_view(r: Mapping[str, Any], rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        rows = ctx.store.rollout_devices(r["id"]) if rows is None else rows
        waves: dict[int, list[dict[str, Any]]] = {}
        for row in rows:
            waves.setdefault(int(row["wave"]), []).append(row)
        doc = {k: v for k, v in r.items() if k not in ("lease_until",)}
        doc["progress"] = summary(rows)
        doc["alerts_after_apply"] = ctx.store.alerts_after_apply(r["id"])
        doc["wave_progress"] = [
            {"wave": w, "spec": (r["waves"][w] if w < len(r["waves"]) else ""), **summary(ws)}
            for w, ws in sorted(waves.items())
        ]
        doc["convergence"] = convergence_series(rows, float(r["created_at"]))
        return doc

    def rollouts_list(limit: int = 50) -> list[dict[str, Any]]:
        items = ctx.store.rollouts(limit=limit)
        progress = ctx.store.progress([r["id"] for r in items])
        out = []
        for r in items:
            counts = progress.get(r["id"], {})
            total = sum(counts.values())
            holding = sum(counts.get(s, 0) for s in HOLDS)
            out.append(
                {
                    "id": r["id"],
                    "name": r["name"],
                    "group": r["group_name"],
                    "version": r["version"],
                    "state": r["state"],
                    "reason": r["reason"],
                    "wave": r["wave"],
                    "waves": r["waves"],
                    "created_by": r["created_by"],
                    "created_at": r["created_at"],
                    "targets": total,
                    "holding": holding,
                    "states": counts,
                    "converged": round(100.0 * holding / total, 1) if total else 100.0,
                }
            )
        return out

    def fleet_doc() -> dict[str, Any]:
        doc = ctx.store.overview()
        active = [r for r in rollouts_list(20) if r["state"] in ACTIVE]
        newest: dict[str, int] = {}
        for r in ctx.store.rollouts(limit=500):
            newest[r["group_name"]] = max(newest.get(r["group_name"], 0), int(r["version"]))
        for grp in doc["groups"]:
            v = newest.get(grp["group"])
            grp["newest_version"] = v
            at = grp["versions"].get(str(v), 0) if v is not None else 0
            grp["converged"] = (
                round(100.0 * at / grp["devices"], 1) if v is not None and grp["devices"] else None
            )
        doc["active_rollouts"] = active
        doc["alerts_total"] = ctx.store.count_messages("alerts")
        return doc

    def alerts_chart(window: str) -> dict[str, Any]:
        span, bucket = (86400.0, 3600.0) if window == "24h" else (3600.0, 60.0)
        since = (time.time() - span) // bucket * bucket
        series = ctx.store.histogram("alerts", since, bucket)
        return {"window": "24h" if span > 3600 else "1h", "bucket_seconds": bucket, "series": series}

    # --- pages -----------------------------------------------------------------------------------

    def page(template: str, fragment: str | None = None, **kw: Any) -> Any:
        if request.args.get("fragment") and fragment:
            return render_template(fragment, **kw)
        return render_template(template, user=g.user, **kw)

    @app.get("/")
    def overview() -> Any:
        window = request.args.get("window", "1h")
        return page(
            "overview.html",
            "overview_live.html",
            fleet=fleet_doc(),
            alert_chart=alerts_chart(window),
            alerts=ctx.store.messages(kind="alerts", limit=20),
            rollouts=rollouts_list(10),
        )

    @app.get("/devices")
    def devices_page() -> Any:
        group = request.args.get("group") or None
        online = {"online": True, "offline": False}.get(request.args.get("status", ""))
        return page("devices.html", devices=ctx.store.devices(group=group, online=online), group=group or "")

    @app.get("/devices/<device>")
    def device_page(device: str) -> Any:
        d = ctx.store.device(device)
        if d is None:
            abort(404)
        return page(
            "device.html",
            device=d,
            decisions=ctx.store.messages(kind="verdicts", device=device, limit=20),
            alerts=ctx.store.messages(kind="alerts", device=device, limit=20),
            acks=ctx.store.messages(kind="policy", device=device, limit=20),
            instance_events=ctx.store.messages(kind="instances", device=device, limit=20),
            resources=LIVE_RESOURCES,
        )

    @app.get("/rollouts")
    def rollouts_page() -> Any:
        groups = sorted({gr["group"] for gr in ctx.store.overview()["groups"]})
        return page("rollouts.html", rollouts=rollouts_list(100), groups=groups, error="", form={})

    @app.post("/rollouts")
    def rollouts_create() -> Any:
        form = request.form
        try:
            text = form.get("document", "")
            if "document_file" in request.files and request.files["document_file"].filename:
                text = request.files["document_file"].read().decode("utf-8", "replace")
            try:
                document = json.loads(text)
            except ValueError as exc:
                raise RolloutError(f"the layer is not JSON: {exc}") from None
            targets = [t.strip() for t in form.get("devices", "").replace(",", " ").split() if t.strip()]
            r = ctx.orchestrator.create(
                group=form.get("group", "").strip(),
                document=document,
                user=g.user,
                name=form.get("name", "").strip(),
                targets=targets or None,
                waves=form.get("waves", "") or "1,50%,100%",
                max_rejections=_limit(form.get("max_rejections", "0")),
                max_alerts=_limit(form.get("max_alerts", "0")),
                wave_timeout=float(form.get("wave_timeout") or cfg.wave_timeout_seconds),
                soak_seconds=float(form.get("soak_seconds") or 0),
                start=form.get("start", "now") == "now",
            )
        except (ImageGuardError, ValueError) as exc:
            message = exc.message if isinstance(exc, ImageGuardError) else str(exc)
            groups = sorted({gr["group"] for gr in ctx.store.overview()["groups"]})
            return render_template(
                "rollouts.html",
                user=g.user,
                rollouts=rollouts_list(100),
                groups=groups,
                error=message,
                form=form,
            ), 400
        audit("rollout.create", r["id"], group=r["group_name"], version=r["version"], waves=r["waves"])
        return redirect(url_for("rollout_page", rollout_id=r["id"]))

    @app.get("/rollouts/<rollout_id>")
    def rollout_page(rollout_id: str) -> Any:
        r = ctx.store.rollout(rollout_id)
        if r is None:
            abort(404)
        rows = ctx.store.rollout_devices(rollout_id)
        return page("rollout.html", "rollout_live.html", r=rollout_view(r, rows), rows=rows)

    @app.post("/rollouts/<rollout_id>/<action>")
    def rollout_action(rollout_id: str, action: str) -> Any:
        try:
            result = act(rollout_id, action)
        except RolloutError as exc:
            r = ctx.store.rollout(rollout_id)
            if r is None:
                abort(404)
            rows = ctx.store.rollout_devices(rollout_id)
            return render_template(
                "rollout.html", user=g.user, r=rollout_view(r, rows), rows=rows, error=exc.message
            ), 409
        if action == "rollback":
            return redirect(url_for("rollout_page", rollout_id=result["id"]))
        return redirect(url_for("rollout_page", rollout_id=rollout_id))

    def act(rollout_id: str, action: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        o = ctx.orchestrator
        result: dict[str, Any] = {"id": rollout_id}
        if action == "pause":
            o.pause(rollout_id)
        elif action == "resume":
            o.resume(rollout_id)
        elif action == "abort":
            o.abort(rollout_id, g.user)
        elif action == "rollback":
            result = o.rollback(rollout_id, g.user, (body or {}).get("document"))
        elif action == "dry-run":
            result = o.dry_run(rollout_id, (body or {}).get("wave"))
        else:
            abort(404)
        audit(f"rollout.{action}", rollout_id, result=result.get("id") if action == "rollback" else None)
        return result

    @app.get("/audit")
    def audit_page() -> Any:
        return page("audit.html", entries=ctx.store.audit_log(300))

    # --- JSON API --------------------------------------------------------------------------------

    @app.get("/api/openapi.json")
    def openapi() -> Any:
        text = (resources.files("agent") / "schemas" / "console-api.openapi.json").read_text("utf-8")
        return Response(text, mimetype="application/json")

    @app.get("/api/fleet")
    def api_fleet() -> Any:
        return jsonify(fleet_doc())

    @app.get("/api/devices")
    def api_devices() -> Any:
        group = request.args.get("group") or None
        online = {"true": True, "false": False}.get(request.args.get("online", ""))
        return jsonify({"devices": ctx.store.devices(group=group, online=online)})

    @app.get("/api/devices/<device>")
    def api_device(device: str) -> Any:
        d = ctx.store.device(device)
        if d is None:
            return _error(404, f"no device {device!r} has been seen")
        return jsonify(d)

    @app.get("/api/devices/<device>/live/<resource>")
    def api_device_live(device: str, resource: str) -> Any:
        if resource not in LIVE_RESOURCES:
            return _error(404, f"live resources are {', '.join(LIVE_RESOURCES)}")
        if ctx.store.device(device) is None:
            return _error(404, f"no device {device!r} has been seen")
        try:
            reply = ctx.requester.ask(device, "GET", resource, timeout=cfg.request_timeout_seconds)
        except TimeoutError as exc:
            return _error(504, str(exc))
        except ImageGuardError as exc:
            return _error(502, exc.message)
        return jsonify(
            {
                "device": device,
                "resource": resource,
                "code": reply.code,
                "message": reply.message,
                "body": reply.document(),
            }
        )

    @app.get("/api/alerts")
    def api_alerts() -> Any:
        after = _float(request.args.get("after"))
        wait_s = min(max(_float(request.args.get("wait")) or 0.0, 0.0), 25.0)
        limit = min(max(int(_float(request.args.get("limit")) or 50), 1), 500)
        deadline = time.monotonic() + wait_s
        while True:
            items = ctx.store.messages(kind="alerts", after=after, limit=limit)
            left = deadline - time.monotonic()
            if items or left <= 0 or after is None:
                break
            with ctx.alerts_changed:  # woken by this replica's ingest; another replica's: by the recheck
                ctx.alerts_changed.wait(min(left, 0.1))
        cursor = max((i["received_at"] for i in items), default=after if after is not None else time.time())
        # with a cursor the page is oldest first; "more": ask again at once from the new cursor
        return jsonify({"alerts": items, "cursor": cursor, "more": after is not None and len(items) == limit})

    @app.get("/api/alerts/histogram")
    def api_alert_histogram() -> Any:
        return jsonify(alerts_chart(request.args.get("window", "1h")))

    @app.get("/api/rollouts")
    def api_rollouts() -> Any:
        return jsonify({"rollouts": rollouts_list(200)})

    @app.post("/api/rollouts")
    def api_rollouts_create() -> Any:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return _error(400, "send a JSON object: {group, document, waves?, devices?, ...}")
        try:
            r = ctx.orchestrator.create(
                group=str(body.get("group", "")),
                document=body.get("document"),  # type: ignore[arg-type]
                user=g.user,
                name=str(body.get("name", "")),
                targets=body.get("devices"),
                waves=body.get("waves", "1,50%,100%"),
                max_rejections=body.get("max_rejections", 0),
                max_alerts=body.get("max_alerts", 0),
                wave_timeout=body.get("wave_timeout"),
                soak_seconds=float(body.get("soak_seconds") or 0),
                start=bool(body.get("start", True)),
            )
        except (ImageGuardError, TypeError, ValueError) as exc:
            return _error(400, exc.message if isinstance(exc, ImageGuardError) else str(exc))
        audit("rollout.create", r["id"], group=r["group_name"], version=r["version"], waves=r["waves"])
        return jsonify(rollout_view(r)), 201

    @app.get("/api/rollouts/<rollout_id>")
    def api_rollout(rollout_id: str) -> Any:
        r = ctx.store.rollout(rollout_id)
        if r is None:
            return _error(404, f"no rollout {rollout_id!r}")
        rows = ctx.store.rollout_devices(rollout_id)
        return jsonify({**rollout_view(r, rows), "devices": rows})

    @app.post("/api/rollouts/<rollout_id>/<action>")
    def api_rollout_action(rollout_id: str, action: str) -> Any:
        body = request.get_json(silent=True) if request.data else {}
        try:
            return jsonify(act(rollout_id, action, body if isinstance(body, dict) else {}))
        except RolloutError as exc:
            code = 404 if exc.message.startswith("no rollout") else 409
            return _error(code, exc.message)

    @app.get("/api/audit")
    def api_audit() -> Any:
        return jsonify({"audit": ctx.store.audit_log(500)})

    return app


def _limit(text: str | None) -> int | None:
    text = (text or "").strip()
    if not text:
        return None
    value = int(text)  # ValueError: a clear 400 above
    if value < 0:
        raise ValueError("a threshold must be 0 or more (empty: no limit)")
    return value


def _float(text: str | None) -> float | None:
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


# a real hash of nothing in particular: signing in as an unknown user costs as much as a wrong password
_DUMMY_HASH = "scrypt:32768:8:1$2Yg1cI1vqvRQ0mOf$" + "0" * 128
