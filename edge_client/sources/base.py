"""What every device source hands over, and the interface it does it through.

A source (a watched folder, a camera, ...) yields `Sample`s: decoded pixels, a class name when
a person gave one (a folder's sub-folder), and where it came from. It never trains, stores or
classifies: `edge_client.feed` routes labelled samples into the sample store and unlabelled
ones to the served model. Sources run their own threads or child processes; `poll` only drains
what they have, waiting at most `timeout_s`, so nothing upstream can stall on a dead camera.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

SourceState = Literal["starting", "running", "reconnecting", "ended", "failed"]


@dataclass(frozen=True, eq=False)
class Sample:
    """One image from a source; `eq=False`: arrays have no single truth value."""

    pixels: np.ndarray
    """Decoded uint8 `[H, W]` (grey) or `[H, W, 3]` (RGB)."""
    label: str | None
    """Class name; None for an unlabelled frame (it is classified, not learnt from)."""
    origin: str
    """A file path, or `<camera url>#<frame number>`."""
    captured_at: float = field(default_factory=time.time)
    """Unix time the source read it (the start of camera-to-prediction latency)."""
    encoded: bytes | None = None
    """The file as read (JPEG/PNG), kept by a store with `keep_raw_images`."""

    @property
    def sha256(self) -> str:
        """Content id: the encoded file's hash, else the pixels' (dedup across renames)."""
        data = self.encoded if self.encoded is not None else self.pixels.tobytes()
        return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class SourceHealth:
    """What a source says about itself in the device's status and logs."""

    kind: str
    state: SourceState
    detail: str = ""
    samples: int = 0
    """Samples yielded since start."""
    rejected: int = 0
    """Files skipped (corrupt, partial, oversize, ...) since start."""
    restarts: int = 0
    """Camera reader processes restarted since start."""


class SampleSource(Protocol):
    """A device's source of images."""

    def start(self) -> None: ...

    def poll(self, timeout_s: float) -> list[Sample]:
        """Samples that arrived since the last call, waiting up to `timeout_s` for the first."""
        ...

    def health(self) -> SourceHealth: ...

    def close(self) -> None: ...
