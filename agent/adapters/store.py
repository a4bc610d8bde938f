"""Durable state in SQLite (WAL): policy layers, decisions, verified digests, telemetry outbox.

Every change is one transaction, so a ``kill -9`` at any moment leaves a consistent database. A corrupt
database or one written by a newer ImageGuard is refused with a clear error; nothing is ever dropped silently.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.core.decision import VerifiedDigest
from agent.core.digest import Digest
from agent.core.instances import InstanceState
from agent.core.policy import DEVICE_LAYER, PolicyLayer
from agent.core.records import DecisionRecord, OutboxMessage, utc_now
from agent.errors import ImageGuardError, StateError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DB_NAME = "state.db"
BACKUP_NAME = "state.db.bak"
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
CREATE TABLE IF NOT EXISTS poison_rows (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, table_name TEXT NOT NULL, row_key TEXT NOT NULL,
    raw TEXT NOT NULL, error TEXT NOT NULL, found_at TEXT NOT NULL);
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
    """All durable state. Writes go through one connection under a lock; reads use their own connection,
    so a write waiting for a lock (another process, a slow disk) never holds up a read.

    ``read_only_fallback`` (the agent): when the state filesystem is full the database is opened read-only,
    so the agent enforces from its last good state; writes then fail with :class:`StateError` until
    :meth:`try_writable` succeeds.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        outbox_limit: int = 10_000,
        busy_timeout: float = 10.0,
        read_only_fallback: bool = False,
        create: bool = True,
    ) -> None:
        self.state_dir = state_dir
        self.path = state_dir / DB_NAME
        self.backup_path = state_dir / BACKUP_NAME
        self.outbox_limit = outbox_limit
        self.busy_timeout = busy_timeout
        self._lock = threading.RLock()
        self._rlock = threading.Lock()
        self._inserts = 0
        #: called after each commit that queued telemetry (the MQTT drainer wakes up; no polling)
        self._outbox_listeners: list[Callable[[], None]] = []
        self._outbox_dirty = False
        #: why the database is read-only (None: writable)
        self.problem: str | None = None
        #: rows that could not be decoded in this process, per table (also in the ``poison_rows`` table)
        self.poison: dict[str, int] = {}
        #: ``create=False`` and no database yet: an empty state in memory, so that a reading command leaves
        #: no files behind (and reads what a fresh install holds: nothing)
        self._memory: str | None = None
        if not create and not self.path.exists():
            _refuse_lost_state(self.path, self.backup_path)
            self._memory = f"file:imageguard-{uuid.uuid4().hex}?mode=memory&cache=shared"
        else:
            _prepare_dir(state_dir)
            _refuse_lost_state(self.path, self.backup_path)
        #: no database existed: a fresh install
        self.fresh = not self.path.exists()
        self._db: sqlite3.Connection | None
        try:
            self._db = self._open_writable()
        except sqlite3.DatabaseError as exc:
            if not (read_only_fallback and not self.fresh and _full(state_dir)):
                raise StateError(self._unusable(exc)) from None
            self._db = None
            self.problem = (
                f"the state filesystem is full ({free_bytes(state_dir)} bytes free under {state_dir}); the "
                "state database is open read-only: enforcement uses the last stored policy, and nothing "
                "new can be stored until space is freed"
            )
        self._reader = self._open_reader()
        self.db_id = str(self._read_meta("db_id") or "")
        self.inode = self.path.stat().st_ino if self._memory is None else 0

    @property
    def read_only(self) -> bool:
        return self._db is None

    def _open_writable(self) -> sqlite3.Connection:
        if self._memory is not None:
            db = sqlite3.connect(self._memory, uri=True, isolation_level=None, check_same_thread=False)
            self._init(db)
            return db
        old_umask = os.umask(0o077)
        try:
            db = sqlite3.connect(
                self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
            )
            try:
                self._init(db)
            except BaseException:
                db.close()
                raise
        finally:
            os.umask(old_umask)
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                os.chmod(p, 0o600)
        return db

    def _open_reader(self) -> sqlite3.Connection:
        if self._memory is not None:
            return sqlite3.connect(self._memory, uri=True, check_same_thread=False)
        if self._db is not None:
            reader = sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, timeout=self.busy_timeout, check_same_thread=False
            )
            reader.execute("PRAGMA cache_size = -512")  # KiB: reads are few; the writer keeps the big cache
            return reader
        # read-only and no room for the -shm file: ``immutable`` reads the main file alone, which holds
        # everything once the last writer closed cleanly (an unfinished WAL is refused instead)
        wal = Path(str(self.path) + "-wal")
        for uri in (f"file:{self.path}?mode=ro", f"file:{self.path}?immutable=1"):
            if "immutable" in uri and wal.exists() and wal.stat().st_size > 0:
                break
            try:
                db = sqlite3.connect(uri, uri=True, timeout=self.busy_timeout, check_same_thread=False)
                db.execute("SELECT COUNT(*) FROM policy_layers").fetchone()
                return db
            except sqlite3.DatabaseError:
                continue
        raise StateError(
            f"{self.problem}; and the state database {self.path} cannot even be read (its last changes are "
            f"still in {wal.name}, which needs room to be read): free space under {self.state_dir}"
        )

    def try_writable(self) -> bool:
        """Reopen for writing after a full disk; True if the database is writable now."""
        if self._db is not None:
            return True
        try:
            db = self._open_writable()
        except (sqlite3.DatabaseError, StateError):
            return False
        with self._lock, self._rlock:
            self._db = db
            self.problem = None
            old, self._reader = self._reader, self._open_reader()
            old.close()
        log.warning("the state database %s is writable again (space was freed)", self.path)
        return True

    def _unusable(self, exc: sqlite3.DatabaseError) -> str:
        if _full(self.state_dir):
            if self.fresh:
                return (
                    f"cannot create the state database {self.path}: the filesystem is full "
                    f"({free_bytes(self.state_dir)} bytes free); free some space and start again"
                )
            return (
                f"cannot open the state database {self.path}: the filesystem is full "
                f"({free_bytes(self.state_dir)} bytes free); free some space and start again"
            )
        return (
            f"the state database {self.path} is unreadable ({exc}). It holds this device's policy and "
            f"verified images: do not delete it. {_remedy(self.backup_path)}"
        )

    def _init(self, db: sqlite3.Connection) -> None:
        db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
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
                    f"state database {self.path} has an unreadable schema_version {found[0]!r}. "
                    + _remedy(self.backup_path)
                ) from None
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"state database {self.path} was written by a newer ImageGuard (schema {version}, this "
                    f"version reads up to {SCHEMA_VERSION}); upgrade ImageGuard or use another state directory"
                )
        elif tables:
            raise StateError(f"{self.path} is an SQLite database, but not an ImageGuard state database")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal" and self._memory is None:
            raise StateError(f"state database {self.path}: cannot switch to WAL mode (got {mode})")
        db.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: consistent after any crash
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _split(_SCHEMA):
                db.execute(statement)
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?) ON CONFLICT(key) DO NOTHING",
                (str(SCHEMA_VERSION),),
            )
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('db_id', ?) ON CONFLICT(key) DO NOTHING",
                (uuid.uuid4().hex,),
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _read_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: other processes wait instead of failing midway)."""
        with self._lock:
            db = self._db
            if db is None:
                raise StateError(f"the state database cannot be changed now: {self.problem}")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                self._outbox_dirty = False
                db.execute("ROLLBACK")
                raise
            else:
                db.execute("COMMIT")
                if self._outbox_dirty:
                    self._outbox_dirty = False
                    for listener in self._outbox_listeners:
                        listener()

    # -- the file itself -------------------------------------------------------------------------

    def free_bytes(self) -> int | None:
        return free_bytes(self.state_dir)

    def file_problem(self) -> str | None:
        """Whether the database file this store has open is still the one at :attr:`path`."""
        try:
            inode = self.path.stat().st_ino
        except FileNotFoundError:
            return f"the state database {self.path} was deleted while the agent has it open"
        except OSError as exc:
            return f"the state database {self.path} cannot be checked: {exc.strerror}"
        if inode != self.inode:
            return f"the state database {self.path} was replaced by another file while the agent has it open"
        return None

    def save_to(self, dest: Path) -> None:
        """A consistent copy of the whole database (SQLite's online backup) at ``dest``, atomically."""
        tmp = dest.with_name(dest.name + ".tmp")
        old_umask = os.umask(0o077)
        try:
            with self._rlock:
                target = sqlite3.connect(tmp)
                try:
                    self._reader.backup(target)
                finally:
                    target.close()
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.umask(old_umask)

    def backup(self) -> Path:
        """Keep the current state as the last good copy (``imageguard state restore`` brings it back)."""
        self.save_to(self.backup_path)
        return self.backup_path

    def restore_file(self) -> None:
        """Put this store's database back at :attr:`path` after it was deleted or replaced under us.

        A file that took its place is kept beside it for inspection, never deleted.
        """
        with self._lock:  # no write may land in the old file between the copy and the switch
            move_aside(self.path)
            self.save_to(self.path)
            with self._rlock:
                db = self._open_writable() if self._db is not None else None
                if self._db is not None:
                    self._db.close()
                self._db = db
                self._reader.close()
                self._reader = self._open_reader()
                self.inode = self.path.stat().st_ino

    def add_outbox_listener(self, fn: Callable[[], None]) -> None:
        """``fn()`` runs after every commit that queued telemetry; keep it short (set an event)."""
        self._outbox_listeners.append(fn)

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._rlock:
            return list(self._reader.execute(sql, args))

    def close(self) -> None:
        with self._lock, self._rlock:
            self._reader.close()
            if self._db is not None:
                self._db.close()  # the last connection to close checkpoints the WAL into the main file

    # -- policy ----------------------------------------------------------------------------------

    def layers(self) -> list[PolicyLayer]:
        rows = self._query("SELECT name, document FROM policy_layers ORDER BY name")
        return [lyr for name, doc in rows if (lyr := self._layer_or_aside(None, name, doc)) is not None]

    def layer(self, name: str = DEVICE_LAYER) -> PolicyLayer:
        rows = self._query("SELECT document FROM policy_layers WHERE name = ?", (name,))
        found = self._layer_or_aside(None, name, rows[0][0]) if rows else None
        return found if found is not None else PolicyLayer(name=name)

    @staticmethod
    def write_layer(tx: sqlite3.Connection, layer: PolicyLayer, now: str) -> None:
        tx.execute(
            "INSERT INTO policy_layers (name, version, document, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET version=excluded.version, document=excluded.document, "
            "updated_at=excluded.updated_at",
            (layer.name, layer.version, json.dumps(layer.to_document(), sort_keys=True), now),
        )

    def read_layer(self, tx: sqlite3.Connection, name: str) -> PolicyLayer:
        row = tx.execute("SELECT document FROM policy_layers WHERE name = ?", (name,)).fetchone()
        found = self._layer_or_aside(tx, name, row[0]) if row is not None else None
        return found if found is not None else PolicyLayer(name=name)

    def read_layers(self, tx: sqlite3.Connection) -> list[PolicyLayer]:
        rows = tx.execute("SELECT name, document FROM policy_layers").fetchall()
        return [lyr for name, doc in rows if (lyr := self._layer_or_aside(tx, name, doc)) is not None]

    def _layer_or_aside(self, tx: sqlite3.Connection | None, name: str, document: str) -> PolicyLayer | None:
        try:
            return PolicyLayer.from_document(json.loads(document), name, f"stored policy layer {name!r}")
        except (ValueError, TypeError, ImageGuardError) as exc:
            self._set_aside("policy_layers", "name", name, document, exc, tx)
            return None

    # -- rows that cannot be decoded -------------------------------------------------------------

    def _set_aside(
        self,
        table: str,
        key_column: str,
        key: object,
        raw: object,
        exc: BaseException,
        tx: sqlite3.Connection | None = None,
    ) -> None:
        """Move an undecodable row to ``poison_rows`` (kept for inspection) and count it; the rest of the
        subsystem carries on without it. When the database cannot be written, the row is only skipped."""
        self.poison[table] = self.poison.get(table, 0) + 1
        log.error(
            "state database: a row of %s (%s %s) cannot be decoded and is set aside: %s",
            table,
            key_column,
            key,
            exc,
        )

        def move(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO poison_rows (table_name, row_key, raw, error, found_at) VALUES (?,?,?,?,?)",
                (table, str(key), str(raw)[:1_000_000], str(exc)[:1000], utc_now()),
            )
            db.execute(
                f"DELETE FROM {table} WHERE {key_column} = ?", (key,)
            )  # table and column are ours, never input
            self._bump(db, f"poison_rows.{table}")

        try:
            if tx is not None:
                move(tx)
            else:
                with self.transaction() as db:
                    move(db)
        except (sqlite3.Error, StateError):
            log.debug("could not move the row aside", exc_info=True)

    def poison_rows(self) -> dict[str, int]:
        """Rows set aside so far, per table (kept in ``poison_rows`` until someone looks at them)."""
        rows = self._query("SELECT table_name, COUNT(*) FROM poison_rows GROUP BY table_name")
        out = {str(t): int(n) for t, n in rows}
        for table, n in self.poison.items():
            out[table] = max(out.get(table, 0), n)
        return out

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
        return [(int(seq), rec) for seq, raw in rows if (rec := self._json_or_aside("decisions", seq, raw))]

    def last_decision_for(self, container_id: str) -> dict[str, Any] | None:
        rows = self._query(
            "SELECT seq, record FROM decisions WHERE container_id = ? ORDER BY seq DESC LIMIT 1",
            (container_id,),
        )
        return self._json_or_aside("decisions", rows[0][0], rows[0][1]) if rows else None

    def _json_or_aside(self, table: str, seq: int, raw: str) -> dict[str, Any] | None:
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict):
                raise ValueError(f"a JSON {type(doc).__name__}, not an object")
            return doc
        except (ValueError, TypeError) as exc:
            self._set_aside(table, "seq", seq, raw, exc)
            return None

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
        return [
            QueuedMessage(int(s), k, t, msg, int(p))
            for s, k, t, m, p in rows
            if (msg := self._json_or_aside("outbox", s, m)) is not None
        ]

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

    def bump_many(self, counts: dict[str, int]) -> None:
        with self.transaction() as tx:
            for name, by in counts.items():
                self._bump(tx, name, by)

    def counters(self) -> dict[str, int]:
        return {name: int(v) for name, v in self._query("SELECT name, value FROM counters ORDER BY name")}

    # -- verified digests ------------------------------------------------------------------------

    def verified(self) -> dict[Digest, tuple[VerifiedDigest, ...]]:
        out: dict[Digest, list[VerifiedDigest]] = {}
        for d, a, fp, repo, sig, at in self._query(
            "SELECT digest, anchor, anchor_fingerprint, repository, signature, verified_at FROM verified_digests"
        ):
            try:
                digest = Digest(d)
            except (ImageGuardError, TypeError) as exc:
                self._set_aside("verified_digests", "digest", d, d, exc)
                continue
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
        out = {}
        for row in rows:
            try:
                out[row[0]] = InstanceState.from_row(*row)
            except (ValueError, TypeError, AttributeError, ImageGuardError) as exc:
                self._set_aside("instances", "name", row[0], row[1], exc)
        return out

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


def free_bytes(directory: Path) -> int | None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _full(directory: Path) -> bool:
    free = free_bytes(directory)
    return free is not None and free < 256 * 1024


def _remedy(backup: Path) -> str:
    if backup.exists():
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(backup.stat().st_mtime))
        return (
            f"Restore the last good copy ({backup}, saved {when}) with `imageguard state restore`; "
            "the file now in place is kept beside it."
        )
    return (
        f"There is no backup ({backup} does not exist): if the file can be recovered, put it back; "
        "otherwise move it aside (keep it) and start again to begin with an empty state."
    )


def _refuse_lost_state(path: Path, backup: Path) -> None:
    """A database that existed must never be taken for a fresh install (an empty policy removes the
    workload): a 0-byte file, or no file beside a backup of one, is refused."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        if backup.exists():
            raise StateError(
                f"the state database {path} is missing, but this state directory held one. "
                + _remedy(backup)
                + f" To start from scratch on purpose, delete {backup} first."
            ) from None
        return
    wal = Path(str(path) + "-wal")
    if size == 0 and not (wal.exists() and wal.stat().st_size > 0):
        raise StateError(
            f"the state database {path} is empty (0 bytes), as a crash or a full disk during a write "
            "leaves it; starting with it would mean an empty policy. " + _remedy(backup)
        )


def check_database(path: Path) -> str:
    """Refuse a file that is not a sound ImageGuard state database (StateError); its db_id otherwise."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.DatabaseError as exc:
        raise StateError(f"{path} cannot be opened: {exc}") from None
    try:
        row = db.execute("PRAGMA quick_check").fetchone()
        if row is None or row[0] != "ok":
            raise StateError(f"{path} is damaged: {row[0] if row else 'no answer to the integrity check'}")
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if int(meta.get("schema_version", 0)) > SCHEMA_VERSION:
            raise StateError(f"{path} was written by a newer ImageGuard (schema {meta['schema_version']})")
        return str(meta.get("db_id", ""))
    except sqlite3.DatabaseError as exc:
        raise StateError(f"{path} is not an ImageGuard state database ({exc})") from None
    except ValueError:
        raise StateError(f"{path} has an unreadable schema_version") from None
    finally:
        db.close()


def restore_backup(state_dir: Path, source: Path) -> Path | None:
    """Put ``source`` (a backup) in place as the state database. The database it replaces is kept beside
    it as ``state.db.replaced-<time>`` (returned), never deleted. The agent must not be running."""
    check_database(source)
    path = state_dir / DB_NAME
    tmp = state_dir / (DB_NAME + ".restore.tmp")
    old_umask = os.umask(0o077)
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.umask(old_umask)
    aside = move_aside(path)
    os.replace(tmp, path)
    return aside


def move_aside(path: Path) -> Path | None:
    """Rename a database (and its -wal and -shm files) to ``<name>.replaced-<time>``, kept for inspection,
    never deleted; returns the new name (None: there was no file)."""
    if not path.exists():
        return None
    aside = path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%dT%H%M%S')}")
    os.replace(path, aside)
    for suffix in ("-wal", "-shm"):
        side = Path(str(path) + suffix)
        if side.exists():
            os.replace(side, Path(str(aside) + suffix))
    return aside
