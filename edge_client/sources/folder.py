"""A watched folder: one sub-folder per class name, a person labels by moving files into it.

A class name with slashes (`coil20/obj07`) is a nested folder.

`watchdog`'s observer (inotify on Linux; its polling observer where inotify is refused) only
marks paths as candidates; `poll` reads a candidate once its size and mtime have held still
for `settle_s`, so a copy in progress is never read half-written. Anything that is not a
readable JPEG/PNG within the size bounds (zero bytes, truncated, corrupt, foreign, too many
pixels, too many bytes) is skipped with one log line and moved to `<folder>/.rejected/`, never
retried and never fatal. A class folder that disappears (renamed or removed) is logged; what it
already gave stays in the store under its old name, and files that reappear under a new name
are recognised by content (`Sample.sha256`) and not counted twice.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from edge_client.sources.base import Sample, SourceHealth, SourceState
from edge_client.stream_config import FolderSourceConfig
from fedfmx.data.preprocessing import decode_image
from fedfmx.errors import DataError

log = logging.getLogger(__name__)

REJECTED = ".rejected"
MAX_CLASS_DEPTH = 3
"""A class folder may be nested (`coil20/obj07` is the class of `<root>/coil20/obj07/x.png`),
at most this deep."""
_IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", "~")
"""Names that copy tools use while a file is being written: not samples (yet)."""


def _is_candidate_name(name: str) -> bool:
    return not name.startswith(".") and not name.endswith(_IGNORED_SUFFIXES)


class _Marker(FileSystemEventHandler):
    """Watchdog handler: marks touched paths; the source's `poll` does the reading."""

    def __init__(self, source: FolderSource) -> None:
        self.source = source

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        paths = [event.src_path, getattr(event, "dest_path", "")]
        self.source.mark([Path(os.fsdecode(p)) for p in paths if p], directory=event.is_directory)


class FolderSource:
    """Labelled samples from `<path>/<class name>/<file>`."""

    def __init__(self, config: FolderSourceConfig) -> None:
        self.config = config
        self.root = config.path
        self._lock = threading.Condition()
        self._pending: dict[Path, tuple[int, int, float]] = {}
        """Candidate -> (size, mtime_ns, monotonic time it was first seen so)."""
        self._known: dict[Path, tuple[int, int]] = {}
        """Files already read (or rejected), with the size and mtime they had then."""
        self._classes: set[str] = set()
        self._rescan_due = True
        self._next_rescan = 0.0
        self._observer: BaseObserver | None = None
        self._state: SourceState = "starting"
        self._detail = ""
        self._samples = 0
        self._rejected = 0

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DataError(
                f"{self.root}: cannot be the folder source ({error.strerror}); "
                "give a folder (it is created if missing)"
            ) from None
        handler = _Marker(self)
        try:
            observer: BaseObserver = Observer()
            observer.schedule(handler, str(self.root), recursive=True)
            observer.start()
            how = "inotify"
        except OSError as error:  # inotify watch limit, or a file system without it
            log.warning(
                "folder %s: no inotify (%s); polling every %.1f s",
                self.root,
                error,
                self.config.poll_interval_s,
            )
            observer = PollingObserver(timeout=self.config.poll_interval_s)
            observer.schedule(handler, str(self.root), recursive=True)
            observer.start()
            how = "polling"
        self._observer = observer
        self._state, self._detail = "running", f"watching {self.root} ({how})"

    def close(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
        self._state = "ended"

    def health(self) -> SourceHealth:
        return SourceHealth("folder", self._state, self._detail, self._samples, self._rejected)

    # -- events -----------------------------------------------------------------------------

    def mark(self, paths: list[Path], directory: bool) -> None:
        """Called from the observer thread: remember candidates, wake `poll`."""
        with self._lock:
            if directory:
                self._rescan_due = True
            for path in paths:
                if not directory and self._is_sample_path(path):
                    self._pending.setdefault(path, (-1, -1, time.monotonic()))
            self._lock.notify_all()

    def _is_sample_path(self, path: Path) -> bool:
        try:
            relative = path.relative_to(self.root)
        except ValueError:
            return False
        parts = relative.parts
        return 2 <= len(parts) <= MAX_CLASS_DEPTH + 1 and all(map(_is_candidate_name, parts))

    # -- reading ----------------------------------------------------------------------------

    def poll(self, timeout_s: float) -> list[Sample]:
        """Read every settled candidate; wait up to `timeout_s` when there is none."""
        give_up = time.monotonic() + timeout_s
        while True:
            if time.monotonic() >= self._next_rescan or self._rescan_due:
                self._rescan()
            samples = [s for s in map(self._read_if_settled, self._settled()) if s is not None]
            left = give_up - time.monotonic()
            if samples or left <= 0:
                return samples
            with self._lock:
                wait = left if not self._pending else min(left, max(0.05, self.config.settle_s / 2))
                self._lock.wait(timeout=wait)

    def _rescan(self) -> None:
        """Walk the class folders: catch files no event announced, and log class changes."""
        with self._lock:
            self._rescan_due = False
        self._next_rescan = time.monotonic() + self.config.rescan_s
        if not self.root.is_dir():
            self._state, self._detail = "failed", f"{self.root} is not a readable folder"
            log.warning("folder source: %s", self._detail)
            return
        files: dict[str, list[os.DirEntry[str]]] = {}
        for directory, subdirectories, _ in os.walk(self.root):
            depth = len(Path(directory).relative_to(self.root).parts)
            subdirectories[:] = [
                d for d in subdirectories if _is_candidate_name(d) and depth < MAX_CLASS_DEPTH
            ]
            if depth == 0:
                continue
            try:
                entries = [e for e in os.scandir(directory) if e.is_file()]
            except OSError:
                continue  # removed while we looked: the next rescan logs it
            if entries or not subdirectories:
                files[self.class_of(Path(directory) / "x")] = entries
        classes = set(files)
        for gone in sorted(self._classes - classes):
            log.warning(
                "folder %s: class folder %r is gone (renamed or removed); the samples it gave "
                "stay stored under %r",
                self.root,
                gone,
                gone,
            )
            self._known = {p: v for p, v in self._known.items() if self.class_of(p) != gone}
        for new in sorted(classes - self._classes):
            if self._classes:
                log.info("folder %s: new class folder %r", self.root, new)
        self._classes = classes
        now = time.monotonic()
        with self._lock:
            for entries in files.values():
                for entry in entries:
                    path = Path(entry.path)
                    if _is_candidate_name(entry.name):
                        stat = entry.stat()
                        if self._known.get(path) != (stat.st_size, stat.st_mtime_ns):
                            self._pending.setdefault(path, (-1, -1, now))

    def class_of(self, path: Path) -> str:
        """A file's class: its folder below the root (`obj07`, or nested: `coil20/obj07`)."""
        return path.parent.relative_to(self.root).as_posix()

    def _settled(self) -> list[Path]:
        """Candidates whose size and mtime held still for `settle_s` (others stay pending)."""
        ready = []
        now = time.monotonic()
        with self._lock:
            for path, (size, mtime, since) in list(self._pending.items()):
                try:
                    stat = path.stat()
                except OSError:
                    del self._pending[path]  # moved or deleted before it settled
                    continue
                if (stat.st_size, stat.st_mtime_ns) != (size, mtime):
                    self._pending[path] = (stat.st_size, stat.st_mtime_ns, now)
                elif now - since >= self.config.settle_s:
                    del self._pending[path]
                    if self._known.get(path) != (size, mtime):
                        ready.append(path)
        return ready

    def _read_if_settled(self, path: Path) -> Sample | None:
        try:
            stat = path.stat()
            if stat.st_size > self.config.max_file_bytes:
                raise DataError(
                    f"{stat.st_size:,} bytes exceeds the {self.config.max_file_bytes:,}-byte bound"
                )
            data = path.read_bytes()
            pixels = decode_image(data, self.config.max_pixels)
        except FileNotFoundError:
            return None
        except (DataError, OSError) as error:
            self._reject(path, str(error))
            return None
        self._known[path] = (stat.st_size, stat.st_mtime_ns)
        self._samples += 1
        return Sample(pixels, self.class_of(path), str(path), time.time(), data)

    def _reject(self, path: Path, problem: str) -> None:
        """One log line, and the file moved aside so that it is not read again."""
        self._rejected += 1
        aside = self.root / REJECTED / f"{self.class_of(path).replace('/', '__')}__{path.name}"
        try:
            aside.parent.mkdir(exist_ok=True)
            if aside.exists():
                aside = aside.with_name(f"{time.time_ns()}-{aside.name}")
            os.replace(path, aside)
            where = f"moved to {aside.relative_to(self.root)}"
        except OSError as error:
            where = f"could not move it aside ({error}); not read again until it changes"
            try:
                stat = path.stat()
                self._known[path] = (stat.st_size, stat.st_mtime_ns)
            except OSError:
                pass
        log.warning("folder source: skipped %s: %s; %s", path, problem, where)
