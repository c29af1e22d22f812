"""A table of its own beside the aggregator's state (the same SQLite file, its own connection).

The district and root roles keep a little more than a flat aggregator (a district's partials,
the root's split of a round over districts) without changing `AggregatorState`'s schema: each
is one `CREATE TABLE IF NOT EXISTS` in the state file, written in its own transactions, in an
order that a crash between two of them cannot make inconsistent (each role says which).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedfmx.storage import transaction


class SideTable:
    """One connection to the state file with `schema` applied; safe from several threads."""

    def __init__(self, path: Path, schema: str) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(schema)
        self._lock = threading.Lock()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, transaction(self._db) as db:
            yield db

    def _one(self, sql: str, args: tuple[object, ...]) -> tuple[Any, ...] | None:
        with self._lock:
            row: tuple[Any, ...] | None = self._db.execute(sql, args).fetchone()
            return row

    def close(self) -> None:
        with self._lock:
            self._db.close()
