"""The aggregator's durable state in SQLite: everything needed to resume after a crash.

One transaction per event (a model version with the round it closes, a round opened, an update
stored, a device seen), so a process killed at any instant leaves either the state before the
event or the state after it (DESIGN §7). Update payloads are kept until their round closes:
a restarted aggregator re-folds them instead of trusting in-memory sums, which is what makes
"no update lost, none counted twice" hold. numpy and the standard library only, no torch.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfmx.errors import ConfigError
from fedfmx.storage import transaction
from fedfmx.wire.messages import DeviceStatus, Hello, RoundAnnouncement

SCHEMA_VERSION = 3
KEEP_MODEL_PAYLOADS = 3
"""Encoded versions kept: the current one, and the previous ones devices may still train on."""
KEEP_REJECTIONS = 10_000
"""Rejections kept (the newest): a flood from ever-new device ids cannot grow the file."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    version INTEGER PRIMARY KEY,
    payload BLOB,
    payload_bytes INTEGER NOT NULL, -- what a device is sent once published, stored bytes before
    class_names TEXT NOT NULL,
    expert_usage TEXT NOT NULL,
    published_chunks INTEGER,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deltas (
    version INTEGER PRIMARY KEY,
    published_chunks INTEGER NOT NULL,
    payload_bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    announcement TEXT NOT NULL,
    opened REAL NOT NULL,
    closed REAL,
    extensions INTEGER NOT NULL DEFAULT 0,
    merged_version INTEGER
);
CREATE TABLE IF NOT EXISTS updates (
    round INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    payload BLOB,
    sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    num_samples INTEGER NOT NULL,
    train_loss REAL NOT NULL,
    received REAL NOT NULL,
    PRIMARY KEY (round, device_id)
);
CREATE TABLE IF NOT EXISTS buffered_folds (
    round INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    buffer INTEGER NOT NULL,
    PRIMARY KEY (round, device_id)
);
CREATE INDEX IF NOT EXISTS buffered_folds_by_buffer ON buffered_folds (buffer);
CREATE INDEX IF NOT EXISTS updates_by_digest ON updates (sha256);
CREATE TABLE IF NOT EXISTS skips (
    round INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    PRIMARY KEY (round, device_id)
);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    profile TEXT NOT NULL,
    classes_met TEXT NOT NULL,
    sample_counts TEXT NOT NULL,
    registered REAL NOT NULL,
    last_seen REAL NOT NULL,
    status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER,
    device_id TEXT,
    reason TEXT NOT NULL,
    received REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluations (
    task INTEGER PRIMARY KEY,
    model_version INTEGER NOT NULL,
    per_task TEXT NOT NULL,
    seen REAL NOT NULL
);
"""


@dataclass(frozen=True)
class StoredModel:
    version: int
    payload: bytes
    class_names: list[str]
    expert_usage: list[float]
    published_chunks: int | None


@dataclass(frozen=True)
class StoredRound:
    announcement: RoundAnnouncement
    opened: float
    closed: float | None
    extensions: int
    merged_version: int | None


@dataclass(frozen=True)
class StoredUpdate:
    device_id: str
    payload: bytes


@dataclass(frozen=True)
class UpdateRow:
    """An accepted update as the `updates` table keeps it."""

    round: int
    device_id: str
    payload: bytes
    sha256: str
    num_samples: int
    loss: float
    buffer: int | None = None
    """`service.mode: buffered`: the round whose merge folds it (`round` is the one it was
    trained in); None in synchronous rounds, where the two are the same."""


@dataclass(frozen=True)
class RoundTotals:
    """What one closed or open round received (for results and the operator view)."""

    round: int
    task: int
    participants: int
    updates: int
    skips: int
    uplink_bytes: int
    downlink_bytes: int
    """Announcement plus the round's starting model, for every participant: its delta for
    those that answered the round before (they hold its base), else the full version."""
    mean_loss: float
    opened: float
    closed: float | None


@dataclass(frozen=True)
class DeviceRow:
    device_id: str
    profile: str
    classes_met: list[str]
    last_seen: float
    status: DeviceStatus
    updates_accepted: int


@dataclass(frozen=True)
class Evaluation:
    task: int
    model_version: int
    per_task: list[float]
    seen: float


class AggregatorState:
    """A fleet's aggregator state in one SQLite file; safe to call from several threads."""

    def __init__(self, path: Path, fleet: str, create: bool = True) -> None:
        """Open (or, with `create`, start) the state of `fleet` in `path`."""
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a committed event survives the process being killed at any point
            # (DESIGN §7); only an OS crash or power cut may lose the last few commits, which
            # devices then re-send (they keep an update until its receipt arrives).
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as error:
            raise ConfigError(f"{path}: not a usable aggregator state file ({error})") from None
        self._lock = threading.Lock()
        self._claim(fleet, create)

    def _claim(self, fleet: str, create: bool) -> None:
        """A state file belongs to one fleet and one schema: refuse to mix them up."""
        with self._transaction() as db:
            rows = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if not rows and not create:
                raise ConfigError(f"{self.path}: not an aggregator state file (it is empty)")
            if not rows:
                db.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [("fleet", fleet), ("schema", str(SCHEMA_VERSION))],
                )
                return
        if rows.get("fleet") != fleet or rows.get("schema") != str(SCHEMA_VERSION):
            raise ConfigError(
                f"{self.path} holds fleet {rows.get('fleet')!r} (schema {rows.get('schema')}); "
                f"this is fleet {fleet!r} (schema {SCHEMA_VERSION}): use another state_path"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction under the lock: committed when the block completes, else undone."""
        with self._lock, transaction(self._db) as db:
            yield db

    def _write(self, statements: list[tuple[str, tuple[object, ...]]]) -> None:
        """Run the statements as one transaction: all of them happen or none."""
        with self._transaction() as db:
            for sql, args in statements:
                db.execute(sql, args)

    def _read(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- models and rounds ------------------------------------------------------------------

    def save_first_model(self, model: StoredModel) -> None:
        self._write([_insert_model(model)])

    def save_received_model(self, model: StoredModel) -> None:
        """Store a version made elsewhere (a district's copy of the root's) and drop the
        payloads older than the newest `KEEP_MODEL_PAYLOADS`, as a merge here would."""
        self._write(
            [
                _insert_model(model),
                (
                    "UPDATE models SET payload = NULL WHERE version <= ?",
                    (model.version - KEEP_MODEL_PAYLOADS,),
                ),
            ]
        )

    def latest_model(self) -> StoredModel | None:
        rows = self._read(
            "SELECT version, payload, class_names, expert_usage, published_chunks FROM models "
            "WHERE payload IS NOT NULL ORDER BY version DESC LIMIT 1"
        )
        return _stored_model(rows[0]) if rows else None

    def model(self, version: int) -> StoredModel | None:
        """One stored version; None when unknown or its payload was dropped (only the newest
        `KEEP_MODEL_PAYLOADS` keep theirs)."""
        rows = self._read(
            "SELECT version, payload, class_names, expert_usage, published_chunks FROM models "
            "WHERE version = ? AND payload IS NOT NULL",
            (version,),
        )
        return _stored_model(rows[0]) if rows else None

    def class_names(self, version: int) -> list[str] | None:
        """The class registry of a stored version (kept after its payload is dropped)."""
        rows = self._read("SELECT class_names FROM models WHERE version = ?", (version,))
        return json.loads(str(rows[0][0])) if rows else None

    def roll_back(self, model: StoredModel, spent: RoundAnnouncement) -> None:
        """Store `model` as the newest version, made by round `spent.round`, in one
        transaction: the open round is closed unmerged (its updates were trained from the
        version being replaced, and are deleted, so no receipt of them is ever re-sent), or,
        with none open, `spent` is recorded as a round closed with no participants."""
        now = time.time()
        with self._transaction() as db:
            sql, args = _insert_model(model)
            db.execute(sql, args)
            db.execute(
                "INSERT OR IGNORE INTO rounds (round, announcement, opened) VALUES (?, ?, ?)",
                (spent.round, spent.model_dump_json(), now),
            )
            db.execute(
                "UPDATE rounds SET closed = ?, merged_version = ? WHERE round = ?",
                (now, model.version, spent.round),
            )
            db.execute("DELETE FROM updates WHERE round = ?", (spent.round,))
            db.execute("DELETE FROM skips WHERE round = ?", (spent.round,))

    def published_chunks(self, version: int) -> int | None:
        rows = self._read("SELECT published_chunks FROM models WHERE version = ?", (version,))
        return None if not rows or rows[0][0] is None else int(rows[0][0])

    def mark_published(self, version: int, chunks: int, sent_bytes: int) -> None:
        """The version is on the broker: `chunks` retained chunks holding `sent_bytes`."""
        self._write(
            [
                (
                    "UPDATE models SET published_chunks = ?, payload_bytes = ? WHERE version = ?",
                    (chunks, sent_bytes, version),
                )
            ]
        )

    def mark_retired(self, version: int) -> None:
        """The version's retained chunks are cleared from the broker."""
        self._write([("UPDATE models SET published_chunks = 0 WHERE version = ?", (version,))])

    def mark_delta_published(self, version: int, chunks: int, payload_bytes: int) -> None:
        """A version's delta is retained on the broker in `chunks` chunks (0: cleared)."""
        self._write(
            [("INSERT OR REPLACE INTO deltas VALUES (?, ?, ?)", (version, chunks, payload_bytes))]
        )

    def published_delta_chunks(self, version: int) -> int:
        rows = self._read("SELECT published_chunks FROM deltas WHERE version = ?", (version,))
        return int(rows[0][0]) if rows else 0

    def retire_delta(self, version: int) -> None:
        self._write([("UPDATE deltas SET published_chunks = 0 WHERE version = ?", (version,))])

    def open_round(self, announcement: RoundAnnouncement) -> None:
        self._write(
            [
                (
                    "INSERT INTO rounds (round, announcement, opened) VALUES (?, ?, ?)",
                    (announcement.round, announcement.model_dump_json(), time.time()),
                )
            ]
        )

    def extend_round(self, announcement: RoundAnnouncement) -> None:
        """Record a moved deadline (the announcement is re-published with it)."""
        self._write(
            [
                (
                    "UPDATE rounds SET announcement = ?, extensions = extensions + 1 "
                    "WHERE round = ?",
                    (announcement.model_dump_json(), announcement.round),
                )
            ]
        )

    def close_round(self, round_index: int, model: StoredModel | None) -> None:
        """Close the round, store the version it merged (None: nothing arrived) and drop the
        payloads of the updates it folded, all in one transaction: a restart re-folds exactly
        the updates no stored version holds yet (each accepted update is counted once)."""
        merged = None if model is None else model.version
        statements: list[tuple[str, tuple[object, ...]]] = []
        if model is not None:
            statements += [
                _insert_model(model),
                (
                    "UPDATE models SET payload = NULL WHERE version <= ?",
                    (model.version - KEEP_MODEL_PAYLOADS,),
                ),
            ]
        statements += [
            (
                "UPDATE rounds SET closed = ?, merged_version = ? WHERE round = ?",
                (time.time(), merged, round_index),
            ),
            ("UPDATE updates SET payload = NULL WHERE round = ?", (round_index,)),
            (
                "UPDATE updates SET payload = NULL WHERE (round, device_id) IN "
                "(SELECT round, device_id FROM buffered_folds WHERE buffer = ?)",
                (round_index,),
            ),
        ]
        self._write(statements)

    def last_round(self) -> StoredRound | None:
        rows = self._read(
            "SELECT announcement, opened, closed, extensions, merged_version FROM rounds "
            "ORDER BY round DESC LIMIT 1"
        )
        if not rows:
            return None
        text, opened, closed, extensions, merged = rows[0]
        return StoredRound(
            RoundAnnouncement.model_validate_json(str(text)),
            float(opened),
            None if closed is None else float(closed),
            int(extensions),
            None if merged is None else int(merged),
        )

    # -- updates and answers ----------------------------------------------------------------

    def store_update(
        self,
        round_index: int,
        device_id: str,
        payload: bytes,
        sha256: str,
        num_samples: int,
        loss: float,
    ) -> bool:
        """Keep an accepted update and its SHA-256 (which outlives the payload, for receipts);
        False when this device's update for the round is stored already."""
        update = UpdateRow(round_index, device_id, payload, sha256, num_samples, loss)
        return self.store_updates([update]) == [True]

    def store_updates(self, updates: list[UpdateRow]) -> list[bool]:
        """`store_update` for a batch in one transaction (one commit for a burst of updates:
        the aggregator receipts each only after this returns); per update, whether it is new."""
        now = time.time()
        stored = []
        with self._transaction() as db:
            for u in updates:
                new = db.execute(
                    "INSERT OR IGNORE INTO updates VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        u.round,
                        u.device_id,
                        u.payload,
                        u.sha256,
                        len(u.payload),
                        u.num_samples,
                        u.loss,
                        now,
                    ),
                ).rowcount
                if new and u.buffer is not None:
                    db.execute(
                        "INSERT INTO buffered_folds VALUES (?, ?, ?)",
                        (u.round, u.device_id, u.buffer),
                    )
                stored.append(new == 1)
        return stored

    def has_update(self, round_index: int, device_id: str) -> bool:
        """Whether `device_id`'s update trained in `round_index` is stored (merged or not)."""
        return bool(
            self._read(
                "SELECT 1 FROM updates WHERE round = ? AND device_id = ?", (round_index, device_id)
            )
        )

    def buffered_updates(self, buffer: int) -> list[StoredUpdate]:
        """The stored payloads a buffered merge folds (re-folded on restart), in arrival order."""
        rows = self._read(
            "SELECT u.device_id, u.payload FROM updates u JOIN buffered_folds f "
            "ON u.round = f.round AND u.device_id = f.device_id "
            "WHERE f.buffer = ? AND u.payload IS NOT NULL ORDER BY u.received",
            (buffer,),
        )
        return [StoredUpdate(str(d), bytes(p)) for d, p in rows]

    def buffered_digests(self, buffer: int) -> list[tuple[str, str]]:
        """(device id, SHA-256) of every update a buffered merge folds, open or closed."""
        rows = self._read(
            "SELECT u.device_id, u.sha256 FROM updates u JOIN buffered_folds f "
            "ON u.round = f.round AND u.device_id = f.device_id WHERE f.buffer = ? "
            "ORDER BY u.received",
            (buffer,),
        )
        return [(str(d), str(h)) for d, h in rows]

    def round_updates(self, round_index: int) -> list[StoredUpdate]:
        """The stored payloads of an open round, in arrival order (re-folded on restart)."""
        rows = self._read(
            "SELECT device_id, payload FROM updates WHERE round = ? AND payload IS NOT NULL "
            "ORDER BY received",
            (round_index,),
        )
        return [StoredUpdate(str(d), bytes(p)) for d, p in rows]

    def update_digests(self, round_index: int) -> list[tuple[str, str]]:
        """(device id, SHA-256) of every update stored for a round, open or closed."""
        rows = self._read(
            "SELECT device_id, sha256 FROM updates WHERE round = ? ORDER BY received",
            (round_index,),
        )
        return [(str(d), str(h)) for d, h in rows]

    def stores_digest(self, device_id: str, sha256: str) -> bool:
        """Whether this device's update with this digest is stored, in any round."""
        rows = self._read(
            "SELECT 1 FROM updates WHERE sha256 = ? AND device_id = ? LIMIT 1", (sha256, device_id)
        )
        return bool(rows)

    def record_skip(self, round_index: int, device_id: str) -> None:
        """A participant answered that it has nothing to send this round."""
        self._write([("INSERT OR IGNORE INTO skips VALUES (?, ?)", (round_index, device_id))])

    def answered(self, round_index: int) -> set[str]:
        rows = self._read(
            "SELECT device_id FROM updates WHERE round = ? "
            "UNION SELECT device_id FROM skips WHERE round = ?",
            (round_index, round_index),
        )
        return {str(r[0]) for r in rows}

    def record_rejection(self, round_index: int | None, device_id: str | None, reason: str) -> None:
        self._write(
            [
                (
                    "INSERT INTO rejections (round, device_id, reason, received) "
                    "VALUES (?, ?, ?, ?)",
                    (round_index, device_id, reason[:500], time.time()),
                ),
                (
                    "DELETE FROM rejections WHERE id <= (SELECT MAX(id) FROM rejections) - ?",
                    (KEEP_REJECTIONS,),
                ),
            ]
        )

    def rejections(self) -> list[tuple[int | None, str | None, str]]:
        rows = self._read("SELECT round, device_id, reason FROM rejections ORDER BY id")
        return [
            (None if r is None else int(r), None if d is None else str(d), str(why))
            for r, d, why in rows
        ]

    # -- devices ----------------------------------------------------------------------------

    def register(self, hello: Hello) -> bool:
        """Record a device's hello; True when the device is new to the fleet."""
        now = time.time()
        status = DeviceStatus(device_id=hello.device_id, state="online", profile=hello.profile)
        with self._transaction() as db:
            known = db.execute(
                "SELECT 1 FROM devices WHERE device_id = ?", (hello.device_id,)
            ).fetchone()
            db.execute(
                "INSERT INTO devices VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(device_id) DO "
                "UPDATE SET profile = excluded.profile, classes_met = excluded.classes_met, "
                "sample_counts = excluded.sample_counts, last_seen = excluded.last_seen",
                (
                    hello.device_id,
                    hello.profile,
                    json.dumps(hello.classes_met),
                    json.dumps(hello.sample_counts),
                    now,
                    now,
                    status.model_dump_json(),
                ),
            )
        return known is None

    def device_count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM devices")[0][0])

    def is_registered(self, device_id: str) -> bool:
        return bool(self._read("SELECT 1 FROM devices WHERE device_id = ?", (device_id,)))

    def evict_newcomer(self) -> str | None:
        """Forget the device heard from least recently among those that never answered a
        round (a device that takes part is never evicted); its id, or None if there is none."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT device_id FROM devices WHERE device_id NOT IN "
                "(SELECT device_id FROM updates UNION SELECT device_id FROM skips) "
                "ORDER BY last_seen LIMIT 1"
            ).fetchone()
            if row is not None:
                db.execute("DELETE FROM devices WHERE device_id = ?", (row[0],))
        return None if row is None else str(row[0])

    def expire_devices(self, unseen_since: float) -> list[str]:
        """Forget devices not heard from since `unseen_since` (they register again with their
        next hello); their ids, in order."""
        with self._transaction() as db:
            gone = [
                str(row[0])
                for row in db.execute(
                    "SELECT device_id FROM devices WHERE last_seen < ? ORDER BY device_id",
                    (unseen_since,),
                )
            ]
            db.execute("DELETE FROM devices WHERE last_seen < ?", (unseen_since,))
        return gone

    def last_answers(self) -> dict[str, int]:
        """The last round each device answered (an update or a skip)."""
        rows = self._read(
            "SELECT device_id, MAX(round) FROM (SELECT device_id, round FROM updates "
            "UNION ALL SELECT device_id, round FROM skips) GROUP BY device_id"
        )
        return {str(device): int(last) for device, last in rows}

    def record_status(self, status: DeviceStatus) -> bool:
        """Store a registered device's latest status; False for a device never registered."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE devices SET status = ?, last_seen = ? WHERE device_id = ?",
                (status.model_dump_json(), time.time(), status.device_id),
            )
        return cursor.rowcount == 1

    def devices(self) -> list[DeviceRow]:
        rows = self._read(
            "SELECT d.device_id, d.profile, d.classes_met, d.last_seen, d.status, "
            "(SELECT COUNT(*) FROM updates u WHERE u.device_id = d.device_id) "
            "FROM devices d ORDER BY d.device_id"
        )
        return [
            DeviceRow(
                str(device),
                str(profile),
                json.loads(str(classes)),
                float(seen),
                DeviceStatus.model_validate_json(str(status)),
                int(count),
            )
            for device, profile, classes, seen, status, count in rows
        ]

    # -- results ----------------------------------------------------------------------------

    def save_evaluation(self, evaluation: Evaluation) -> None:
        self._write(
            [
                (
                    "INSERT OR REPLACE INTO evaluations VALUES (?, ?, ?, ?)",
                    (
                        evaluation.task,
                        evaluation.model_version,
                        json.dumps(evaluation.per_task),
                        evaluation.seen,
                    ),
                )
            ]
        )

    def evaluations(self) -> list[Evaluation]:
        rows = self._read(
            "SELECT task, model_version, per_task, seen FROM evaluations ORDER BY task"
        )
        return [Evaluation(int(t), int(v), json.loads(str(p)), float(s)) for t, v, p, s in rows]

    def round_totals(self) -> list[RoundTotals]:
        rows = self._read(
            "SELECT r.round, r.announcement, r.opened, r.closed, "
            "(SELECT COUNT(*) FROM updates u WHERE u.round = r.round), "
            "(SELECT COUNT(*) FROM skips s WHERE s.round = r.round), "
            "(SELECT COALESCE(SUM(bytes), 0) FROM updates u WHERE u.round = r.round), "
            "(SELECT COALESCE(AVG(train_loss), 0) FROM updates u WHERE u.round = r.round), "
            "(SELECT payload_bytes FROM models m WHERE m.version = "
            "json_extract(r.announcement, '$.model_version')), "
            "(SELECT payload_bytes FROM deltas d WHERE d.version = "
            "json_extract(r.announcement, '$.model_version')) "
            "FROM rounds r ORDER BY r.round"
        )
        totals = []
        answered_before: set[str] = set()
        for index, text, opened, closed, updates, skips, uplink, loss, model_bytes, delta in rows:
            announcement = RoundAnnouncement.model_validate_json(str(text))
            # A participant that answered the round before holds the version the delta starts
            # from and takes the delta; any other takes the full version.
            takers = len(answered_before & set(announcement.participants)) if delta else 0
            downlink = (
                len(text) * len(announcement.participants)
                + (model_bytes or 0) * (len(announcement.participants) - takers)
                + (delta or 0) * takers
            )
            answered_before = self.answered(int(index))
            totals.append(
                RoundTotals(
                    int(index),
                    announcement.task,
                    len(announcement.participants),
                    int(updates),
                    int(skips),
                    int(uplink),
                    downlink,
                    float(loss),
                    float(opened),
                    None if closed is None else float(closed),
                )
            )
        return totals


def _stored_model(row: tuple[Any, ...]) -> StoredModel:
    version, payload, names, usage, chunks = row
    return StoredModel(
        int(version),
        bytes(payload),
        json.loads(str(names)),
        json.loads(str(usage)),
        None if chunks is None else int(chunks),
    )


def _insert_model(model: StoredModel) -> tuple[str, tuple[object, ...]]:
    return (
        "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            model.version,
            model.payload,
            len(model.payload),
            json.dumps(model.class_names),
            json.dumps(model.expert_usage),
            model.published_chunks,
            time.time(),
        ),
    )
