"""Material for watching a device learn from its own stream: a feeder and a video maker.

`simulate` on a stream fleet (`device_configs/fleets/stream-coil20.yaml`) gives every device
only its own watched folder; `FolderFeeder` copies real images (COIL-20 objects, read from
`../shared/datasets/coil20`) into those folders over time, each device meeting its classes at
its own times. `write_video` turns real images into a video file that `fedfmx-edge join` reads
as a camera (OpenCV's `VideoWriter`, Motion-JPEG in AVI: every OpenCV build reads it).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from fedfmx.config import FleetConfig
from fedfmx.datasets import ImageDataset
from fedfmx.errors import DataError
from fedfmx.simulation import make_plan


def write_video(path: Path, images: list[np.ndarray], fps: float = 10.0) -> Path:
    """uint8 grey `[H, W]` or RGB `[H, W, 3]` images, all one size -> an MJPEG `.avi`."""
    import cv2

    if not images:
        raise DataError("no images to write into a video")
    height, width = images[0].shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise DataError(f"{path}: OpenCV cannot write an MJPEG video here")
    try:
        for image in images:
            rgb = np.stack([image] * 3, axis=2) if image.ndim == 2 else image
            writer.write(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return path


class FolderFeeder:
    """Copies each device's share of the plan into its watched folder, round by round.

    Device k's folder receives, before round r, the images `plan.stream(k).available(r)`
    holds (written to a dot-name and renamed, as a careful copy tool does), as PNG files in
    `<folder>/<class name>/`: the plan's non-IID split and per-device lags decide when each
    device meets each class. The devices know none of this: they see files appear.
    """

    def __init__(self, fleet: FleetConfig, dataset: ImageDataset, folders: list[Path]) -> None:
        self.dataset = dataset
        self.folders = folders
        plan = make_plan(fleet, dataset)
        self.streams = [plan.stream(k, fleet.seed) for k in range(len(folders))]
        self.num_rounds = plan.num_rounds
        self._written: list[set[int]] = [set() for _ in folders]

    def deliver(self, round_index: int) -> int:
        """Write what each device holds by `round_index`; how many files were written."""
        if round_index >= self.num_rounds:
            return 0
        written = 0
        for k, (folder, stream) in enumerate(zip(self.folders, self.streams, strict=True)):
            for row in stream.available(round_index).tolist():
                if row in self._written[k]:
                    continue
                self._written[k].add(row)
                name = self.dataset.class_names[int(self.dataset.train_y[row])]
                pixels = np.round(self.dataset.train_x[row, 0] * 255).astype(np.uint8)
                target = folder / name / f"{row:05d}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(f".{target.name}.tmp")
                Image.fromarray(pixels).save(partial, format="PNG")
                os.replace(partial, target)
                written += 1
        return written
