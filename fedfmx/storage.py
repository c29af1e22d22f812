"""SQLite transactions shared by the services' durable stores (aggregator state, sample store)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """`BEGIN IMMEDIATE` … `COMMIT`, or `ROLLBACK` if the block raises: all of it or none.

    The connection must be in autocommit mode (`isolation_level=None`), so this is the only
    transaction; IMMEDIATE takes the write lock at once, so two writers never deadlock.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
