"""The fleet console's database: what every device said, the inventory derived from it, rollouts, audit.

SQLAlchemy Core over SQLite (the embedded default) or PostgreSQL (``postgresql+psycopg://``); the schema is
created and upgraded by Alembic (``agent/console/migrations``), never by ``create_all``, so a fleet's
database moves forward with the code.

Exactly once: every telemetry and lifecycle message is stored under its message id (the ``id`` of its body,
else a hash of topic and payload) with ``INSERT ... ON CONFLICT DO NOTHING``, and what it changes in the
inventory is applied in the same transaction only when the insert took. A redelivered or twice-received
message therefore changes nothing, whichever replica stores it.

Order per device: replicas may store one device's messages in any order. Inventory fields keep the
message that is newest by the device's own clock and outbox sequence (``imageguard.seq``), so the end
state is the one the device's order gives.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from agent.errors import ConfigError, ImageGuardError

log = logging.getLogger(__name__)

metadata = sa.MetaData()

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("device", sa.String(255), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("device_ts", sa.BigInteger, nullable=False),
    sa.Column("seq", sa.BigInteger),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("replica", sa.String(64), nullable=False),
    sa.Column("data", sa.Text, nullable=False),
    sa.Index("ix_messages_device_order", "device", "device_ts", "seq"),
    sa.Index("ix_messages_kind_received", "kind", "received_at"),
)

devices = sa.Table(
    "devices",
    metadata,
    sa.Column("device", sa.String(255), primary_key=True),
    sa.Column("first_seen", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
    sa.Column("online", sa.Boolean, nullable=False, default=False),
    sa.Column("status_since", sa.Float, nullable=False),
    sa.Column("status_ts", sa.BigInteger, nullable=False, default=0),
    sa.Column("groups", sa.Text, nullable=False, default=""),
    sa.Column("display_name", sa.Text, nullable=False, default=""),
    sa.Column("agent_version", sa.Text, nullable=False, default=""),
    sa.Column("policy_version", sa.Text, nullable=False, default=""),
    sa.Column("policy_layers", sa.Text, nullable=False, default=""),
    sa.Column("enforcement", sa.Text, nullable=False, default=""),
    sa.Column("outbox_dropped", sa.BigInteger, nullable=False, default=0),
    sa.Column("records_lost", sa.BigInteger, nullable=False, default=0),
    sa.Column("decisions", sa.BigInteger, nullable=False, default=0),
    sa.Column("alerts", sa.BigInteger, nullable=False, default=0),
    sa.Column("last_decision", sa.Text),
    sa.Column("last_decision_ts", sa.BigInteger),
    sa.Column("last_decision_seq", sa.BigInteger),
    sa.Column("last_alert", sa.Text),
    sa.Column("last_alert_ts", sa.BigInteger),
    sa.Column("last_alert_seq", sa.BigInteger),
)

rollouts = sa.Table(
    "rollouts",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("group_name", sa.String(255), nullable=False),
    sa.Column("targets", sa.Text),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("document", sa.Text, nullable=False),
    sa.Column("waves", sa.Text, nullable=False),
    sa.Column("max_rejections", sa.Integer),
    sa.Column("max_alerts", sa.Integer),
    sa.Column("wave_timeout", sa.Float, nullable=False),
    sa.Column("soak_seconds", sa.Float, nullable=False, server_default="0"),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("wave", sa.Integer, nullable=False, default=-1),
    sa.Column("wave_started_at", sa.Float),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("created_by", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.Column("rollback_of", sa.String(32)),
    sa.Column("lease_owner", sa.String(64)),
    sa.Column("lease_until", sa.Float, nullable=False, default=0.0),
    sa.Index("ix_rollouts_state", "state"),
)

rollout_devices = sa.Table(
    "rollout_devices",
    metadata,
    sa.Column("rollout_id", sa.String(32), sa.ForeignKey("rollouts.id"), primary_key=True),
    sa.Column("device", sa.String(255), primary_key=True),
    sa.Column("wave", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("sent_at", sa.Float),
    sa.Column("answered_at", sa.Float),
    sa.Column("dry_run", sa.Text),
    sa.Index("ix_rollout_devices_device", "device"),
)

audit = sa.Table(
    "audit",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("user", sa.String(64), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("target", sa.Text, nullable=False, default=""),
    sa.Column("detail", sa.Text, nullable=False, default="{}"),
)

settings = sa.Table(
    "settings",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

#: rollout states
RUNNING, PAUSED, COMPLETED, STOPPED, ABORTED = "running", "paused", "completed", "stopped", "aborted"
ACTIVE = (RUNNING, PAUSED)
#: per-device rollout states
PENDING, SENT, APPLIED, UNCHANGED, REJECTED, OFFLINE = (
    "pending",
    "sent",
    "applied",
    "unchanged",
    "rejected",
    "offline",
)
HOLDS = (APPLIED, UNCHANGED)


ALERTS_CHANNEL = "imageguard_alerts"


class FleetDbError(ImageGuardError):
    """The console's database cannot be used (unreachable, wrong schema, refused a write)."""


@dataclass(frozen=True)
class Answer:
    """A device's reply to a rollout's delivery."""

    rollout_id: str
    device: str
    state: str
    reason: str
    at: float


@dataclass(frozen=True)
class Stored:
    """One decoded message, ready to store."""

    id: str
    device: str
    kind: str
    device_ts: int
    seq: int | None
    data: Mapping[str, Any]


def _dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def default_url(state_dir: Path) -> str:
    return f"sqlite:///{state_dir / 'console.db'}"


def _newer(ts_col: sa.ColumnElement[Any], seq_col: sa.ColumnElement[Any], ts: Any, seq: Any) -> Any:
    """The stored (ts, seq) is older than the message's: a column that was never set is older than all."""
    s = sa.func.coalesce(seq, -1)
    return sa.or_(ts_col.is_(None), ts_col < ts, sa.and_(ts_col == ts, sa.func.coalesce(seq_col, -1) < s))


def _order(m: Stored) -> tuple[int, int]:
    return (m.device_ts, -1 if m.seq is None else m.seq)


@dataclass
class _DeviceChange:
    """What one batch's new messages change for one device."""

    decisions: int = 0
    alerts: int = 0
    last_decision: Stored | None = None
    last_alert: Stored | None = None
    lifecycle: Stored | None = None
    drops_total: int | None = None

    def add(self, m: Stored) -> None:
        if m.kind == "verdicts":
            self.decisions += 1
            if self.last_decision is None or _order(m) > _order(self.last_decision):
                self.last_decision = m
        elif m.kind == "alerts":
            self.alerts += 1
            if self.last_alert is None or _order(m) > _order(self.last_alert):
                self.last_alert = m
        elif m.kind in ("BIRTH", "APPS", "DC", "LWT"):
            if self.lifecycle is None or m.device_ts >= self.lifecycle.device_ts:
                self.lifecycle = m
        elif m.kind == "drops":
            self.drops_total = max(self.drops_total or 0, _int(m.data.get("total")))


def _new_device(name: str, now: float) -> dict[str, Any]:
    return {
        "device": name,
        "first_seen": now,
        "last_seen": now,
        "online": False,
        "status_since": now,
        "status_ts": 0,
        "groups": "",
        "display_name": "",
        "agent_version": "",
        "policy_version": "",
        "policy_layers": "",
        "enforcement": "",
        "outbox_dropped": 0,
        "records_lost": 0,
        "decisions": 0,
        "alerts": 0,
    }


def _birth_params(device: str, m: Stored, now: float) -> dict[str, Any]:
    data = m.data
    groups = [g for g in str(data.get("imageguard_groups", "")).split(",") if g]
    return {
        "b_device": device,
        "b_ts": m.device_ts,
        "b_now": now,
        "b_groups": "," + ",".join(groups) + "," if groups else "",
        "b_name": str(data.get("display_name", "")),
        "b_version": str(data.get("imageguard_version", "")),
        "b_policy": str(data.get("imageguard_policy_version", "")),
        "b_layers": str(data.get("imageguard_policy_layers", "")),
        "b_mode": str(data.get("imageguard_enforcement", "")),
        "b_dropped": _int(data.get("imageguard_outbox_dropped")),
        "b_lost": _int(data.get("imageguard_records_lost")),
    }


class FleetStore:
    """All of the console's state. Thread-safe (SQLAlchemy's pool); every method is one transaction."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if url.startswith("sqlite"):
            # one file, many threads: WAL lets readers go on while the ingest commits
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs.update(pool_pre_ping=True, pool_size=8, max_overflow=8)
        try:
            self.engine: Engine = sa.create_engine(url, **kwargs)
        except (sa.exc.ArgumentError, ImportError) as exc:
            raise ConfigError(f"console database {url!r} cannot be used: {exc}") from None
        self.dialect = self.engine.dialect.name
        if self.dialect == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)

    def close(self) -> None:
        self.engine.dispose()

    # --- schema ----------------------------------------------------------------------------------

    def migrate(self, target: str = "head") -> str:
        """Bring the schema to the newest revision (Alembic), or to ``target``; returns the revision."""
        from alembic import command
        from alembic.config import Config as AlembicConfig
        from alembic.runtime.migration import MigrationContext

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(resources.files("agent.console") / "migrations"))
        try:
            before = self.revision()
            with self.engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, target)
            with self.engine.connect() as conn:
                rev = MigrationContext.configure(conn).get_current_revision()
        except sa.exc.SQLAlchemyError as exc:
            raise FleetDbError(f"console database {self._where()}: cannot migrate: {_short(exc)}") from None
        if rev != before:
            log.info("console database %s migrated from %s to %s", self._where(), before or "empty", rev)
        return rev or ""

    def revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self._read() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def _where(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def _tx(self, *, write: bool = True) -> Iterator[Connection]:
        """One transaction (committed on success), or with ``write=False`` one connection to read from;
        every database failure becomes :class:`FleetDbError`."""
        try:
            with self.engine.begin() if write else self.engine.connect() as conn:
                yield conn
        except sa.exc.SQLAlchemyError as exc:
            raise FleetDbError(f"console database {self._where()}: {_short(exc)}") from None

    def _read(self) -> AbstractContextManager[Connection]:
        return self._tx(write=False)

    def _insert(self, table: sa.Table) -> Any:
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table)
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table)

    # --- settings --------------------------------------------------------------------------------

    def secret(self, name: str) -> str:
        """A random secret made once and shared by every replica (the session-signing key)."""
        with self._tx() as conn:
            conn.execute(
                self._insert(settings)
                .values(name=name, value=secrets.token_hex(32))
                .on_conflict_do_nothing(index_elements=["name"])
            )
            return str(conn.execute(sa.select(settings.c.value).where(settings.c.name == name)).scalar_one())

    # --- ingest ----------------------------------------------------------------------------------

    def store_messages(self, batch: Sequence[Stored], replica: str, now: float | None = None) -> int:
        """Store a batch in one transaction; returns how many were new (the rest were duplicates).

        A handful of statements per batch, not per message: the messages in one multi-row insert that
        returns the ids that were new, then one update per device of what those new messages change.
        Device rows are updated in name order, so replicas committing at once never deadlock.
        """
        now = time.time() if now is None else now
        unique: dict[str, Stored] = {}
        for m in batch:  # a batch may hold a redelivered copy of one of its own messages
            unique.setdefault(m.id, m)
        if not unique:
            return 0
        names = sorted({m.device for m in unique.values()})
        with self._tx() as conn:
            conn.execute(
                self._insert(devices).on_conflict_do_nothing(index_elements=["device"]),
                [_new_device(n, now) for n in names],
            )
            inserted = conn.execute(
                self._insert(messages).on_conflict_do_nothing(index_elements=["id"]).returning(messages.c.id),
                [
                    {
                        "id": m.id,
                        "device": m.device,
                        "kind": m.kind,
                        "device_ts": m.device_ts,
                        "seq": m.seq,
                        # a microsecond apart: a live feed's cursor never falls between two of one batch
                        "received_at": now + i * 1e-6,
                        "replica": replica,
                        "data": _dumps(m.data),
                    }
                    for i, m in enumerate(unique.values())
                ],
            )
            fresh = {row.id for row in inserted}  # RETURNING gives only rows that were new
            new = [m for m in unique.values() if m.id in fresh]
            if new:
                self._apply(conn, new, now)
            if self.dialect == "postgresql" and any(m.kind == "alerts" for m in new):
                # delivered at commit to every replica's listener: their dashboards' long polls wake at once
                conn.execute(sa.text(f"SELECT pg_notify('{ALERTS_CHANNEL}', '')"))
        return len(new)

    def listen_alerts(self, on_alert: Callable[[], None], stop: threading.Event) -> None:
        """PostgreSQL only: call ``on_alert`` whenever any replica stored new alerts (LISTEN/NOTIFY).
        Runs until ``stop``; reconnects after a failure. The caller gives it a thread."""
        import psycopg

        dsn = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        while not stop.is_set():
            try:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute(f"LISTEN {ALERTS_CHANNEL}")
                    while not stop.is_set():
                        if any(True for _ in conn.notifies(timeout=1.0, stop_after=1)):
                            on_alert()
            except psycopg.Error as exc:
                log.warning("console: alert notifications from the database stopped (%s); retrying", exc)
                stop.wait(2.0)

    def _apply(self, conn: Connection, new: Sequence[Stored], now: float) -> None:
        """What new messages change in the inventory (and in rollouts: acknowledgements)."""
        per: dict[str, _DeviceChange] = {}
        for m in new:  # arrival order; newest-by-device-order is chosen with (ts, seq) below
            per.setdefault(m.device, _DeviceChange()).add(m)
        d, bp = devices.c, sa.bindparam
        mine = d.device == bp("b_device")
        order = sorted(per)
        conn.execute(
            sa.update(devices)
            .where(mine)
            .values(
                last_seen=bp("b_now"),
                decisions=d.decisions + bp("b_decisions"),
                alerts=d.alerts + bp("b_alerts"),
            ),
            [
                {"b_device": k, "b_now": now, "b_decisions": per[k].decisions, "b_alerts": per[k].alerts}
                for k in order
            ],
        )
        life = [(k, lc) for k in order if (lc := per[k].lifecycle) is not None]
        births = [(k, m) for k, m in life if m.kind in ("BIRTH", "APPS")]
        if births:
            conn.execute(
                sa.update(devices)
                .where(mine, d.status_ts <= bp("b_ts"))
                .values(
                    online=True,
                    status_since=sa.case((d.online.is_(True), d.status_since), else_=bp("b_now")),
                    status_ts=bp("b_ts"),
                    groups=bp("b_groups"),
                    display_name=bp("b_name"),
                    agent_version=bp("b_version"),
                    policy_version=bp("b_policy"),
                    policy_layers=bp("b_layers"),
                    enforcement=bp("b_mode"),
                    outbox_dropped=bp("b_dropped"),
                    records_lost=bp("b_lost"),
                ),
                [_birth_params(k, m, now) for k, m in births],
            )
        gone = [(k, m) for k, m in life if m.kind in ("DC", "LWT")]
        if gone:
            conn.execute(
                sa.update(devices)
                .where(mine, d.status_ts <= bp("b_ts"))
                .values(
                    online=False,
                    status_since=sa.case((d.online.is_(True), bp("b_now")), else_=d.status_since),
                    status_ts=bp("b_ts"),
                ),
                [{"b_device": k, "b_ts": m.device_ts, "b_now": now} for k, m in gone],
            )
        for field, ts_col, seq_col in (
            ("last_decision", d.last_decision_ts, d.last_decision_seq),
            ("last_alert", d.last_alert_ts, d.last_alert_seq),
        ):
            rows = [(k, getattr(per[k], field)) for k in order if getattr(per[k], field) is not None]
            if not rows:
                continue
            conn.execute(
                sa.update(devices)
                .where(mine, _newer(ts_col, seq_col, bp("b_ts"), bp("b_seq")))
                .values({field: bp("b_doc"), ts_col.key: bp("b_ts"), seq_col.key: bp("b_seq")}),
                [
                    {"b_device": k, "b_doc": _dumps(m.data), "b_ts": m.device_ts, "b_seq": m.seq}
                    for k, m in rows
                ],
            )
        drops = [(k, per[k].drops_total) for k in order if per[k].drops_total is not None]
        if drops:
            conn.execute(
                sa.update(devices)
                .where(mine, d.outbox_dropped < bp("b_total"))
                .values(outbox_dropped=bp("b_total")),
                [{"b_device": k, "b_total": t} for k, t in drops],
            )
        for m in new:
            if m.kind == "policy":
                self._acknowledge(conn, m, now)
                self._holds(conn, m)

    def _holds(self, conn: Connection, m: Stored) -> None:
        """An applied or unchanged acknowledgement says which version of a layer the device holds now (its
        birth said so only at its last connect)."""
        layer, version, status = m.data.get("layer"), m.data.get("version"), m.data.get("status")
        if status not in HOLDS or not isinstance(layer, str) or not isinstance(version, int):
            return
        d = devices.c
        row = conn.execute(sa.select(d.policy_layers).where(d.device == m.device)).first()
        if row is None:
            return
        held = dict(p.split("=", 1) for p in str(row[0]).split(",") if "=" in p)
        if _int(held.get(layer)) >= version and layer in held:
            return
        held[layer] = str(version)
        values: dict[str, Any] = {"policy_layers": ",".join(f"{k}={v}" for k, v in sorted(held.items()))}
        if isinstance(m.data.get("policy_version"), int):
            values["policy_version"] = str(m.data["policy_version"])
        conn.execute(sa.update(devices).where(d.device == m.device).values(**values))

    def _acknowledge(self, conn: Connection, m: Stored, now: float) -> None:
        """A policy acknowledgement answers the device's row in every active rollout of that layer version."""
        data = m.data
        layer, version, status = data.get("layer"), data.get("version"), data.get("status")
        if not isinstance(layer, str) or not layer.startswith("group:") or status not in (*HOLDS, REJECTED):
            return
        reason = str(data.get("reason") or "")
        if status == REJECTED and data.get("detail"):
            reason = f"{reason}: {data['detail']}" if reason else str(data["detail"])
        ids = sa.select(rollouts.c.id).where(
            rollouts.c.group_name == layer.removeprefix("group:"),
            rollouts.c.version == version,
            rollouts.c.state.in_((*ACTIVE, COMPLETED, STOPPED)),
        )
        rd = rollout_devices.c
        conn.execute(
            sa.update(rollout_devices)
            .where(rd.rollout_id.in_(ids), rd.device == m.device, rd.state.in_((SENT, OFFLINE)))
            .values(state=status, reason=reason[:2000], answered_at=now)
        )

    # --- inventory -------------------------------------------------------------------------------

    def devices(self, *, group: str | None = None, online: bool | None = None) -> list[dict[str, Any]]:
        q = sa.select(devices).order_by(devices.c.device)
        if group:
            q = q.where(devices.c.groups.contains(f",{group},"))
        if online is not None:
            q = q.where(devices.c.online.is_(online))
        with self._read() as conn:
            return [_device(r) for r in conn.execute(q).mappings()]

    def device(self, device: str) -> dict[str, Any] | None:
        with self._read() as conn:
            row = conn.execute(sa.select(devices).where(devices.c.device == device)).mappings().first()
        return None if row is None else _device(row)

    def overview(self) -> dict[str, Any]:
        """Counts for the fleet page, in a handful of aggregate queries (no per-device work)."""
        d = devices.c
        with self._read() as conn:
            total, online = conn.execute(
                sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(sa.case((d.online, 1), else_=0)), 0))
            ).one()
            modes: dict[str, int] = {
                str(k): int(v)
                for k, v in conn.execute(sa.select(d.enforcement, sa.func.count()).group_by(d.enforcement))
            }
            group_rows = conn.execute(sa.select(d.groups, d.online, d.policy_layers)).all()
        groups: dict[str, dict[str, Any]] = {}
        for text, is_online, layers in group_rows:
            versions = dict(p.split("=", 1) for p in str(layers).split(",") if "=" in p)
            for g in (g for g in str(text).split(",") if g):
                entry = groups.setdefault(g, {"group": g, "devices": 0, "online": 0, "versions": {}})
                entry["devices"] += 1
                entry["online"] += 1 if is_online else 0
                v = versions.get(f"group:{g}", "0")
                entry["versions"][v] = entry["versions"].get(v, 0) + 1
        return {
            "devices": int(total),
            "online": int(online),
            "offline": int(total) - int(online),
            "enforcement": {k or "unknown": v for k, v in modes.items()},
            "groups": sorted(groups.values(), key=lambda e: e["group"]),
        }

    def messages(
        self,
        *,
        kind: str | None = None,
        device: str | None = None,
        after: float | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """Newest first (by arrival). With ``after`` (a live feed's cursor), what arrived since, oldest
        first: a feed that pages forward from its cursor misses nothing, however many came at once."""
        m = messages.c
        order = (m.received_at, m.id) if after is not None else (m.received_at.desc(), m.id)
        q = sa.select(messages).order_by(*order).limit(limit)
        if kind:
            q = q.where(m.kind == kind)
        if device:
            q = q.where(m.device == device)
        if after is not None:
            q = q.where(m.received_at > after)
        with self._read() as conn:
            return [
                {
                    "id": r.id,
                    "device": r.device,
                    "kind": r.kind,
                    "device_time_ms": r.device_ts,
                    "seq": r.seq,
                    "received_at": r.received_at,
                    "data": _loads(r.data),
                }
                for r in conn.execute(q)
            ]

    def count_messages(self, kind: str | None = None) -> int:
        q = sa.select(sa.func.count()).select_from(messages)
        if kind:
            q = q.where(messages.c.kind == kind)
        with self._read() as conn:
            return int(conn.execute(q).scalar_one())

    def histogram(self, kind: str, since: float, bucket: float) -> list[tuple[float, int]]:
        """Messages of ``kind`` per ``bucket`` seconds since ``since`` (alerts over time)."""
        m = messages.c
        slot = sa.func.floor((m.received_at - since) / bucket)
        q = (
            sa.select(slot.label("slot"), sa.func.count())
            .where(m.kind == kind, m.received_at >= since)
            .group_by("slot")
        )
        with self._read() as conn:
            got = {int(s): int(n) for s, n in conn.execute(q)}
        slots = int((time.time() - since) // bucket) + 1
        return [(since + i * bucket, got.get(i, 0)) for i in range(slots)]

    # --- rollouts --------------------------------------------------------------------------------

    def create_rollout(self, row: Mapping[str, Any], members: Sequence[tuple[str, int]]) -> None:
        with self._tx() as conn:
            conn.execute(sa.insert(rollouts).values(**_encode_rollout(row)))
            if members:
                conn.execute(
                    sa.insert(rollout_devices),
                    [{"rollout_id": row["id"], "device": d, "wave": w, "state": PENDING} for d, w in members],
                )

    def rollout(self, rollout_id: str) -> dict[str, Any] | None:
        with self._read() as conn:
            row = conn.execute(sa.select(rollouts).where(rollouts.c.id == rollout_id)).mappings().first()
        return None if row is None else _decode_rollout(row)

    def rollouts(self, *, states: Iterable[str] | None = None, limit: int = 100) -> list[dict[str, Any]]:
        q = sa.select(rollouts).order_by(rollouts.c.created_at.desc()).limit(limit)
        if states is not None:
            q = q.where(rollouts.c.state.in_(tuple(states)))
        with self._read() as conn:
            return [_decode_rollout(r) for r in conn.execute(q).mappings()]

    def rollout_devices(self, rollout_id: str) -> list[dict[str, Any]]:
        rd = rollout_devices.c
        q = sa.select(rollout_devices).where(rd.rollout_id == rollout_id).order_by(rd.wave, rd.device)
        with self._read() as conn:
            return [dict(r, dry_run=_loads(r["dry_run"])) for r in conn.execute(q).mappings()]

    def progress(self, rollout_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        """Per rollout: how many devices are in each state."""
        if not rollout_ids:
            return {}
        rd = rollout_devices.c
        q = (
            sa.select(rd.rollout_id, rd.state, sa.func.count())
            .where(rd.rollout_id.in_(tuple(rollout_ids)))
            .group_by(rd.rollout_id, rd.state)
        )
        out: dict[str, dict[str, int]] = {r: {} for r in rollout_ids}
        with self._read() as conn:
            for rid, state, n in conn.execute(q):
                out[rid][state] = int(n)
        return out

    def update_rollout(self, rollout_id: str, *, expect: Iterable[str] | None = None, **values: Any) -> bool:
        """Change a rollout; with ``expect``, only while its state is one of those (True if it changed)."""
        q = sa.update(rollouts).where(rollouts.c.id == rollout_id)
        if expect is not None:
            q = q.where(rollouts.c.state.in_(tuple(expect)))
        with self._tx() as conn:
            return bool(conn.execute(q.values(updated_at=time.time(), **values)).rowcount)

    def lease(self, rollout_id: str, owner: str, seconds: float, now: float | None = None) -> bool:
        """Take or renew the right to drive a rollout: one replica at a time, taken over when it lapses."""
        now = time.time() if now is None else now
        r = rollouts.c
        q = (
            sa.update(rollouts)
            .where(r.id == rollout_id, sa.or_(r.lease_owner == owner, r.lease_until < now))
            .values(lease_owner=owner, lease_until=now + seconds)
        )
        with self._tx() as conn:
            return bool(conn.execute(q).rowcount)

    def set_devices(
        self, rollout_id: str, devices_: Iterable[str], *, only: Iterable[str] | None = None, **values: Any
    ) -> int:
        names = tuple(devices_)
        if not names:
            return 0
        rd = rollout_devices.c
        q = sa.update(rollout_devices).where(rd.rollout_id == rollout_id, rd.device.in_(names))
        if only is not None:
            q = q.where(rd.state.in_(tuple(only)))
        with self._tx() as conn:
            return int(conn.execute(q.values(**values)).rowcount)

    def answer_devices(self, answers: Sequence[Answer]) -> None:
        """Store replies in one statement; a row that is already answered (its acknowledgement came
        first) keeps that answer."""
        rd, bp = rollout_devices.c, sa.bindparam
        q = (
            sa.update(rollout_devices)
            .where(
                rd.rollout_id == bp("b_rollout"), rd.device == bp("b_device"), rd.state.in_((SENT, OFFLINE))
            )
            .values(state=bp("b_state"), reason=bp("b_reason"), answered_at=bp("b_at"))
        )
        ordered = sorted(answers, key=lambda a: (a.rollout_id, a.device))  # one lock order for every writer
        with self._tx() as conn:
            conn.execute(
                q,
                [
                    {
                        "b_rollout": a.rollout_id,
                        "b_device": a.device,
                        "b_state": a.state,
                        "b_reason": a.reason,
                        "b_at": a.at,
                    }
                    for a in ordered
                ],
            )

    def alerts_after_apply(self, rollout_id: str) -> int:
        """Alerts from this rollout's devices that arrived after the device took the layer."""
        m, rd = messages.c, rollout_devices.c
        q = (
            sa.select(sa.func.count())
            .select_from(messages.join(rollout_devices, m.device == rd.device))
            .where(
                rd.rollout_id == rollout_id,
                rd.state == APPLIED,
                m.kind == "alerts",
                m.received_at >= rd.answered_at,
            )
        )
        with self._read() as conn:
            return int(conn.execute(q).scalar_one())

    def latest_version(self, group: str) -> int:
        q = sa.select(sa.func.max(rollouts.c.version)).where(rollouts.c.group_name == group)
        with self._read() as conn:
            return int(conn.execute(q).scalar_one() or 0)

    # --- audit -----------------------------------------------------------------------------------

    def record(
        self, user: str, action: str, target: str = "", detail: Mapping[str, Any] | None = None
    ) -> None:
        with self._tx() as conn:
            conn.execute(
                sa.insert(audit).values(
                    at=time.time(), user=user, action=action, target=target, detail=_dumps(detail or {})
                )
            )

    def audit_log(self, limit: int = 200) -> list[dict[str, Any]]:
        q = sa.select(audit).order_by(audit.c.id.desc()).limit(limit)
        with self._read() as conn:
            return [dict(r, detail=_loads(r["detail"])) for r in conn.execute(q).mappings()]


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _short(exc: Exception) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _device(row: Mapping[Any, Any]) -> dict[str, Any]:
    d = dict(row)
    d["groups"] = [g for g in str(d["groups"]).split(",") if g]
    d["last_decision"] = _loads(d.pop("last_decision"))
    d["last_alert"] = _loads(d.pop("last_alert"))
    for key in ("last_decision_seq", "last_alert_seq", "status_ts"):
        d.pop(key, None)
    d["online"] = bool(d["online"])
    return d


def _encode_rollout(row: Mapping[str, Any]) -> dict[str, Any]:
    r = dict(row)
    r["document"] = _dumps(r["document"])
    r["waves"] = _dumps(r["waves"])
    r["targets"] = None if r.get("targets") is None else _dumps(r["targets"])
    return r


def _decode_rollout(row: Mapping[Any, Any]) -> dict[str, Any]:
    r = dict(row)
    r["document"] = _loads(r["document"])
    r["waves"] = _loads(r["waves"])
    r["targets"] = _loads(r["targets"])
    return r
