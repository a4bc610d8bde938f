"""Durable state in SQLite (WAL): policy layers, decisions, verified digests, telemetry outbox.

Every change is one transaction, so a ``kill -9`` at any moment leaves a consistent database. A corrupt
database or one written by a newer ImageGuard is refused with a clear error; nothing is ever dropped silently.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.core.decision import VerifiedDigest
from agent.core.digest import Digest
from agent.core.instances import InstanceState
from agent.core.policy import DEVICE_LAYER, PolicyLayer
from agent.core.records import DecisionRecord, OutboxMessage
from agent.errors import StateError

SCHEMA_VERSION = 1
DB_NAME = "state.db"
MAX_DECISIONS = 100_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS policy_layers (
    name TEXT PRIMARY KEY, version INTEGER NOT NULL, document TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS decisions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, time TEXT NOT NULL,
    container_id TEXT NOT NULL, verdict TEXT NOT NULL, reason TEXT NOT NULL, record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS decisions_container ON decisions (container_id);
CREATE TABLE IF NOT EXISTS verified_digests (
    digest TEXT NOT NULL, anchor TEXT NOT NULL, anchor_fingerprint TEXT NOT NULL,
    repository TEXT NOT NULL, signature TEXT NOT NULL, verified_at TEXT NOT NULL,
    PRIMARY KEY (digest, anchor));
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, priority INTEGER NOT NULL, kind TEXT NOT NULL,
    topic TEXT NOT NULL, message TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS outbox_priority ON outbox (priority, seq);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, status TEXT NOT NULL, pinned_digest TEXT,
    container_id TEXT, reason TEXT, updated_at TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    seq: int
    kind: str
    topic: str
    message: dict[str, Any]
    priority: int


class Store:
    """All durable state. One connection guarded by a lock: writes are few and small."""

    def __init__(self, state_dir: Path, *, outbox_limit: int = 10_000) -> None:
        self.state_dir = state_dir
        self.path = state_dir / DB_NAME
        self.outbox_limit = outbox_limit
        self._lock = threading.RLock()
        self._inserts = 0
        #: called after each commit that queued telemetry (the MQTT drainer wakes up; no polling)
        self._outbox_listeners: list[Callable[[], None]] = []
        self._outbox_dirty = False
        _prepare_dir(state_dir)
        old_umask = os.umask(0o077)
        try:
            self._db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
            try:
                self._init()
            except BaseException:
                self._db.close()
                raise
        except sqlite3.DatabaseError as exc:
            raise StateError(
                f"state database {self.path} is unreadable or corrupt ({exc}); move it aside to start "
                "with an empty state, or restore it from a backup"
            ) from None
        finally:
            os.umask(old_umask)
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                os.chmod(p, 0o600)

    def _init(self) -> None:
        db = self._db
        db.execute("PRAGMA busy_timeout = 10000")
        # every check reads only: a file we refuse must be left exactly as it was (switching to WAL
        # rewrites the header, so it comes after the checks)
        row = db.execute("PRAGMA quick_check").fetchone()
        if row is None or row[0] != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {row[0] if row else 'no answer'}")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" in tables:
            found = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            try:
                version = int(found[0]) if found else 0
            except (TypeError, ValueError):
                raise StateError(
                    f"state database {self.path} has an unreadable schema_version {found[0]!r}; "
                    "move it aside to start with an empty state, or restore it from a backup"
                ) from None
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"state database {self.path} was written by a newer ImageGuard (schema {version}, this "
                    f"version reads up to {SCHEMA_VERSION}); upgrade ImageGuard or use another state directory"
                )
        elif tables:
            raise StateError(f"{self.path} is an SQLite database, but not an ImageGuard state database")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StateError(f"state database {self.path}: cannot switch to WAL mode (got {mode})")
        db.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: consistent after any crash
        db.execute("PRAGMA foreign_keys = ON")
        with self.transaction() as tx:
            for statement in _split(_SCHEMA):
                tx.execute(statement)
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?) ON CONFLICT(key) DO NOTHING",
                (str(SCHEMA_VERSION),),
            )

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: other processes wait instead of failing midway)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._outbox_dirty = False
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")
                if self._outbox_dirty:
                    self._outbox_dirty = False
                    for listener in self._outbox_listeners:
                        listener()

    def add_outbox_listener(self, fn: Callable[[], None]) -> None:
        """``fn()`` runs after every commit that queued telemetry; keep it short (set an event)."""
        self._outbox_listeners.append(fn)

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, args))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- policy ----------------------------------------------------------------------------------

    def layers(self) -> list[PolicyLayer]:
        out = []
        for name, document in self._query("SELECT name, document FROM policy_layers ORDER BY name"):
            out.append(PolicyLayer.from_document(json.loads(document), name, f"stored policy layer {name!r}"))
        return out

    def layer(self, name: str = DEVICE_LAYER) -> PolicyLayer:
        rows = self._query("SELECT document FROM policy_layers WHERE name = ?", (name,))
        if not rows:
            return PolicyLayer(name=name)
        return PolicyLayer.from_document(json.loads(rows[0][0]), name, f"stored policy layer {name!r}")

    @staticmethod
    def write_layer(tx: sqlite3.Connection, layer: PolicyLayer, now: str) -> None:
        tx.execute(
            "INSERT INTO policy_layers (name, version, document, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET version=excluded.version, document=excluded.document, "
            "updated_at=excluded.updated_at",
            (layer.name, layer.version, json.dumps(layer.to_document(), sort_keys=True), now),
        )

    @staticmethod
    def read_layer(tx: sqlite3.Connection, name: str) -> PolicyLayer:
        row = tx.execute("SELECT document FROM policy_layers WHERE name = ?", (name,)).fetchone()
        if row is None:
            return PolicyLayer(name=name)
        return PolicyLayer.from_document(json.loads(row[0]), name, f"stored policy layer {name!r}")

    @staticmethod
    def read_layers(tx: sqlite3.Connection) -> list[PolicyLayer]:
        return [
            PolicyLayer.from_document(json.loads(doc), name, f"stored policy layer {name!r}")
            for name, doc in tx.execute("SELECT name, document FROM policy_layers")
        ]

    # -- decisions and outbox --------------------------------------------------------------------

    def record_decision(self, record: DecisionRecord, telemetry: Iterable[OutboxMessage] = ()) -> None:
        """Store a decision and its telemetry messages in one transaction."""
        with self.transaction() as tx:
            tx.execute(
                "INSERT INTO decisions (id, time, container_id, verdict, reason, record) VALUES (?,?,?,?,?,?)",
                (
                    record.id,
                    record.time,
                    record.container_id,
                    record.verdict,
                    record.reason.value,
                    json.dumps(record.to_dict(), sort_keys=True),
                ),
            )
            for msg in telemetry:
                self.enqueue(tx, msg, record.time)
            self._inserts += 1
            if self._inserts % 1000 == 0:
                tx.execute(
                    "DELETE FROM decisions WHERE seq <= (SELECT MAX(seq) FROM decisions) - ?",
                    (MAX_DECISIONS,),
                )

    def decisions(self, limit: int = 50, before_seq: int | None = None) -> list[tuple[int, dict[str, Any]]]:
        """Newest first; page with ``before_seq`` (the smallest seq of the previous page)."""
        if before_seq is None:
            rows = self._query("SELECT seq, record FROM decisions ORDER BY seq DESC LIMIT ?", (limit,))
        else:
            rows = self._query(
                "SELECT seq, record FROM decisions WHERE seq < ? ORDER BY seq DESC LIMIT ?",
                (before_seq, limit),
            )
        return [(int(seq), json.loads(rec)) for seq, rec in rows]

    def last_decision_for(self, container_id: str) -> dict[str, Any] | None:
        rows = self._query(
            "SELECT record FROM decisions WHERE container_id = ? ORDER BY seq DESC LIMIT 1", (container_id,)
        )
        return json.loads(rows[0][0]) if rows else None

    def decision_count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM decisions")[0][0])

    def enqueue(self, tx: sqlite3.Connection, msg: OutboxMessage, now: str) -> bool:
        """Add a telemetry message inside ``tx``. When full, the least important message goes first."""
        count = tx.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        if count >= self.outbox_limit:
            victim = tx.execute(
                "SELECT seq, kind, priority FROM outbox ORDER BY priority DESC, seq ASC LIMIT 1"
            ).fetchone()
            if victim is None or victim[2] < msg.priority:
                self._bump(tx, f"outbox_dropped.{msg.kind}")
                return False
            tx.execute("DELETE FROM outbox WHERE seq = ?", (victim[0],))
            self._bump(tx, f"outbox_dropped.{victim[1]}")
        tx.execute(
            "INSERT INTO outbox (priority, kind, topic, message, created_at) VALUES (?,?,?,?,?)",
            (msg.priority, msg.kind, msg.topic, json.dumps(msg.message, sort_keys=True), now),
        )
        self._outbox_dirty = True
        return True

    def outbox_add(self, messages: Iterable[OutboxMessage], now: str) -> None:
        with self.transaction() as tx:
            for msg in messages:
                self.enqueue(tx, msg, now)

    def outbox_peek(self, limit: int = 100, after_seq: int = 0) -> list[QueuedMessage]:
        """Oldest first: telemetry goes out in the order it was recorded."""
        rows = self._query(
            "SELECT seq, kind, topic, message, priority FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        )
        return [QueuedMessage(int(s), k, t, json.loads(m), int(p)) for s, k, t, m, p in rows]

    def outbox_ack(self, seqs: Iterable[int]) -> None:
        seqs = list(seqs)
        if not seqs:
            return
        with self.transaction() as tx:
            tx.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])

    def outbox_size(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM outbox")[0][0])

    # -- counters --------------------------------------------------------------------------------

    @staticmethod
    def _bump(tx: sqlite3.Connection, name: str, by: int = 1) -> None:
        tx.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
            (name, by, by),
        )

    def bump(self, name: str, by: int = 1) -> None:
        with self.transaction() as tx:
            self._bump(tx, name, by)

    def counters(self) -> dict[str, int]:
        return {name: int(v) for name, v in self._query("SELECT name, value FROM counters ORDER BY name")}

    # -- verified digests ------------------------------------------------------------------------

    def verified(self) -> dict[Digest, tuple[VerifiedDigest, ...]]:
        out: dict[Digest, list[VerifiedDigest]] = {}
        for d, a, fp, repo, sig, at in self._query(
            "SELECT digest, anchor, anchor_fingerprint, repository, signature, verified_at FROM verified_digests"
        ):
            digest = Digest(d)
            out.setdefault(digest, []).append(VerifiedDigest(digest, a, fp, repo, sig, at))
        return {k: tuple(v) for k, v in out.items()}

    def add_verified(self, v: VerifiedDigest) -> None:
        with self.transaction() as tx:
            tx.execute(
                "INSERT INTO verified_digests (digest, anchor, anchor_fingerprint, repository, signature, "
                "verified_at) VALUES (?,?,?,?,?,?) ON CONFLICT(digest, anchor) DO UPDATE SET "
                "anchor_fingerprint=excluded.anchor_fingerprint, repository=excluded.repository, "
                "signature=excluded.signature, verified_at=excluded.verified_at",
                (str(v.digest), v.anchor, v.anchor_fingerprint, v.repository, v.signature, v.verified_at),
            )

    @staticmethod
    def revoke_verified(tx: sqlite3.Connection, keep: dict[str, str]) -> int:
        """Delete digests verified by anchors that are gone or changed; ``keep`` maps name -> fingerprint."""
        rows = tx.execute("SELECT digest, anchor, anchor_fingerprint FROM verified_digests").fetchall()
        doomed = [(d, a) for d, a, fp in rows if keep.get(a) != fp]
        tx.executemany("DELETE FROM verified_digests WHERE digest = ? AND anchor = ?", doomed)
        return len(doomed)

    # -- managed instances (agent/runtime/instances.py writes, the CLI and service read) ---------

    def instance_states(self) -> dict[str, InstanceState]:
        rows = self._query(
            "SELECT name, spec, status, pinned_digest, container_id, reason, updated_at FROM instances"
        )
        return {row[0]: InstanceState.from_row(*row) for row in rows}

    def put_instance_state(self, state: InstanceState, telemetry: Iterable[OutboxMessage] = ()) -> None:
        """Write one instance's state and its telemetry in one transaction."""
        with self.transaction() as tx:
            tx.execute(
                "INSERT INTO instances (name, spec, status, pinned_digest, container_id, reason, updated_at) "
                "VALUES (?,?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET spec=excluded.spec, "
                "status=excluded.status, pinned_digest=excluded.pinned_digest, "
                "container_id=excluded.container_id, reason=excluded.reason, updated_at=excluded.updated_at",
                (
                    state.name,
                    json.dumps(state.meta(), sort_keys=True),
                    state.status,
                    str(state.pinned_digest) if state.pinned_digest else None,
                    state.container_id,
                    state.reason,
                    state.updated_at,
                ),
            )
            for msg in telemetry:
                self.enqueue(tx, msg, state.updated_at)

    def delete_instance_state(
        self, name: str, telemetry: Iterable[OutboxMessage] = (), now: str = ""
    ) -> None:
        with self.transaction() as tx:
            tx.execute("DELETE FROM instances WHERE name = ?", (name,))
            for msg in telemetry:
                self.enqueue(tx, msg, now)


def _split(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _prepare_dir(state_dir: Path) -> None:
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"cannot create state directory {state_dir}: {exc.strerror}") from None
    if not os.access(state_dir, os.W_OK | os.X_OK):
        raise StateError(f"state directory {state_dir} is not writable by this user (uid {os.getuid()})")
    mode = state_dir.stat().st_mode & 0o777
    if mode & 0o077:
        try:
            os.chmod(state_dir, 0o700)
        except OSError as exc:
            raise StateError(
                f"state directory {state_dir} is accessible to others and cannot be fixed: {exc}"
            ) from None
