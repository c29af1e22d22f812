"""Live predictions on unlabelled frames, and the queue of frames a person should label.

Every unlabelled frame goes through the one preprocessing path (`fedfmx.data.preprocessing`) and
the served int8 ONNX model (`edge_client.inference`), batch 1, and becomes one JSON line:

    {"time": "2026-12-01T11:02:03.123Z", "device_id": "cam-1", "origin": "rtsp://…#42",
     "model_version": 7, "class": "coil20/obj03", "class_id": 2, "probability": 0.91,
     "energy": -7.2, "unsure": false, "threshold": 0.44, "latency_s": 0.012}

(`latency_s`: from the frame leaving the camera reader to the line being written). Lines go to
a file or stdout and, when asked, to `clients/<id>/predictions` on the device's own broker
connection. A frame is *unsure* when its score is beyond a threshold calibrated on the
device's own labelled samples each time a model version starts serving: the `q`-quantile of
their max probability (unsure below it), or the `1 − q`-quantile of their energy
`E(x) = −log Σ_k exp(f_k(x))` (unsure above it; Liu et al. 2020). Unsure frames are written
as PNGs into a bounded `to_label/` queue, oldest dropped first; a person labels one by moving
it into a class folder of the device's folder source.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from edge_client.sources.base import Sample
from edge_client.stream_config import PredictionsConfig
from fedfmx.config import ImageInputConfig
from fedfmx.data.preprocessing import model_input
from fedfmx.errors import FedFMXError

log = logging.getLogger(__name__)

Logits = Callable[[np.ndarray], np.ndarray]
Publish = Callable[[bytes], None]


@dataclass(frozen=True)
class Served:
    """What classifies frames now: a model version's logits function and class names."""

    version: int
    logits: Logits
    class_names: list[str]


def scores(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: predicted class, its softmax probability, and the energy −logsumexp(f)."""
    top = logits.max(axis=1, keepdims=True)
    shifted = np.exp(logits - top)
    total = shifted.sum(axis=1)
    ids = logits.argmax(axis=1)
    probability = shifted[np.arange(len(ids)), ids] / total
    energy = -(top[:, 0] + np.log(total))
    return ids, probability, energy


class LabelQueue:
    """Unsure frames as PNG files in one folder, at most `limit` of them (oldest dropped)."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.directory = directory
        self.limit = limit
        directory.mkdir(parents=True, exist_ok=True)

    def put(self, pixels: np.ndarray, stem: str) -> Path:
        path = self.directory / f"{stem}.png"
        partial = self.directory / f".{stem}.png.tmp"  # a folder source skips dot-files
        Image.fromarray(pixels).save(partial, format="PNG")
        os.replace(partial, path)
        queued = sorted(self.directory.glob("*.png"), key=lambda p: p.stat().st_mtime_ns)
        for old in queued[: max(0, len(queued) - self.limit)]:
            old.unlink(missing_ok=True)
        return path

    def __len__(self) -> int:
        return sum(1 for _ in self.directory.glob("*.png"))


class StreamPredictor:
    """Classifies unlabelled frames with the served model; writes predictions and the queue."""

    def __init__(
        self,
        device_id: str,
        spec: ImageInputConfig,
        config: PredictionsConfig,
        state_dir: Path,
        publish: Publish | None = None,
    ) -> None:
        self.device_id = device_id
        self.spec = spec
        self.config = config
        self.publish = publish
        self.queue = LabelQueue(config.to_label_dir or state_dir / "to_label", config.to_label_max)
        self._served: Served | None = None
        self._threshold: float | None = None
        self._lock = threading.Lock()
        self._out: IO[str]
        if config.output == "-":
            self._out = sys.stdout
        else:
            path = Path(config.output)
            path = path if path.is_absolute() else state_dir / path
            path.parent.mkdir(parents=True, exist_ok=True)
            self._out = path.open("a", encoding="utf-8")
        self.predicted = 0
        self.unsure = 0
        self.unpublished = 0
        self.latencies_s: list[float] = []
        """The latest latencies (at most 1,000), for the benchmark and the status."""

    def close(self) -> None:
        if self._out is not sys.stdout:
            self._out.close()

    @property
    def threshold(self) -> float:
        if self._threshold is not None:
            return self._threshold
        if self.config.unsure_score == "max_probability":
            return self.config.fallback_probability
        return float("inf")  # energy needs calibration; until then nothing is unsure by it

    def serve(self, served: Served, images: np.ndarray, names: np.ndarray) -> None:
        """Start classifying with `served`; calibrate the threshold on labelled `images`."""
        threshold = None
        known = np.isin(names.astype(str), served.class_names) if len(names) else names
        if len(images) and bool(np.any(known)):
            _, probability, energy = scores(served.logits(images[known]))
            q = self.config.unsure_quantile
            if self.config.unsure_score == "max_probability":
                threshold = float(np.quantile(probability, q))
            else:
                threshold = float(np.quantile(energy, 1 - q))
        with self._lock:
            self._served, self._threshold = served, threshold
        log.info(
            "predictions: model version %s, unsure %s threshold %s",
            served.version,
            self.config.unsure_score,
            "uncalibrated" if threshold is None else f"{threshold:.4f}",
        )

    def classify(self, sample: Sample) -> dict[str, object]:
        """One frame -> one prediction record (written out; unsure frames queued)."""
        with self._lock:
            served, threshold = self._served, self.threshold
        record: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(sample.captured_at, datetime.timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "device_id": self.device_id,
            "origin": sample.origin,
        }
        if served is None:
            record |= {"model_version": None, "class": None, "unsure": True}
        else:
            x = model_input(sample.pixels, self.spec)[None]
            ids, probability, energy = scores(served.logits(x))
            score = (
                float(probability[0])
                if self.config.unsure_score == "max_probability"
                else float(energy[0])
            )
            unsure = (
                score < threshold
                if self.config.unsure_score == "max_probability"
                else score > threshold
            )
            record |= {
                "model_version": served.version,
                "class": served.class_names[int(ids[0])],
                "class_id": int(ids[0]),
                "probability": round(float(probability[0]), 6),
                "energy": round(float(energy[0]), 6),
                "unsure": bool(unsure),
                "threshold": round(threshold, 6) if np.isfinite(threshold) else None,
            }
        latency = time.time() - sample.captured_at
        record["latency_s"] = round(latency, 6)
        self._emit(record)
        self.predicted += 1
        self.latencies_s = [*self.latencies_s[-999:], latency]
        if record["unsure"]:
            self.unsure += 1
            guess = str(record.get("class") or "unknown").replace("/", "_")
            stem = f"{int(sample.captured_at * 1000)}-{guess}"
            self.queue.put(sample.pixels, stem)
        return record

    def _emit(self, record: dict[str, object]) -> None:
        line = json.dumps(record, separators=(",", ":"))
        self._out.write(line + "\n")
        self._out.flush()
        if self.publish is not None and self.config.mqtt:
            try:
                self.publish(line.encode())
            except (TimeoutError, OSError, ValueError, FedFMXError) as error:
                self.unpublished += 1
                if self.unpublished % 100 == 1:  # a broker outage is one line, not one a frame
                    log.warning("%d predictions not published: %s", self.unpublished, error)
