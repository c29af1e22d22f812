"""A device's own stream at work: sources drained into the sample store and the served model.

One thread polls every source in turn (each poll waits a bounded time, so a dead camera never
holds up the folder beside it): labelled samples go into the `SampleStore`, where the next
round finds them; unlabelled frames go to the `StreamPredictor`. A small ring of recent
preprocessed images stays in memory only, for the export's parity check and int8 calibration
where the store holds no images (nothing labelled yet, or trunk features only); they are never
written for this.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from edge_client.predictions import StreamPredictor
from edge_client.sample_store import SampleStore, StoreUsage
from edge_client.sources.base import Sample, SampleSource, SourceHealth
from fedfmx.config import ImageInputConfig
from fedfmx.data.preprocessing import model_input
from fedfmx.errors import FedFMXError

log = logging.getLogger(__name__)

POLL_S = 0.2
"""Longest wait on one source before the next is polled."""
EXPIRE_EVERY_S = 60.0
CATCH_UP_S = 10.0
"""At start, how long the device may spend taking in what its sources already hold."""
CATCH_UP_POLL_S = 1.0
RECENT_FRAMES = 64


@dataclass(frozen=True)
class FeedStatus:
    sources: list[SourceHealth]
    store: StoreUsage
    predicted: int
    unsure: int
    queued_to_label: int


class StreamFeed:
    """Runs the device's sources until stopped."""

    def __init__(
        self,
        sources: list[SampleSource],
        store: SampleStore,
        spec: ImageInputConfig,
        predictor: StreamPredictor | None,
    ) -> None:
        self.sources = sources
        self.store = store
        self.spec = spec
        self.predictor = predictor
        self.recent: deque[np.ndarray] = deque(maxlen=RECENT_FRAMES)
        self.recent_labelled: deque[tuple[np.ndarray, str]] = deque(maxlen=RECENT_FRAMES)
        self.stored = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feed", daemon=True)

    def start(self) -> None:
        """Start the sources, take what they already hold (a folder's files: for at most
        `CATCH_UP_S`), then keep following them on the feed thread."""
        for source in self.sources:
            source.start()
        give_up = time.monotonic() + CATCH_UP_S
        for source in self.sources:
            while time.monotonic() < give_up and (batch := source.poll(CATCH_UP_POLL_S)):
                for sample in batch:
                    self._handle_logged(sample)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for source in self.sources:
            source.close()
        if self.predictor is not None:
            self.predictor.close()
        self.store.close()

    def _run(self) -> None:
        next_expiry = 0.0
        while not self._stop.is_set():
            for source in self.sources:
                for sample in source.poll(POLL_S / len(self.sources)):
                    self._handle_logged(sample)
            if time.monotonic() >= next_expiry:
                next_expiry = time.monotonic() + EXPIRE_EVERY_S
                expired = self.store.expire()
                if expired:
                    log.info("sample store: %d samples past the retention window deleted", expired)

    def _handle_logged(self, sample: Sample) -> None:
        try:
            self._handle(sample)
        except (FedFMXError, OSError, sqlite3.Error) as error:
            log.warning("feed: %s not handled: %s", sample.origin, error)

    def _handle(self, sample: Sample) -> None:
        x = model_input(sample.pixels, self.spec)
        if sample.label is not None:
            self.stored += self.store.add(sample)
            self.recent_labelled.append((x, sample.label))
            return
        self.recent.append(x)
        if self.predictor is not None:
            self.predictor.classify(sample)

    def recent_images(self) -> tuple[np.ndarray, np.ndarray]:
        """The latest preprocessed images (float32 [n, C, H, W]) and their class names: the
        labelled ones if any came, else unlabelled frames (names ""). For the export's parity
        check and calibration when the store holds no images (features only, or nothing yet)."""
        shape = (self.spec.channels, self.spec.height, self.spec.width)
        if self.recent_labelled:
            images, names = zip(*self.recent_labelled, strict=True)
            return np.stack(images), np.array(names, dtype=np.str_)
        frames = list(self.recent)
        if not frames:
            return np.zeros((0, *shape), np.float32), np.zeros(0, dtype=np.str_)
        return np.stack(frames), np.full(len(frames), "", dtype=np.str_)

    def status(self) -> FeedStatus:
        predictor = self.predictor
        return FeedStatus(
            sources=[source.health() for source in self.sources],
            store=self.store.usage(),
            predicted=0 if predictor is None else predictor.predicted,
            unsure=0 if predictor is None else predictor.unsure,
            queued_to_label=0 if predictor is None else len(predictor.queue),
        )
