"""The watched folder: files appearing while it runs, bad files set aside, class folders moved."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from stream_images import digit_pixels, encode, write_digits

from edge_client.sources.base import Sample
from edge_client.sources.folder import REJECTED, FolderSource
from edge_client.stream_config import FolderSourceConfig


def collect(source: FolderSource, want: int, within_s: float = 10.0) -> list[Sample]:
    """Poll until `want` samples arrived or the time is up (bounded, never a bare sleep)."""
    samples: list[Sample] = []
    give_up = time.monotonic() + within_s
    while len(samples) < want and time.monotonic() < give_up:
        samples += source.poll(0.5)
    return samples


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[FolderSource]:
    source = FolderSource(
        FolderSourceConfig(
            path=tmp_path / "labelled", settle_s=0.3, max_pixels=100_000, max_file_bytes=200_000
        )
    )
    source.start()
    yield source
    source.close()


def test_files_that_appear_while_it_runs_become_labelled_samples(folder: FolderSource) -> None:
    write_digits(folder.root, 3, 4)
    write_digits(folder.root, 7, 2, fmt="JPEG")
    samples = collect(folder, 6)
    assert sorted(s.label for s in samples) == ["3"] * 4 + ["7"] * 2
    assert all(s.pixels.shape == (8, 8) and s.pixels.dtype.name == "uint8" for s in samples)
    write_digits(folder.root, 5, 1, start=10)  # a new class folder, later
    later = collect(folder, 1)
    assert [s.label for s in later] == ["5"]
    assert folder.poll(0.5) == []  # nothing is read twice
    assert folder.health().samples == 7 and folder.health().state == "running"


def test_bad_files_are_skipped_logged_and_moved_aside(
    folder: FolderSource, caplog: pytest.LogCaptureFixture
) -> None:
    cls = folder.root / "4"
    cls.mkdir(parents=True)
    good = encode(digit_pixels(4, 1)[0], "JPEG")
    big = encode(digit_pixels(4, 1)[0].repeat(50, 0).repeat(50, 1), "PNG")  # 400x400 > 100k px
    files = {
        "zero.png": b"",
        "corrupt.jpg": bytes(range(256)) * 4,
        "partial.jpg": good[: len(good) // 2],
        "notes.png": b"these are not pixels\n",
        "huge-pixels.png": big,
        "huge-bytes.png": good + b"\0" * 300_000,
    }
    with caplog.at_level(logging.WARNING):
        for name, data in files.items():
            (cls / name).write_bytes(data)
        (cls / "ok.jpg").write_bytes(good)
        samples = collect(folder, 1)
        give_up = time.monotonic() + 10
        while folder.health().rejected < len(files) and time.monotonic() < give_up:
            samples += folder.poll(0.3)
    assert [s.origin for s in samples] == [str(cls / "ok.jpg")]
    rejected = sorted(p.name for p in (folder.root / REJECTED).iterdir())
    assert rejected == sorted(f"4__{name}" for name in files)
    assert sorted(p.name for p in cls.iterdir()) == ["ok.jpg"]
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == len(files)  # one line each
    assert any("0 bytes" in line for line in lines)
    assert any("pixel bound" in line for line in lines)
    assert any("byte bound" in line for line in lines)


def test_a_file_still_being_written_is_read_once_complete(folder: FolderSource) -> None:
    cls = folder.root / "2"
    cls.mkdir(parents=True)
    data = encode(digit_pixels(2, 1)[0].repeat(8, 0).repeat(8, 1), "PNG")
    target = cls / "slow.png"
    with target.open("wb") as handle:  # a slow copy: half now, the rest 0.1 s later
        handle.write(data[: len(data) // 2])
        handle.flush()
        assert folder.poll(0.1) == []
        handle.write(data[len(data) // 2 :])
    samples = collect(folder, 1)
    assert [s.origin for s in samples] == [str(target)]
    assert samples[0].encoded == data
    assert folder.health().rejected == 0


def test_a_renamed_or_removed_class_folder_is_logged_and_not_fatal(
    folder: FolderSource, caplog: pytest.LogCaptureFixture
) -> None:
    write_digits(folder.root, 1, 2)
    write_digits(folder.root, 6, 2)
    first = collect(folder, 4)
    assert len(first) == 4
    with caplog.at_level(logging.INFO):
        (folder.root / "1").rename(folder.root / "one")
        shutil.rmtree(folder.root / "6")
        moved = collect(folder, 2)
    # files under the new name are offered again; their content ids are those already seen,
    # so a store counts them once (tests/test_sample_store.py)
    assert sorted(s.label for s in moved) == ["one", "one"]
    assert {s.sha256 for s in moved} <= {s.sha256 for s in first}
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "'1' is gone" in messages and "'6' is gone" in messages
    assert "new class folder 'one'" in messages
    write_digits(folder.root, 8, 1)
    assert [s.label for s in collect(folder, 1)] == ["8"]
