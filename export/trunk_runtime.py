"""A trunk file in an ONNX Runtime session: what a device runs, without the tools that made it.

Kept apart from `export.trunk` (which makes the file with onnx and ONNX Runtime's quantization
tools, ~40 MB more resident): a device makes its trunk once in a child process and only runs it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.inference import open_session
from fedfmx.trunk_spec import backbone_id

FEATURES_NAME = "features"
TRUNK_BATCH = 16
"""Images run through the trunk at a time: activations at batch 64 cost a Pi-4 process more
than 100 MB at its peak in torch, batch 16 a quarter of that (`benchmarks/README.md`)."""


def fp32_trunk_path(folder: Path, input_size: int) -> Path:
    """Where `export-serving` writes the fp32 trunk (here, so a device finds it without
    importing `export.trunk`'s quantization tools)."""
    return folder / f"{backbone_id(input_size)}.fp32.onnx"


@dataclass(frozen=True, eq=False)
class TrunkRuntime:
    """One trunk file in an ONNX Runtime session: images in, float32 features out."""

    path: Path
    session: ort.InferenceSession
    feature_id: str
    """What the device's feature cache files its features under: the trunk's backbone id plus
    the file's own hash (an int8 trunk calibrated on other images is another extractor)."""

    @classmethod
    def load(cls, path: Path, input_size: int, threads: int = 1) -> TrunkRuntime:
        session = open_session(path, ["CPUExecutionProvider"], threads, arena=False)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        return cls(path, session, f"{backbone_id(input_size)}-onnx-{digest}")

    def features(self, images: np.ndarray) -> np.ndarray:
        """Features of `images` [N, C, H, W], `TRUNK_BATCH` at a time (bounded memory)."""
        name = self.session.get_inputs()[0].name
        parts = [
            np.asarray(
                self.session.run(
                    None, {name: np.ascontiguousarray(images[start : start + TRUNK_BATCH])}
                )[0],
                np.float32,
            )
            for start in range(0, len(images), TRUNK_BATCH)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
