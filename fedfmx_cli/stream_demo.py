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
from fedfmx.data.datasets import ImageDataset
from fedfmx.errors import DataError
from fedfmx.federation.simulation import make_plan


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
                pixels = _unit_to_uint8(self.dataset.train_x[row, 0])
                target = folder / name / f"{row:05d}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(f".{target.name}.tmp")
                Image.fromarray(pixels).save(partial, format="PNG")
                os.replace(partial, target)
                written += 1
        return written


def camera_demo(out: Path, data_path: Path | None, broker_url: str) -> list[Path]:
    """Write a one-camera fleet to watch: its YAMLs, a labels folder and a video of real photos.

    COIL-20 objects 1-4 are the labelled classes (12 photos each, in `labelled/coil20/objNN/`);
    the video (`street.avi`, 128x128 RGB, 5 frames/s, looped by the device) shows other photos
    of those four objects and of objects 5 and 6, which nobody labelled: the device predicts
    every frame and queues the ones it is unsure of in `state/to_label/`.
    """
    import yaml

    from fedfmx.data.datasets import load_dataset

    dataset = load_dataset("coil20", data_path)
    out.mkdir(parents=True, exist_ok=True)
    labelled, shown = [0, 1, 2, 3], [0, 1, 2, 3, 4, 5]
    frames: list[np.ndarray] = []
    for label in shown:
        rows = np.flatnonzero(dataset.train_y == label)
        name = dataset.class_names[label]
        if label in labelled:
            for row in rows[:12]:
                target = out / "labelled" / name / f"{row:05d}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(_unit_to_uint8(dataset.train_x[row, 0])).save(target)
        for row in rows[20:28]:
            grey = Image.fromarray(_unit_to_uint8(dataset.train_x[row, 0])).resize((128, 128))
            frames.append(np.asarray(grey.convert("RGB")))
    video = write_video(out / "street.avi", frames, fps=5.0)
    fleet = {
        "name": "camera-demo",
        "data": {"dataset": "coil20"},
        "protocol": {"num_tasks": 2, "num_clients": 1, "rounds_per_task": 3, "max_lag": 0},
        "classes": {"min_samples": 3},
        "model": {
            "backbone_channels": [16, 32, 64],
            "feature_dim": 64,
            "num_experts": 4,
            "expert_hidden": 16,
        },
        "fedfmx": {"k_max": 2, "max_experts_per_round": 2, "fisher_samples": 64},
        "training": {"local_epochs": 4, "batch_size": 16, "lr": 0.05, "threads": 1},
        "service": {
            "broker": {"url": broker_url},
            "state_path": str(out / "aggregator.sqlite"),
            "round_deadline_s": 120.0,
        },
    }
    device = {
        "device_id": "camera-1",
        "fleet_file": "fleet.yaml",
        "broker": {"url": broker_url},
        "profile": "raspberry-pi-4",
        "data": {
            "source": "camera",
            "url": video.name,
            "loop_file": True,
            "sample_fps": 5.0,
            "labels_folder": {"path": "labelled"},
        },
        "state_dir": "state",
        "predictions": {"mqtt": True},
        "exit_after_last_round": False,
    }
    written = []
    for name, document in (("fleet.yaml", fleet), ("camera.yaml", device)):
        (out / name).write_text(yaml.safe_dump(document, sort_keys=False))
        written.append(out / name)
    return [*written, video]


def _unit_to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(image * 255).astype(np.uint8)
