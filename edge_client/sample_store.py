"""A device's bounded sample store: an SQLite ledger beside one file per sample, crash-safe.

Layout under `root`: `ledger.sqlite` (WAL, `synchronous=FULL`) and `samples/<aa>/<sha256>.<ext>`
(`.jpg`/`.png`: the file as it came, with `keep_raw_images`; `.npy` without it: the
preprocessed uint8 model input, or, for a frozen pretrained trunk, its float32 features).
A sample's file is written to a temporary name, fsync'ed and renamed *before* its ledger row
commits, and removed only *after* its row is deleted; so after a power
cut at any point, `open` finds at worst a file without a row (an orphan, deleted) or a stale
temporary file (deleted), never a row without its file.

Bounds, applied as samples arrive:
- per class, a reservoir of `max_per_class` (Algorithm R over every sample the class ever
  offered: the m-th one, 0-based, enters a full class with probability cap/(m+1), replacing a
  uniformly drawn stored one), so a class met for months keeps a uniform sample of it all;
- a retention window (`retention_days`): older samples are deleted;
- a disk budget (`max_bytes`): already-trained samples make room, older batches and the
  largest class's oldest first; a sample that still cannot fit (the store is full of samples
  no round has trained on yet) is refused (logged), never half-stored.

Rounds read the store through `StoreStream` (`edge_client.store_stream`): samples join the
current batch (the learner's task) until a class the device never met arrives and opens the
next one; each round trains on the current batch plus the learner's memory of earlier ones.
"""

from __future__ import annotations

import io
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

import numpy as np

from edge_client.sources.base import Sample
from edge_client.stream_config import StoreConfig
from fedfmx.config import ClassPolicyConfig, ImageInputConfig
from fedfmx.data.preprocessing import decode_image, fit_pixels, normalise
from fedfmx.errors import DataError
from fedfmx.storage import transaction
from fedfmx.trunk.feature_cache import FeatureFn
from fedfmx.trunk.spec import TRUNK_FEATURES

log = logging.getLogger(__name__)

WAL_LIMIT_BYTES = 1 << 20
"""The ledger's write-ahead log is cut back to this after each checkpoint (disk stays bounded)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY,
    class TEXT NOT NULL,
    sha256 TEXT NOT NULL UNIQUE,
    file TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    arrived REAL NOT NULL,
    origin TEXT NOT NULL,
    batch INTEGER
);
CREATE INDEX IF NOT EXISTS samples_class ON samples (class);
CREATE INDEX IF NOT EXISTS samples_batch ON samples (batch);
CREATE TABLE IF NOT EXISTS offered (class TEXT PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS seen (sha256 TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS rounds (round INTEGER PRIMARY KEY, batch INTEGER);
CREATE TABLE IF NOT EXISTS met (class TEXT PRIMARY KEY, batch INTEGER NOT NULL);
"""


P = ParamSpec("P")
R = TypeVar("R")


def _locked(
    method: Callable[Concatenate[SampleStore, P], R],
) -> Callable[Concatenate[SampleStore, P], R]:
    """One caller at a time: the feed thread adds while the round thread reads."""

    @wraps(method)
    def guarded(self: SampleStore, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._lock:
            return method(self, *args, **kwargs)

    return guarded


@dataclass(frozen=True)
class StoreUsage:
    """What the device status reports about its store."""

    samples: int
    bytes: int
    """Bytes of the sample files (what `max_bytes` bounds)."""
    ledger_bytes: int
    """Bytes of the SQLite ledger and its WAL."""
    classes: dict[str, int]


class SampleStore:
    """Labelled samples on disk, bounded per class, in time and in bytes."""

    def __init__(
        self,
        root: Path,
        config: StoreConfig,
        spec: ImageInputConfig,
        classes: ClassPolicyConfig,
        seed: int = 0,
        features: FeatureFn | None = None,
    ) -> None:
        self.root = root
        self.features = None if config.keep_raw_images else features
        """With `keep_raw_images: false` and a frozen pretrained trunk: the trunk's features
        are stored instead of the input (5 KB a sample, whatever the camera size)."""
        self.config = config
        self.spec = spec
        self.classes = classes
        self.files = root / "samples"
        self.files.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            root / "ledger.sqlite", isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
        self._db.executescript(_SCHEMA)
        self._rng = np.random.default_rng([seed, self._total_offered()])
        self._refused: set[str] = set()
        self._recover()

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self._db)

    def _total_offered(self) -> int:
        return int(self._db.execute("SELECT COALESCE(SUM(count), 0) FROM offered").fetchone()[0])

    def _recover(self) -> None:
        """After a crash: drop temporary files and orphans, and rows whose file is gone."""
        listed = {row[0] for row in self._db.execute("SELECT file FROM samples")}
        for path in self.files.rglob("*"):
            if path.is_file():
                relative = str(path.relative_to(self.files))
                if path.name.startswith(".") or relative not in listed:
                    path.unlink(missing_ok=True)
        missing = [f for f in listed if not (self.files / f).is_file()]
        if missing:
            with self._transaction() as db:
                db.executemany("DELETE FROM samples WHERE file = ?", [(f,) for f in missing])
            log.warning("sample store: %d ledger rows had lost their file; removed", len(missing))

    # -- writing ----------------------------------------------------------------------------

    @_locked
    def add(self, sample: Sample) -> bool:
        """Offer a labelled sample; True when it was stored."""
        name = sample.label
        if name is None:
            raise ValueError("only labelled samples are stored")
        allowed = self.classes.allowed
        if allowed is not None and name not in allowed:
            if name not in self._refused:
                self._refused.add(name)
                log.warning(
                    "sample store: class %r is not in the fleet's allowed classes; "
                    "its samples are refused",
                    name,
                )
            return False
        digest = sample.sha256
        if self._db.execute("SELECT 1 FROM seen WHERE sha256 = ?", (digest,)).fetchone():
            log.debug("sample store: %s already seen (same content)", sample.origin)
            return False
        m = self._offered(name)
        held = self._count(name)
        cap = self.config.max_per_class
        replace: int | None = None
        if held >= cap:
            slot = int(self._rng.integers(0, m + 1))
            if slot >= cap:
                self._mark_seen(name, digest)
                return False
            ids = [
                r[0]
                for r in self._db.execute(
                    "SELECT id FROM samples WHERE class = ? ORDER BY id", (name,)
                )
            ]
            replace = ids[int(self._rng.integers(0, len(ids)))]
        blob, suffix = self._blob(sample)
        freed = self._make_room(len(blob), replace)
        if freed is None:
            log.warning(
                "sample store: full (%d of %d bytes); %s refused",
                self.usage().bytes,
                self.config.max_bytes,
                sample.origin,
            )
            self._mark_seen(name, digest, offered=False)
            return False
        relative = f"{digest[:2]}/{digest}{suffix}"
        self._write_file(self.files / relative, blob)
        with self._transaction() as db:
            db.execute(
                "INSERT INTO samples (class, sha256, file, bytes, arrived, origin) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (name, digest, relative, len(blob), sample.captured_at, sample.origin),
            )
            self._mark_seen(name, digest, db=db)
            removed = self._delete_rows(db, freed)
        self._unlink(removed)
        return True

    def _blob(self, sample: Sample) -> tuple[bytes, str]:
        """The stored bytes: the encoded file, or the preprocessed model input as `.npy`."""
        if self.config.keep_raw_images and sample.encoded is not None:
            png = sample.encoded[:4] == b"\x89PNG"
            return sample.encoded, ".png" if png else ".jpg"
        if self.config.keep_raw_images:  # a camera frame: stored losslessly as PNG
            from PIL import Image

            out = io.BytesIO()
            Image.fromarray(sample.pixels).save(out, format="PNG")
            return out.getvalue(), ".png"
        kept = fit_pixels(sample.pixels, self.spec)
        if self.features is not None:  # a frozen trunk: its features are all the learner needs
            kept = self.features(normalise(kept)[None])[0].astype(np.float32)
        out = io.BytesIO()
        np.save(out, kept, allow_pickle=False)
        return out.getvalue(), ".npy"

    @staticmethod
    def _write_file(path: Path, data: bytes) -> None:
        path.parent.mkdir(exist_ok=True)
        partial = path.with_name(f".{path.name}.tmp")
        with partial.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
        descriptor = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def _offered(self, name: str) -> int:
        row = self._db.execute("SELECT count FROM offered WHERE class = ?", (name,)).fetchone()
        return 0 if row is None else int(row[0])

    def _mark_seen(
        self, name: str, digest: str, offered: bool = True, db: sqlite3.Connection | None = None
    ) -> None:
        statements = [("INSERT OR IGNORE INTO seen (sha256) VALUES (?)", (digest,))]
        if offered:
            statements.append(
                (
                    "INSERT INTO offered (class, count) VALUES (?, 1) "
                    "ON CONFLICT(class) DO UPDATE SET count = count + 1",
                    (name,),
                )
            )
        if db is not None:
            for sql, args in statements:
                db.execute(sql, args)
            return
        with self._transaction() as tx:
            for sql, args in statements:
                tx.execute(sql, args)

    def _count(self, name: str) -> int:
        return int(
            self._db.execute("SELECT COUNT(*) FROM samples WHERE class = ?", (name,)).fetchone()[0]
        )

    def _make_room(self, size: int, replace: int | None) -> list[int] | None:
        """Ids to delete so that `size` more bytes fit (beyond `replace`); None: impossible.

        Only samples a round has trained on may make room: first those of older batches (the
        learner keeps its own memory of them), the largest class's oldest first, then those
        of the newest batch. Samples no round has seen yet are never evicted for newer ones.
        """
        chosen = [] if replace is None else [replace]
        used = self.usage().bytes - sum(self._sizes(chosen))
        if used + size <= self.config.max_bytes:
            return chosen
        newest = self.newest_batch()
        rows = self._db.execute(
            "SELECT s.id, s.bytes FROM samples s JOIN "
            "(SELECT class, COUNT(*) AS n FROM samples GROUP BY class) c ON s.class = c.class "
            "WHERE s.batch IS NOT NULL ORDER BY s.batch = ?, c.n DESC, s.arrived, s.id",
            (newest,),
        ).fetchall()
        for sample_id, nbytes in rows:
            if sample_id in chosen:
                continue
            chosen.append(sample_id)
            used -= nbytes
            if used + size <= self.config.max_bytes:
                return chosen
        return None

    def _sizes(self, ids: list[int]) -> list[int]:
        return [
            int(self._db.execute("SELECT bytes FROM samples WHERE id = ?", (i,)).fetchone()[0])
            for i in ids
        ]

    def _delete_rows(self, db: sqlite3.Connection, ids: list[int]) -> list[str]:
        files = [
            db.execute("SELECT file FROM samples WHERE id = ?", (i,)).fetchone()[0] for i in ids
        ]
        db.executemany("DELETE FROM samples WHERE id = ?", [(i,) for i in ids])
        return files

    def _unlink(self, files: list[str]) -> None:
        for relative in files:
            (self.files / relative).unlink(missing_ok=True)

    @_locked
    def expire(self, now: float | None = None) -> int:
        """Delete samples older than the retention window; how many went."""
        if self.config.retention_days is None:
            return 0
        cutoff = (time.time() if now is None else now) - self.config.retention_days * 86400
        with self._transaction() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM samples WHERE arrived < ?", (cutoff,))]
            removed = self._delete_rows(db, ids)
        self._unlink(removed)
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the WAL's pages back into the file
        return len(ids)

    # -- batches (what each round trains on) ------------------------------------------------

    def newest_batch(self) -> int | None:
        row = self._db.execute("SELECT MAX(batch) FROM samples").fetchone()
        recorded = self._db.execute("SELECT MAX(batch) FROM rounds").fetchone()
        values = [v for v in (row[0], recorded[0]) if v is not None]
        return max(values) if values else None

    @_locked
    def batch_of_round(self, round_index: int) -> int | None:
        """The batch (the learner's task) round `round_index` trains on, fixed once asked.

        Samples that arrived since the last round join the newest batch, unless they bring a
        class this device never met: then they open the next batch, so the learner closes
        the previous one (its exemplars and Fisher) exactly as at a task boundary. Only classes
        holding the fleet's `min_samples` take part. Recorded, so a device restarted in the
        middle of a round trains on the same batch again.
        """
        row = self._db.execute("SELECT batch FROM rounds WHERE round = ?", (round_index,))
        found = row.fetchone()
        if found is not None:
            return None if found[0] is None else int(found[0])
        newest = self.newest_batch()
        ready = [
            r[0]
            for r in self._db.execute(
                "SELECT class FROM samples GROUP BY class HAVING COUNT(*) >= ?",
                (self.classes.min_samples,),
            )
        ]
        marks = ",".join("?" * len(ready))
        arrived = (
            [
                r[0]
                for r in self._db.execute(
                    "SELECT DISTINCT class FROM samples "
                    f"WHERE batch IS NULL AND class IN ({marks})",
                    ready,
                )
            ]
            if ready
            else []
        )
        met = {r[0] for r in self._db.execute("SELECT class FROM met")}
        batch = newest
        if arrived and (newest is None or not set(arrived) <= met):
            batch = 0 if newest is None else newest + 1
        with self._transaction() as db:
            if arrived:
                db.execute(
                    f"UPDATE samples SET batch = ? WHERE batch IS NULL AND class IN ({marks})",
                    [batch, *ready],
                )
                db.executemany(
                    "INSERT OR IGNORE INTO met (class, batch) VALUES (?, ?)",
                    [(name, batch) for name in arrived],
                )
            db.execute("INSERT INTO rounds (round, batch) VALUES (?, ?)", (round_index, batch))
        return batch

    @_locked
    def batch_ids(self, batch: int) -> np.ndarray:
        rows = self._db.execute("SELECT id FROM samples WHERE batch = ? ORDER BY id", (batch,))
        return np.array([r[0] for r in rows], dtype=np.int64)

    # -- reading ----------------------------------------------------------------------------

    @_locked
    def rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model inputs (float32 `[n, C, H, W]`, or trunk features `[n, 1280]`) and class names
        of the ids still stored."""
        shape = self.row_shape
        images, names = [], []
        for sample_id in ids.tolist():
            row = self._db.execute(
                "SELECT class, file FROM samples WHERE id = ?", (sample_id,)
            ).fetchone()
            if row is None:
                continue
            try:
                images.append(self._load(self.files / row[1]))
            except (OSError, DataError, ValueError) as error:
                log.warning("sample store: %s unreadable (%s); skipped", row[1], error)
                continue
            names.append(row[0])
        x = np.stack(images) if images else np.zeros((0, *shape), np.float32)
        return x, np.array(names, dtype=np.str_)

    def _load(self, path: Path) -> np.ndarray:
        data = path.read_bytes()
        if path.suffix == ".npy":
            kept = np.load(io.BytesIO(data), allow_pickle=False)
            dtype = np.float32 if self.features is not None else np.uint8
            if kept.shape != self.row_shape or kept.dtype != dtype:
                raise DataError(f"stored {kept.shape} {kept.dtype}, expected {self.row_shape}")
            return kept if self.features is not None else normalise(kept)
        return normalise(fit_pixels(decode_image(data), self.spec))

    @property
    def row_shape(self) -> tuple[int, ...]:
        """One row of `rows`: the model input `(C, H, W)`, or `(1280,)` trunk features."""
        if self.features is not None:
            return (TRUNK_FEATURES,)
        return (self.spec.channels, self.spec.height, self.spec.width)

    @_locked
    def usage(self) -> StoreUsage:
        total, count = self._db.execute(
            "SELECT COALESCE(SUM(bytes), 0), COUNT(*) FROM samples"
        ).fetchone()
        classes = dict(self._db.execute("SELECT class, COUNT(*) FROM samples GROUP BY class"))
        ledger = sum(p.stat().st_size for p in self.root.glob("ledger.sqlite*") if p.is_file())
        return StoreUsage(
            int(count), int(total), ledger, {str(k): int(v) for k, v in classes.items()}
        )
