"""The camera reader: the child process that owns `cv2.VideoCapture` (or picamera2).

It runs apart from the device because OpenCV's `read()` can hang for good after a camera
reconnects (DESIGN §10): the parent (`edge_client.sources.camera`) kills this process when it
stalls and starts another. It imports only OpenCV and numpy (started with `spawn`, so it
inherits none of the device's threads or torch state) and talks through two queues: `frames`
holds at most the latest frames (older ones are dropped here, never queued), `events` carries
the few state changes (opened, failed, ended).
"""

from __future__ import annotations

import contextlib
import multiprocessing.queues
import queue
import time
from pathlib import Path

import numpy as np

Frame = tuple[int, float, np.ndarray]
"""(frame number, unix time read, RGB uint8 [H, W, 3])."""


def _hand_over(frames: multiprocessing.queues.Queue[Frame], frame: Frame) -> None:
    """Put `frame`, dropping the oldest queued one when the queue is full (latest only)."""
    try:
        frames.put_nowait(frame)
    except queue.Full:
        with contextlib.suppress(queue.Empty):
            frames.get_nowait()
        with contextlib.suppress(queue.Full):
            frames.put_nowait(frame)


def _open_capture(url: str, open_timeout_s: float, read_timeout_s: float) -> object:
    import cv2

    timeouts = [
        cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
        int(open_timeout_s * 1000),
        cv2.CAP_PROP_READ_TIMEOUT_MSEC,
        int(read_timeout_s * 1000),
    ]
    if url.isdigit():
        return cv2.VideoCapture(int(url), cv2.CAP_V4L2, timeouts)
    if url.startswith("/dev/video"):
        return cv2.VideoCapture(url, cv2.CAP_V4L2, timeouts)
    return cv2.VideoCapture(url, cv2.CAP_FFMPEG, timeouts)


def read_opencv(
    url: str,
    sample_fps: float,
    open_timeout_s: float,
    read_timeout_s: float,
    loop_file: bool,
    frames: multiprocessing.queues.Queue[Frame],
    events: multiprocessing.queues.Queue[tuple[str, str]],
) -> None:
    """Read `url` until it fails or ends; hand on at most `sample_fps` frames a second.

    A video file is read at its own frame rate (so a file plays like a camera would); a live
    stream as fast as it delivers, which keeps OpenCV's buffer from growing stale.
    """
    import cv2

    is_device = "://" in url or url.isdigit() or url.startswith("/dev/")
    if not is_device and not Path(url).is_file():
        events.put(("failed", f"{url}: no such video file"))
        return
    capture = _open_capture(url, open_timeout_s, read_timeout_s)
    if not capture.isOpened():  # type: ignore[attr-defined]
        events.put(("failed", f"could not open {url} within {open_timeout_s:.1f} s"))
        return
    is_file = Path(url).is_file()
    native_fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0) if is_file else 0.0  # type: ignore[attr-defined]
    events.put(("opened", f"opened {url}"))
    period = 1.0 / sample_fps
    next_send = 0.0
    number = 0
    started = time.monotonic()
    while True:
        ok, bgr = capture.read()  # type: ignore[attr-defined]
        if not ok or bgr is None:
            if is_file and loop_file:
                capture.set(cv2.CAP_PROP_POS_FRAMES, 0)  # type: ignore[attr-defined]
                continue
            kind = "ended" if is_file else "failed"
            events.put((kind, f"{url}: end of file" if is_file else f"{url}: read failed"))
            return
        number += 1
        if native_fps > 0:  # pace a file at its own rate
            delay = started + number / native_fps - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        now = time.monotonic()
        if now >= next_send:
            next_send = now + period
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            _hand_over(frames, (number, time.time(), np.ascontiguousarray(rgb)))


def read_picamera2(
    sample_fps: float,
    frames: multiprocessing.queues.Queue[Frame],
    events: multiprocessing.queues.Queue[tuple[str, str]],
) -> None:
    """The Raspberry Pi camera through picamera2 (from apt on Pi OS: `python3-picamera2`)."""
    try:
        from picamera2 import Picamera2
    except ImportError:
        events.put(("failed", "picamera2 is not installed: sudo apt install python3-picamera2"))
        return
    camera = Picamera2()
    camera.configure(camera.create_still_configuration(main={"format": "RGB888"}))
    camera.start()
    events.put(("opened", "opened picamera2"))
    number = 0
    while True:
        started = time.monotonic()
        pixels = np.ascontiguousarray(camera.capture_array()[..., 2::-1])  # RGB888 is B,G,R
        number += 1
        _hand_over(frames, (number, time.time(), pixels))
        time.sleep(max(0.0, 1.0 / sample_fps - (time.monotonic() - started)))
