"""Material for watching a device learn from its own stream: a feeder and a video maker.

`simulate` on a stream fleet (`device_configs/fleets/stream-coil20.yaml`) gives every device
only its own watched folder; `FolderFeeder` copies real images (COIL-20 objects, read from
`../shared/datasets/coil20`) into those folders over time, each device meeting its classes at
its own times. `write_video` turns real images into a video file that `fedfmx-edge join` reads
as a camera (OpenCV's `VideoWriter`, Motion-JPEG in AVI: every OpenCV build reads it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedfmx.errors import DataError


def write_video(path: Path, images: list[np.ndarray], fps: float = 10.0) -> Path:
    """uint8 grey `[H, W]` or RGB `[H, W, 3]` images, all one size -> an MJPEG `.avi`."""
    import cv2

    if not images:
        raise DataError("no images to write into a video")
    height, width = images[0].shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise DataError(f"{path}: OpenCV cannot write an MJPEG video here")
    try:
        for image in images:
            rgb = np.stack([image] * 3, axis=2) if image.ndim == 2 else image
            writer.write(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return path
