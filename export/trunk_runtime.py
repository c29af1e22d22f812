"""A trunk file in an ONNX Runtime session: what a device runs, without the tools that made it.

Kept apart from `export.trunk` (which makes the file with onnx and ONNX Runtime's quantization
tools, ~40 MB more resident): a device makes its trunk once in a child process and only runs it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.feature_maps import tap_rows
from export.inference import open_session
from fedfmx.errors import ConfigError
from fedfmx.trunk.spec import FEATURES_NAME, backbone_id
from fedfmx.trunk.taps import tap_sources

TRUNK_BATCH = 16
"""Images run through the trunk at a time: activations at batch 64 cost a Pi-4 process more
than 100 MB at its peak in torch, batch 16 a quarter of that (`benchmarks/README.md`)."""


def trunk_stem(input_size: int, sources: Sequence[str] = ()) -> str:
    """A trunk file's name without its precision: the backbone id, and the maps it outputs
    beside the pool (`export.tap_trunk`), so a fleet's tap trunk is never another's."""
    stem = backbone_id(input_size)
    return f"{stem}.taps-{'-'.join(sources)}" if sources else stem


def fp32_trunk_path(folder: Path, input_size: int, sources: Sequence[str] = ()) -> Path:
    """Where `export-serving` writes the fp32 trunk (here, so a device finds it without
    importing `export.trunk`'s quantization tools)."""
    return folder / f"{trunk_stem(input_size, sources)}.fp32.onnx"


def int8_trunk_path(folder: Path, input_size: int, sources: Sequence[str] = ()) -> Path:
    """Where a device keeps the int8 trunk it made (`export.trunk.device_trunk`)."""
    return folder / f"{trunk_stem(input_size, sources)}.int8.onnx"


@dataclass(frozen=True, eq=False)
class TrunkRuntime:
    """One trunk file in an ONNX Runtime session: images in, float32 features out.

    With `taps` (closed-form FedFMX on the trunk, `fedfmx.trunk.taps`) the features are those
    taps' vectors side by side, pooled in numpy from the maps the file outputs."""

    path: Path
    session: ort.InferenceSession
    feature_id: str
    """What the device's feature cache files its features under: the trunk's backbone id plus
    the file's own hash (an int8 trunk calibrated on other images is another extractor)."""
    taps: tuple[str, ...] = ()

    @classmethod
    def load(
        cls, path: Path, input_size: int, threads: int = 1, taps: Sequence[str] = ()
    ) -> TrunkRuntime:
        session = open_session(path, ["CPUExecutionProvider"], threads, arena=False)
        outputs = {output.name for output in session.get_outputs()}
        missing = [s for s in (FEATURES_NAME, *tap_sources(taps)) if s not in outputs]
        if missing:
            raise ConfigError(
                f"{path}: the trunk does not output {', '.join(missing)}; write the fleet's "
                "trunk with `fedfmx-edge export-serving`"
            )
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        return cls(path, session, f"{backbone_id(input_size)}-onnx-{digest}", tuple(taps))

    def features(self, images: np.ndarray) -> np.ndarray:
        """Features of `images` [N, C, H, W], `TRUNK_BATCH` at a time (bounded memory)."""
        name = self.session.get_inputs()[0].name
        wanted = [FEATURES_NAME, *tap_sources(self.taps)]
        parts = []
        for start in range(0, len(images), TRUNK_BATCH):
            batch = np.ascontiguousarray(images[start : start + TRUNK_BATCH])
            outputs = dict(zip(wanted, self.session.run(wanted, {name: batch}), strict=True))
            pooled = outputs[FEATURES_NAME] if not self.taps else tap_rows(outputs, self.taps)
            parts.append(np.asarray(pooled, np.float32))
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

    def median_run_ms(self, images: np.ndarray, batch: int, runs: int) -> float:
        """Median wall time of one session run on `batch` images, in ms, after 5 warm-up runs:
        the trunk alone (every output the file has), as a benchmark compares files."""
        feed = {self.session.get_inputs()[0].name: np.ascontiguousarray(images[:batch])}
        for _ in range(5):
            self.session.run(None, feed)
        times = []
        for _ in range(runs):
            begin = time.perf_counter()
            self.session.run(None, feed)
            times.append(time.perf_counter() - begin)
        return float(np.median(times) * 1e3)
