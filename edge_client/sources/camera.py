"""A camera as a source: a supervised reader process, restarted with back-off when it stalls.

A supervisor thread owns one reader process (`edge_client.sources.camera_reader`) at a time.
It restarts the reader when it exits (open failure, stream lost) and kills it when no frame
came for `stall_s` (a `read()` hung inside OpenCV cannot be interrupted any other way). The
delay before restart number n is `min(backoff_max, backoff_min·2ⁿ)·U(0.5, 1.5)` (jitter, so a
fleet does not reconnect to one camera server in lock-step), and n resets once frames flow.
`poll` returns only the latest frame since the last call: a slow device classifies what the
camera sees now, not a backlog.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.process
import queue
import random
import threading
import time

from edge_client.sources.base import Sample, SourceHealth, SourceState
from edge_client.sources.camera_reader import Frame, read_opencv, read_picamera2
from edge_client.stream_config import CameraSourceConfig

log = logging.getLogger(__name__)

_KILL_GRACE_S = 1.0
STARTUP_GRACE_S = 5.0
"""Beyond `open_timeout_s`, time a new reader gets to start (spawn, import OpenCV, probe)."""


class CameraSource:
    """Unlabelled frames from one camera."""

    def __init__(self, config: CameraSourceConfig) -> None:
        self.config = config
        self._context = multiprocessing.get_context("spawn")
        self._frames: multiprocessing.queues.Queue[Frame] = self._context.Queue(maxsize=2)
        self._events: multiprocessing.queues.Queue[tuple[str, str]] = self._context.Queue()
        self._changed = threading.Condition()
        self._latest: Frame | None = None
        self._returned = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="camera", daemon=True)
        self._process: multiprocessing.process.BaseProcess | None = None
        self._state: SourceState = "starting"
        self._detail = f"opening {config.url}"
        self._samples = 0
        self._restarts = 0
        self._opened = False

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._kill()
        if self._state != "ended":
            self._state = "ended"
        for q in (self._frames, self._events):
            q.cancel_join_thread()
            q.close()

    def health(self) -> SourceHealth:
        return SourceHealth(
            "camera", self._state, self._detail, self._samples, restarts=self._restarts
        )

    def poll(self, timeout_s: float) -> list[Sample]:
        with self._changed:
            self._changed.wait_for(
                lambda: self._latest is not None and self._latest[0] != self._returned,
                timeout=timeout_s,
            )
            frame = self._latest
            if frame is None or frame[0] == self._returned:
                return []
            self._returned = frame[0]
        number, read_at, pixels = frame
        self._samples += 1
        return [Sample(pixels, None, f"{self.config.url}#{number}", read_at)]

    # -- supervision --------------------------------------------------------------------------

    def _spawn(self) -> None:
        c = self.config
        if c.url == "picamera2":
            target, args = read_picamera2, (c.sample_fps, self._frames, self._events)
        else:
            target = read_opencv  # type: ignore[assignment]
            args = (  # type: ignore[assignment]
                c.url,
                c.sample_fps,
                c.open_timeout_s,
                c.read_timeout_s,
                c.loop_file,
                self._frames,
                self._events,
            )
        self._process = self._context.Process(target=target, args=args, daemon=True)
        self._process.start()

    def _kill(self) -> None:
        process = self._process
        if process is None:
            return
        if process.is_alive():
            process.terminate()
            process.join(_KILL_GRACE_S)
            if process.is_alive():
                process.kill()
        process.join(_KILL_GRACE_S)
        self._process = None

    def _set(self, state: SourceState, detail: str) -> None:
        if (state, detail) != (self._state, self._detail):
            level = logging.INFO if state in ("running", "starting") else logging.WARNING
            log.log(level, "camera %s: %s", state, detail)
        self._state, self._detail = state, detail

    def _backoff(self, failures: int) -> float:
        c = self.config
        return min(c.backoff_max_s, c.backoff_min_s * 2**failures) * random.uniform(0.5, 1.5)

    def _supervise(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._spawn()
            outcome, got_frame = self._watch()
            self._kill()
            if outcome == "ended" or self._stop.is_set():
                return
            if got_frame:
                failures = 0
            delay = self._backoff(failures)
            failures += 1
            self._restarts += 1
            self._set("reconnecting", f"{outcome}; retrying in {delay:.1f} s")
            if self._stop.wait(delay):
                return

    def _event(self, timeout_s: float) -> str | None:
        """Handle one event from the reader; returns why it is over, if it is."""
        try:
            kind, detail = (
                self._events.get(timeout=timeout_s) if timeout_s else self._events.get_nowait()
            )
        except queue.Empty:
            return None
        if kind == "opened":
            self._opened = True
            self._set(self._state if self._state == "running" else "starting", detail)
            return None
        if kind == "ended":
            self._set("ended", detail)
            return "ended"
        return detail

    def _watch(self) -> tuple[str, bool]:
        """Follow one reader process: why it is over, and whether it gave any frame."""
        last_frame = time.monotonic()
        got_frame = self._opened = False
        while not self._stop.is_set():
            over = self._event(0)
            if over is not None:
                return over, got_frame
            try:
                frame = self._frames.get(timeout=0.05)  # wakes as soon as a frame is there
                while True:
                    if not got_frame:  # said before the frame is handed on: a reader of the
                        got_frame = True  # frame never sees the source still "reconnecting"
                        self._set("running", f"frames from {self.config.url}")
                    with self._changed:
                        self._latest = frame
                        self._changed.notify_all()
                    last_frame = time.monotonic()
                    frame = self._frames.get_nowait()
            except queue.Empty:
                pass
            process = self._process
            if process is not None and not process.is_alive():
                over = self._event(0.5)  # its last word may still be in the pipe
                return over or f"reader exited (code {process.exitcode})", got_frame
            c = self.config
            limit = c.stall_s if self._opened else c.open_timeout_s + STARTUP_GRACE_S
            if time.monotonic() - last_frame > limit:
                what = "no frame" if self._opened else "not opened"
                return f"{what} for {limit:.1f} s: reader killed", got_frame
        return "stopped", got_frame
