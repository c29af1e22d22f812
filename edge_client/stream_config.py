"""The device YAML's sections for a device's own stream: its sources, sample store, predictions.

`data: {source: folder, ...}` or `data: {source: camera, ...}` replace the simulation's
`fleet_partition`; `store` bounds what the device keeps on disk; `predictions` says where the
served model's answers on unlabelled frames go.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from fedfmx.config import Section


class FolderSourceConfig(Section):
    """A directory with one sub-folder per class name; a person labels by moving files in.

    Watched with inotify (the `watchdog` library) where the OS offers it, else polled every
    `poll_interval_s`; a full rescan every `rescan_s` catches what any watcher can miss.
    """

    source: Literal["folder"] = "folder"
    path: Path
    poll_interval_s: float = Field(default=1.0, gt=0)
    """Polling period when inotify is unavailable (and the settle check's period)."""
    rescan_s: float = Field(default=30.0, gt=0)
    settle_s: float = Field(default=0.5, ge=0)
    """A file is read once its size and mtime have not changed for this long (a copy in
    progress is not read half-written)."""
    max_file_bytes: int = Field(default=20 * 2**20, gt=0)
    max_pixels: int = Field(default=40_000_000, gt=0)
    """Images with more pixels (from the header) are refused before decoding."""


class CameraSourceConfig(Section):
    """Frames from OpenCV `VideoCapture` (RTSP/HTTP URL, V4L2 device, video file) or picamera2.

    The reader runs in a child process that is killed and restarted when it stalls; frames are
    unlabelled: they are classified, and the unsure ones queued for a person to label into
    `labels_folder` (a folder source read beside the camera).
    """

    source: Literal["camera"] = "camera"
    url: str
    """`rtsp://...`, `http://...`, `/dev/video0` (or `0`), a video file, or `picamera2`."""
    sample_fps: float = Field(default=2.0, gt=0, le=120)
    """Frames handed on per second (the reader keeps only the latest frame in between)."""
    open_timeout_s: float = Field(default=10.0, gt=0)
    read_timeout_s: float = Field(default=5.0, gt=0)
    stall_s: float = Field(default=15.0, gt=0)
    """No frame for this long (opened or not): the reader process is killed and restarted."""
    backoff_min_s: float = Field(default=1.0, gt=0)
    backoff_max_s: float = Field(default=60.0, gt=0)
    loop_file: bool = False
    """A video file starts again at its end (demos); otherwise the source ends there."""
    labels_folder: FolderSourceConfig | None = None
    """Where labelled samples come from (the to-label queue's destination)."""


class StoreConfig(Section):
    """The bounded sample store under `state_dir/store` (`edge_client.sample_store`)."""

    max_per_class: int = Field(default=200, ge=1)
    """Reservoir cap per class: a uniform sample of everything that class ever sent."""
    max_bytes: int = Field(default=256 * 2**20, ge=1024)
    """Disk budget of the stored samples; the oldest trained samples of the largest class go
    first, and a sample that cannot fit is refused (logged)."""
    retention_days: float | None = Field(default=30.0, gt=0)
    """Samples older than this are deleted; None keeps them until the caps push them out."""
    keep_raw_images: bool = True
    """False keeps only what the learner needs, never the camera frame or the file itself:
    the preprocessed uint8 model input, or with a frozen pretrained trunk its features."""


class PredictionsConfig(Section):
    """Where the served model's predictions on unlabelled frames go, and what counts as unsure."""

    output: str = "predictions.jsonl"
    """A JSON-lines file (relative: under `state_dir`), or `-` for stdout."""
    mqtt: bool = False
    """Also publish each prediction on `fedfmx/v1/<fleet>/clients/<id>/predictions` (inside the
    device's ACL, QoS 1, not retained)."""
    unsure_score: Literal["max_probability", "energy"] = "max_probability"
    """`max_probability`: unsure below the threshold; `energy` (−logsumexp of the logits):
    unsure above it."""
    unsure_quantile: float = Field(default=0.1, gt=0, lt=1)
    """The threshold is this quantile of the score over the device's own labelled samples (for
    energy: 1 − it), recalibrated whenever a new model version serves."""
    fallback_probability: float = Field(default=0.5, gt=0, lt=1)
    """Max-probability threshold until the device holds labelled samples to calibrate on."""
    to_label_dir: Path | None = None
    """Where unsure frames are written as PNGs; None: `state_dir/to_label`."""
    to_label_max: int = Field(default=200, ge=1)
    """Queue bound: beyond it the oldest queued frame is deleted."""
