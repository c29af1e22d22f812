"""The camera source on real streams: an HTTP MJPEG camera killed and restarted mid-run, a
camera that never sends a frame, and a video file made from real images."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from mjpeg_server import MjpegCamera, SilentServer
from stream_images import digit_pixels, encode

from edge_client.sources.base import Sample
from edge_client.sources.camera import STARTUP_GRACE_S, CameraSource
from edge_client.stream_config import CameraSourceConfig
from fedfmx_cli.stream_demo import write_video


def frames(count: int = 5) -> list[np.ndarray]:
    return [p.repeat(8, 0).repeat(8, 1) for p in digit_pixels(3, count)]  # 64x64, real digits


def camera(url: str, **config: object) -> CameraSource:
    settings = {
        "sample_fps": 5.0,
        "open_timeout_s": 2.0,
        "read_timeout_s": 1.0,
        "stall_s": 3.0,
        "backoff_min_s": 0.2,
        "backoff_max_s": 1.0,
    } | config
    return CameraSource(CameraSourceConfig(url=url, **settings))  # type: ignore[arg-type]


@pytest.fixture
def running() -> Iterator[list[CameraSource]]:
    started: list[CameraSource] = []
    yield started
    for source in started:
        source.close()


def collect(source: CameraSource, want: int, within_s: float) -> list[Sample]:
    got: list[Sample] = []
    give_up = time.monotonic() + within_s
    while len(got) < want and time.monotonic() < give_up:
        got += source.poll(0.5)
    return got


def test_an_mjpeg_camera_killed_and_restarted_mid_run(running: list[CameraSource]) -> None:
    jpegs = [encode(f, "JPEG") for f in frames()]
    server = MjpegCamera(jpegs, fps=10).start()
    source = camera(server.url)
    running.append(source)
    source.start()
    first = collect(source, 3, 20)
    assert len(first) == 3
    assert all(s.label is None and s.pixels.shape == (64, 64, 3) for s in first)
    assert source.health().state == "running"
    server.stop()  # the camera loses power
    give_up = time.monotonic() + 10
    while source.health().state != "reconnecting" and time.monotonic() < give_up:
        assert source.poll(0.2) == []
    lost = source.health()
    assert lost.state == "reconnecting" and lost.restarts >= 1
    server = MjpegCamera(jpegs, fps=10, port=server.port).start()  # ... and comes back
    try:
        again = collect(source, 3, 30)
        state = source.health().state  # before the server goes away again
    finally:
        server.stop()
    assert len(again) == 3
    assert state == "running"
    numbers = [int(s.origin.rsplit("#", 1)[1]) for s in first + again]
    assert numbers[3] < numbers[2]  # a new reader process counts from 1 again


@pytest.mark.parametrize("kind", ["silent server", "refused port", "missing file"])
def test_a_camera_that_never_yields_a_frame_is_reported_in_bounded_time(
    kind: str, running: list[CameraSource], tmp_path: Path
) -> None:
    silent = SilentServer()
    url = {
        "silent server": silent.url,
        "refused port": "http://127.0.0.1:9/none.mjpg",
        "missing file": str(tmp_path / "no-such-video.avi"),
    }[kind]
    source = camera(url, open_timeout_s=1.0, stall_s=1.0)
    running.append(source)
    started = time.monotonic()
    source.start()
    try:
        limit = 1.0 + STARTUP_GRACE_S + 3.0
        while source.health().restarts == 0 and time.monotonic() - started < limit:
            assert source.poll(0.5) == []
        health = source.health()
    finally:
        silent.close()
    assert time.monotonic() - started < limit + 1.0  # bounded: polls never block past timeout
    assert health.state == "reconnecting" and health.restarts >= 1
    assert url in health.detail or "not opened" in health.detail or "no frame" in health.detail


def test_a_video_file_made_from_real_images_plays_to_its_end(
    running: list[CameraSource], tmp_path: Path
) -> None:
    video = write_video(tmp_path / "clip.avi", frames(10), fps=20.0)
    source = camera(str(video), sample_fps=50.0)
    running.append(source)
    source.start()
    got = collect(source, 10, 20)
    give_up = time.monotonic() + 10
    while source.health().state != "ended" and time.monotonic() < give_up:
        got += source.poll(0.2)
    assert source.health().state == "ended" and source.health().restarts == 0
    assert 5 <= len(got) <= 10  # latest-frame-only may drop a few; never repeats
    assert len({s.origin for s in got}) == len(got)
    first = got[0].pixels.mean(axis=2)
    expected = frames(10)[int(got[0].origin.rsplit("#", 1)[1]) - 1].astype(float)
    assert np.abs(first - expected).mean() < 12  # MJPEG is lossy, but it is that digit
