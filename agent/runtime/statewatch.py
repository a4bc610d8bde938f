"""Keeps an eye on the state database file while the agent runs.

- **Deleted or replaced under the agent** (``rm -rf`` of the state directory, a copy over ``state.db``):
  the agent still has its own database open, so it keeps enforcing from it; it says so loudly, keeps the
  file that took its place beside it, and puts its own back, so that ``status`` and CLI edits work on the
  database the agent uses again.
- **Read-only after a full disk**: retried until space is freed, then the backlog is written.
- **A backup of the last good state** is taken once the agent runs and after every policy change
  (``imageguard state restore`` brings it back).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable

from agent.adapters.store import Store
from agent.errors import StateError

log = logging.getLogger(__name__)

CHECK_SECONDS = 2.0


class StateWatch:
    def __init__(
        self,
        store: Store,
        *,
        on_restored: Callable[[], None] = lambda: None,
        count: Callable[[str], None] = lambda _name: None,
        interval: float = CHECK_SECONDS,
    ) -> None:
        self.store = store
        self.on_restored = on_restored
        self.count = count
        self.interval = interval
        #: what went wrong with the file last (for status), None while all is well
        self.problem: str | None = None
        self._backup_wanted = threading.Event()
        self._backup_wanted.set()  # the first: the state this agent started from
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="state-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def want_backup(self) -> None:
        self._backup_wanted.set()

    def _run(self) -> None:
        while True:
            self.check()
            if self._stop.wait(self.interval):
                return

    def check(self) -> None:
        """One pass (the thread calls it; tests may too)."""
        store = self.store
        if store.read_only and store.try_writable():
            self._backup_wanted.set()
        problem = store.file_problem()
        if problem is not None:
            self.problem = problem
            log.error(
                "%s: the agent keeps enforcing from the database it opened and puts it back now; "
                "a file that took its place is kept beside it as state.db.replaced-<time>",
                problem,
            )
            try:
                store.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                store.restore_file()
            except (OSError, sqlite3.Error, StateError) as exc:
                log.error("could not put the state database back at %s: %s", store.path, exc)
                return
            self.count("state_file_replaced")  # after the switch: counted in the file that stays
            self.on_restored()
            log.warning("the state database is back at %s", store.path)
            self._backup_wanted.set()
        if self._backup_wanted.is_set() and not store.read_only:
            self._backup_wanted.clear()
            try:
                store.backup()
            except (OSError, sqlite3.Error) as exc:
                log.warning("could not save a backup of the state database at %s: %s", store.backup_path, exc)
