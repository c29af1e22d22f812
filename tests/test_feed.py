"""The feed: a source drained into the store while the device runs, and what it keeps in RAM."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from stream_images import digit_pixels, write_digits

from edge_client.feed import StreamFeed
from edge_client.sample_store import SampleStore
from edge_client.sources.folder import FolderSource
from edge_client.stream_config import FolderSourceConfig, StoreConfig
from fedfmx.config import ClassPolicyConfig, ImageInputConfig
from fedfmx.data.preprocessing import model_input

SPEC = ImageInputConfig(channels=1, height=8, width=8)


def test_files_already_there_are_taken_in_before_start_returns_and_later_ones_follow(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "labelled"
    write_digits(folder, 4, 3)
    store = SampleStore(tmp_path / "store", StoreConfig(), SPEC, ClassPolicyConfig())
    feed = StreamFeed(
        [FolderSource(FolderSourceConfig(path=folder, settle_s=0.1))], store, SPEC, None
    )
    try:
        feed.start()
        assert store.usage().classes == {"4": 3}  # caught up before the device says hello
        images, names = feed.recent_images()
        expected = np.stack([model_input(p, SPEC) for p in digit_pixels(4, 3)])
        assert names.tolist() == ["4"] * 3
        np.testing.assert_array_equal(
            np.sort(images.reshape(3, -1), 0), np.sort(expected.reshape(3, -1), 0)
        )
        write_digits(folder, 9, 2)
        give_up = time.monotonic() + 10
        while store.usage().samples < 5 and time.monotonic() < give_up:
            time.sleep(0.1)  # the feed thread reads them; bounded wait on an observable state
        status = feed.status()
        assert status.store.classes == {"4": 3, "9": 2}
        assert status.sources[0].state == "running" and status.sources[0].samples == 5
    finally:
        feed.close()
    assert feed.sources[0].health().state == "ended"
