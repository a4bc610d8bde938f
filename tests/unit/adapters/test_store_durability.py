"""Issue 13 on the store: lost state is never taken for a fresh install, bad rows are set aside, the file
the agent has open is watched, and a backup of the last good state can be put back."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.adapters.store import BACKUP_NAME, DB_NAME, Store
from agent.core.digest import Digest
from agent.core.policy import AllowlistEntry, PolicyLayer
from agent.errors import StateError
from tests.unit.adapters.test_store import NOW, msg, record


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state_dir: Path) -> Iterator[Store]:
    s = Store(state_dir)
    yield s
    s.close()


def _poke(state_dir: Path, sql: str, *args: object) -> None:
    """Write behind the store's back, as a failing disk or a hand edit would."""
    db = sqlite3.connect(state_dir / DB_NAME)
    db.execute(sql, args)
    db.commit()
    db.close()


def test_a_missing_database_beside_its_backup_is_refused(state_dir: Path) -> None:
    s = Store(state_dir)
    s.backup()
    s.close()
    (state_dir / DB_NAME).unlink()
    with pytest.raises(StateError, match=r"is missing, but this state directory held one.*state restore"):
        Store(state_dir)
    assert not (state_dir / DB_NAME).exists(), "nothing was created in its place"


def test_the_backup_is_a_consistent_copy(store: Store, state_dir: Path) -> None:
    store.record_decision(record(1))
    path = store.backup()
    assert path == state_dir / BACKUP_NAME and path.stat().st_mode & 0o777 == 0o600
    copy = sqlite3.connect(path)
    assert copy.execute("SELECT COUNT(*) FROM decisions").fetchone() == (1,)
    assert copy.execute("SELECT value FROM meta WHERE key='db_id'").fetchone() == (store.db_id,)
    copy.close()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_database_deleted_or_replaced_under_the_store_is_noticed_and_put_back(
    store: Store, state_dir: Path, how: str
) -> None:
    store.record_decision(record(1))
    assert store.file_problem() is None
    (state_dir / DB_NAME).unlink()
    for suffix in ("-wal", "-shm"):
        (state_dir / (DB_NAME + suffix)).unlink(missing_ok=True)
    if how == "replaced":
        Store(state_dir).close()  # an empty database in its place (what a careless CLI run would make)
    assert how in (store.file_problem() or "")
    store.restore_file()
    assert store.file_problem() is None
    store.record_decision(record(2))  # writes reach the file at the path again
    other = Store(state_dir)
    try:
        assert other.db_id == store.db_id and other.decision_count() == 2
    finally:
        other.close()
    kept = sorted(p.name for p in state_dir.iterdir() if ".replaced-" in p.name)
    assert len(kept) == (1 if how == "replaced" else 0), "a file that took its place is kept, not deleted"


# -- poison rows -------------------------------------------------------------------------------------


def test_an_outbox_row_that_is_not_json_is_set_aside_and_the_rest_goes_on(
    store: Store, state_dir: Path
) -> None:
    store.outbox_add([msg("verdicts", 2, 1), msg("verdicts", 2, 2)], NOW)
    _poke(state_dir, "UPDATE outbox SET message = '{broken' WHERE seq = 1")
    rows = store.outbox_peek()
    assert [r.seq for r in rows] == [2]
    assert store.outbox_size() == 1, "moved out of the outbox, so no drain pass sees it again"
    assert store.poison_rows() == {"outbox": 1}
    assert store.counters()["poison_rows.outbox"] == 1
    kept = sqlite3.connect(state_dir / DB_NAME).execute("SELECT table_name, raw FROM poison_rows").fetchall()
    assert kept == [("outbox", "{broken")]


def test_a_bad_decision_row_is_set_aside(store: Store, state_dir: Path) -> None:
    for i in range(3):
        store.record_decision(record(i))
    _poke(state_dir, "UPDATE decisions SET record = '[1, 2' WHERE id = 'dec-1'")
    assert [r["id"] for _, r in store.decisions()] == ["dec-2", "dec-0"]
    assert store.poison_rows() == {"decisions": 1}


def test_a_bad_policy_layer_row_is_set_aside(store: Store, state_dir: Path) -> None:
    with store.transaction() as tx:
        store.write_layer(tx, PolicyLayer(name="device", version=3), NOW)
        store.write_layer(
            tx, PolicyLayer(name="group:g", version=1, allowlist=(AllowlistEntry(Digest.of(b"x")),)), NOW
        )
    _poke(state_dir, "UPDATE policy_layers SET document = '{\"version\": \"x\"}' WHERE name = 'device'")
    assert [lyr.name for lyr in store.layers()] == ["group:g"]
    assert store.layer("device") == PolicyLayer(name="device")
    assert store.poison_rows() == {"policy_layers": 1}


def test_bad_instance_and_verified_rows_are_set_aside(store: Store, state_dir: Path) -> None:
    _poke(
        state_dir,
        "INSERT INTO instances (name, spec, status, updated_at) VALUES ('x', '{not json', 'running', ?)",
        NOW,
    )
    _poke(
        state_dir,
        "INSERT INTO verified_digests VALUES ('not-a-digest', 'a', 'fp', 'repo', 'sig', ?)",
        NOW,
    )
    assert store.instance_states() == {}
    assert store.verified() == {}
    assert store.poison_rows() == {"instances": 1, "verified_digests": 1}


def test_a_policy_layer_set_aside_is_never_a_first_run(store: Store, state_dir: Path) -> None:
    """An undecodable device layer must not turn the device back into a new one (audit mode)."""
    from agent.config import from_dict
    from agent.control.service import Service

    with store.transaction() as tx:
        store.write_layer(tx, PolicyLayer(name="device", version=3), NOW)
    _poke(state_dir, "UPDATE policy_layers SET document = 'garbage' WHERE name = 'device'")
    service = Service(from_dict({"state": {"dir": str(state_dir)}}), store)
    assert not service.first_run
    assert service.effective().enforcement.mode == "enforce"
