"""The SQLite store: layout, modes, one transaction per change, refusal of unusable files, crash safety."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.adapters.store import DB_NAME, SCHEMA_VERSION, Store
from agent.core.decision import VerifiedDigest
from agent.core.digest import Digest
from agent.core.policy import AllowlistEntry, PolicyLayer, group_layer
from agent.core.records import (
    PRIORITY_ALERT,
    PRIORITY_ALLOWED_VERDICT,
    PRIORITY_BLOCKED_VERDICT,
    PRIORITY_POLICY,
    DecisionRecord,
    OutboxMessage,
)
from agent.errors import StateError

REPO_ROOT = Path(__file__).resolve().parents[3]
NOW = "2025-01-01T00:00:00.000Z"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state_dir: Path) -> Iterator[Store]:
    s = Store(state_dir)
    yield s
    s.close()


def record(n: int, verdict: str = "allowed", container: str = "c1") -> DecisionRecord:
    return DecisionRecord.from_dict(
        {
            "id": f"dec-{n}",
            "time": NOW,
            "container": {"id": container, "name": "web"},
            "verdict": verdict,
            "reason": "allowlisted" if verdict == "allowed" else "not-allowlisted",
        }
    )


def msg(kind: str, priority: int, n: int) -> OutboxMessage:
    return OutboxMessage(kind, {"n": n}, priority)


# -- layout ----------------------------------------------------------------------------------------


def test_tables_and_schema_version(store: Store) -> None:
    db = sqlite3.connect(store.path)
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        version = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        db.close()
    assert {
        "meta",
        "policy_layers",
        "decisions",
        "verified_digests",
        "outbox",
        "counters",
        "instances",
    } <= tables
    assert int(version) == SCHEMA_VERSION
    assert mode == "wal"


def test_file_modes(tmp_path: Path) -> None:
    state_dir = tmp_path / "deep" / "state"
    old = os.umask(0)  # the most permissive umask a caller could have
    try:
        s = Store(state_dir)
        s.record_decision(record(1))
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        files = sorted(p.name for p in state_dir.iterdir())
        assert {DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"} <= set(files)
        for name in files:
            if name.startswith(DB_NAME):
                assert stat.S_IMODE((state_dir / name).stat().st_mode) == 0o600, name
    finally:
        s.close()


def test_existing_open_state_dir_is_tightened(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    state_dir.chmod(0o755)
    Store(state_dir).close()
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700


def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_text("x")
    with pytest.raises(StateError, match="cannot create state directory"):
        Store(path)


def test_reopen_keeps_the_data(state_dir: Path) -> None:
    s = Store(state_dir)
    s.record_decision(record(1), [msg("verdicts", PRIORITY_ALLOWED_VERDICT, 1)])
    s.close()
    s = Store(state_dir)
    try:
        assert s.decision_count() == 1
        assert s.outbox_size() == 1
    finally:
        s.close()


# -- refusing unusable files -----------------------------------------------------------------------


def _refused(state_dir: Path, content: bytes, match: str) -> None:
    state_dir.mkdir(mode=0o700, exist_ok=True)
    db = state_dir / DB_NAME
    db.write_bytes(content)
    with pytest.raises(StateError, match=match) as exc:
        Store(state_dir)
    assert str(db) in str(exc.value)
    assert db.read_bytes() == content  # left exactly as it was


@pytest.mark.parametrize(
    "content",
    [b"this is not a database" * 100, b"SQLite format 3\x00" + b"\xee" * 4080, os.urandom(8192)],
    ids=["text", "bad-header", "random"],
)
def test_corrupt_file_is_refused_and_untouched(state_dir: Path, content: bytes) -> None:
    _refused(state_dir, content, "is unreadable.*do not delete it.*no backup")


def _imageguard_db(state_dir: Path) -> bytes:
    s = Store(state_dir)
    for i in range(100):
        s.record_decision(record(i), [msg("verdicts", PRIORITY_ALLOWED_VERDICT, i)])
    s.close()  # the last close checkpoints the WAL into the main file
    return (state_dir / DB_NAME).read_bytes()


def test_damaged_page_is_refused_and_untouched(state_dir: Path) -> None:
    good = bytearray(_imageguard_db(state_dir))
    assert len(good) > 3 * 4096
    good[4096:8192] = b"\xff" * 4096
    _refused(state_dir, bytes(good), "is unreadable")


def test_truncated_file_is_refused_and_untouched(state_dir: Path) -> None:
    good = _imageguard_db(state_dir)
    _refused(state_dir, good[: len(good) // 2], "is unreadable")


def test_newer_schema_is_refused_and_untouched(state_dir: Path) -> None:
    _imageguard_db(state_dir)
    db = sqlite3.connect(state_dir / DB_NAME)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    content = (state_dir / DB_NAME).read_bytes()
    _refused(state_dir, content, f"newer ImageGuard \\(schema {SCHEMA_VERSION + 1}")


def test_foreign_sqlite_file_is_refused_and_untouched(tmp_path: Path, state_dir: Path) -> None:
    other = tmp_path / "other.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, data BLOB)")
    db.execute("INSERT INTO photos (data) VALUES (x'00ff')")
    db.commit()
    db.close()
    _refused(state_dir, other.read_bytes(), "not an ImageGuard state database")
    assert sorted(p.name for p in state_dir.iterdir()) == [DB_NAME]  # no -wal/-shm left behind


def test_an_empty_file_is_refused_never_taken_for_a_fresh_install(state_dir: Path) -> None:
    _refused(state_dir, b"", r"is empty \(0 bytes\).*empty policy.*no backup")


def test_no_database_at_all_is_a_fresh_install(state_dir: Path) -> None:
    s = Store(state_dir)
    try:
        assert s.fresh and s.db_id
    finally:
        s.close()
    s = Store(state_dir)
    try:
        assert not s.fresh
    finally:
        s.close()


# -- transactions ------------------------------------------------------------------------------------


def test_decision_and_its_messages_are_one_transaction(store: Store) -> None:
    store.record_decision(record(1, "blocked"), [msg("verdicts", 2, 1), msg("alerts", 0, 1)])
    assert store.decision_count() == 1
    assert store.outbox_size() == 2

    def failing() -> Iterator[OutboxMessage]:
        yield msg("verdicts", PRIORITY_BLOCKED_VERDICT, 2)
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError):
        store.record_decision(record(2, "blocked"), failing())
    unserialisable = OutboxMessage("alerts", {"bad": {1, 2}}, PRIORITY_ALERT)
    with pytest.raises(TypeError):
        store.record_decision(record(3, "blocked"), [msg("verdicts", 2, 3), unserialisable])
    with pytest.raises(sqlite3.IntegrityError):  # the same id twice
        store.record_decision(record(1), [msg("verdicts", 3, 4)])
    assert store.decision_count() == 1
    assert store.outbox_size() == 2
    assert [m.message["n"] for m in store.outbox_peek()] == [1, 1]
    # the store is usable after a failed transaction
    store.record_decision(record(5), [msg("verdicts", 3, 5)])
    assert store.decision_count() == 2


def test_transaction_rolls_back_on_error(store: Store) -> None:
    with pytest.raises(ValueError), store.transaction() as tx:
        Store.write_layer(tx, PolicyLayer(version=3), NOW)
        store.enqueue(tx, msg("policy", PRIORITY_POLICY, 1), NOW)
        raise ValueError("half way")
    assert store.layer().version == 0
    assert store.outbox_size() == 0


# -- outbox ------------------------------------------------------------------------------------------


def test_outbox_order_and_ack(store: Store) -> None:
    kinds = [("verdicts", 3), ("alerts", 0), ("policy", 1), ("verdicts", 2)]
    for n, (kind, prio) in enumerate(kinds):
        store.outbox_add([msg(kind, prio, n)], NOW)
    queued = store.outbox_peek()
    assert [q.message["n"] for q in queued] == [0, 1, 2, 3]  # the order of recording, not of priority
    assert [(q.kind, q.priority) for q in queued] == kinds
    assert [q.message["n"] for q in store.outbox_peek(limit=2)] == [0, 1]
    assert [q.message["n"] for q in store.outbox_peek(after_seq=queued[1].seq)] == [2, 3]
    store.outbox_ack([queued[0].seq, queued[2].seq])
    store.outbox_ack([])
    assert [q.message["n"] for q in store.outbox_peek()] == [1, 3]
    assert store.outbox_size() == 2


def test_outbox_topic_is_kept(store: Store) -> None:
    store.outbox_add([OutboxMessage("reply", {"x": 1}, PRIORITY_POLICY, topic="$EDC/acc/dev/REPLY/1")], NOW)
    (q,) = store.outbox_peek()
    assert (q.kind, q.topic, q.message) == ("reply", "$EDC/acc/dev/REPLY/1", {"x": 1})


def test_full_outbox_drops_allowed_verdicts_before_alerts(state_dir: Path) -> None:
    s = Store(state_dir, outbox_limit=4)
    try:
        for n in range(3):
            s.outbox_add([msg("verdicts", PRIORITY_ALLOWED_VERDICT, n)], NOW)
        s.outbox_add([msg("alerts", PRIORITY_ALERT, 3)], NOW)
        assert s.outbox_size() == 4
        # full: each alert pushes out the oldest allowed verdict
        s.outbox_add([msg("alerts", PRIORITY_ALERT, 4), msg("alerts", PRIORITY_ALERT, 5)], NOW)
        assert [m.message["n"] for m in s.outbox_peek()] == [2, 3, 4, 5]
        assert s.counters() == {"outbox_dropped.verdicts": 2}
        # a blocked verdict outranks the remaining allowed one
        s.outbox_add([msg("verdicts", PRIORITY_BLOCKED_VERDICT, 6)], NOW)
        assert [m.message["n"] for m in s.outbox_peek()] == [3, 4, 5, 6]
        # an allowed verdict is the least important message: it is the one dropped
        s.outbox_add([msg("verdicts", PRIORITY_ALLOWED_VERDICT, 7)], NOW)
        assert [m.message["n"] for m in s.outbox_peek()] == [3, 4, 5, 6]
        assert s.counters()["outbox_dropped.verdicts"] == 4
        # policy acknowledgements go before alerts too
        s.outbox_add([msg("alerts", PRIORITY_ALERT, 8)], NOW)
        assert [m.message["n"] for m in s.outbox_peek()] == [3, 4, 5, 8]
        s.outbox_add([msg("policy", PRIORITY_POLICY, 9)], NOW)
        assert [m.message["n"] for m in s.outbox_peek()] == [3, 4, 5, 8]
        assert s.counters() == {"outbox_dropped.verdicts": 5, "outbox_dropped.policy": 1}
        # only alerts left: the oldest alert makes room for a new one
        s.outbox_add([msg("alerts", PRIORITY_ALERT, 10)], NOW)
        assert [m.message["n"] for m in s.outbox_peek()] == [4, 5, 8, 10]
        assert s.counters()["outbox_dropped.alerts"] == 1
        assert s.outbox_size() == 4
    finally:
        s.close()


def test_outbox_bound_holds_for_decisions(state_dir: Path) -> None:
    s = Store(state_dir, outbox_limit=10)
    try:
        for n in range(30):
            verdict = "blocked" if n % 3 == 0 else "allowed"
            telemetry = [msg("verdicts", PRIORITY_ALLOWED_VERDICT if verdict == "allowed" else 2, n)]
            if verdict == "blocked":
                telemetry.append(msg("alerts", PRIORITY_ALERT, n))
            s.record_decision(record(n, verdict), telemetry)
        assert s.outbox_size() == 10
        assert s.decision_count() == 30  # decisions are kept even when their telemetry is dropped
        kinds = [q.kind for q in s.outbox_peek()]
        assert kinds.count("alerts") == 10
        assert s.counters()["outbox_dropped.verdicts"] == 30
    finally:
        s.close()


# -- decisions, layers, verified digests, counters ---------------------------------------------------


def test_decisions_newest_first_and_paging(store: Store) -> None:
    for n in range(5):
        store.record_decision(record(n, container=f"c{n % 2}"))
    page = store.decisions(limit=2)
    assert [r["id"] for _, r in page] == ["dec-4", "dec-3"]
    page2 = store.decisions(limit=2, before_seq=page[-1][0])
    assert [r["id"] for _, r in page2] == ["dec-2", "dec-1"]
    assert store.decision_count() == 5
    last = store.last_decision_for("c0")
    assert last is not None and last["id"] == "dec-4"
    assert store.last_decision_for("nobody") is None


def test_layers(store: Store) -> None:
    assert store.layer() == PolicyLayer()
    assert store.layers() == []
    device = PolicyLayer(version=2, allowlist=(AllowlistEntry(Digest.of(b"x"), "c"),))
    group = PolicyLayer(name=group_layer("g"), version=5)
    with store.transaction() as tx:
        Store.write_layer(tx, device, NOW)
        Store.write_layer(tx, group, NOW)
        assert store.read_layer(tx, "device") == device
    assert store.layer() == device
    assert store.layer("group:g") == group
    assert store.layer("group:none") == PolicyLayer(name="group:none")
    assert {lyr.name for lyr in store.layers()} == {"device", "group:g"}
    with store.transaction() as tx:
        Store.write_layer(tx, device.bumped(), NOW)
        assert {lyr.name: lyr.version for lyr in store.read_layers(tx)} == {"device": 3, "group:g": 5}


def test_verified_digests_and_revocation(store: Store) -> None:
    d1, d2 = Digest.of(b"1"), Digest.of(b"2")
    store.add_verified(VerifiedDigest(d1, "a", "fp-a", "r/x", "sig", NOW))
    store.add_verified(VerifiedDigest(d1, "b", "fp-b", "r/x", "sig", NOW))
    store.add_verified(VerifiedDigest(d2, "c", "fp-c", "r/y", "sig", NOW))
    store.add_verified(VerifiedDigest(d2, "a", "fp-a-old", "r/y", "sig", NOW))
    store.add_verified(VerifiedDigest(d2, "a", "fp-a", "r/y", "sig2", NOW))  # re-verified: replaces
    assert {(v.anchor, v.anchor_fingerprint, v.signature) for v in store.verified()[d2]} == {
        ("c", "fp-c", "sig"),
        ("a", "fp-a", "sig2"),
    }
    with store.transaction() as tx:
        # anchor a unchanged, b changed, c removed
        revoked = Store.revoke_verified(tx, {"a": "fp-a", "b": "fp-b-new"})
    assert revoked == 2
    assert store.verified() == {
        d1: (VerifiedDigest(d1, "a", "fp-a", "r/x", "sig", NOW),),
        d2: (VerifiedDigest(d2, "a", "fp-a", "r/y", "sig2", NOW),),
    }
    with store.transaction() as tx:
        assert Store.revoke_verified(tx, {"a": "fp-a"}) == 0
        assert Store.revoke_verified(tx, {}) == 2
    assert store.verified() == {}


def test_counters(store: Store) -> None:
    store.bump("x")
    store.bump("x", 4)
    store.bump("y")
    assert store.counters() == {"x": 5, "y": 1}


# -- crash safety ------------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from agent.adapters.store import Store
    from agent.core.records import DecisionRecord, OutboxMessage

    store = Store(Path(sys.argv[1]), outbox_limit=1_000_000)
    prefix = sys.argv[2]
    n = 0
    while True:
        rid = f"{prefix}-{n}"
        verdict = "blocked" if n % 2 else "allowed"
        rec = DecisionRecord.from_dict({"id": rid, "time": "t", "container": {"id": "c"}, "verdict": verdict,
                                        "reason": "allowlisted", "detail": "x" * (n % 5000)})
        msgs = [OutboxMessage("verdicts", {"id": rid}, 3 if verdict == "allowed" else 2)]
        if verdict == "blocked":
            msgs.append(OutboxMessage("alerts", {"id": rid + "-alert", "decision_id": rid}, 0))
        store.record_decision(rec, msgs)
        if n == 10:
            print("ready", flush=True)
        n += 1
    """
)


def _check_consistent(state_dir: Path) -> tuple[int, int]:
    s = Store(state_dir, outbox_limit=1_000_000)
    try:
        rows = s._query("PRAGMA integrity_check")
        assert rows == [("ok",)]
        decisions = {r["id"]: r for _, r in s.decisions(limit=1_000_000)}
        outbox = s.outbox_peek(limit=1_000_000)
    finally:
        s.close()
    verdicts = {q.message["id"] for q in outbox if q.kind == "verdicts"}
    alerts = {q.message["decision_id"] for q in outbox if q.kind == "alerts"}
    # nothing in the outbox without its decision
    assert verdicts <= decisions.keys()
    assert alerts <= decisions.keys()
    # and every decision has all of its messages
    assert verdicts == decisions.keys()
    assert alerts == {i for i, r in decisions.items() if r["verdict"] == "blocked"}
    assert len(outbox) == len(verdicts) + len(alerts)
    return len(decisions), len(outbox)


def test_kill_9_leaves_a_consistent_store(state_dir: Path) -> None:
    Store(state_dir).close()
    rng = random.Random(20250101)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    total = 0
    deadline = time.monotonic() + 8
    for i in range(6):
        if time.monotonic() > deadline:
            break
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(state_dir), f"run{i}"],
            stdout=subprocess.PIPE,
            env=env,
            cwd=REPO_ROOT,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"ready\n"
            time.sleep(rng.uniform(0.01, 0.25))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
            if child.stdout:
                child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        count, _ = _check_consistent(state_dir)
        assert count > total  # the child wrote and its commits survived
        total = count
