"""Predictions on the device between rounds: each new global version, exported and swapped in.

When a device serves predictions (`serve_predictions: true` in its YAML), every verified global
model it receives is exported to ONNX at the profile's inference precision, checked for parity
against torch on the device's own recent data (its current rows and exemplars: what its camera
sees), and swapped into the running ONNX Runtime session atomically (`export.ModelServer`), on
the execution provider the profile names. A version that fails parity is refused and the
previous one keeps serving. Older files are removed once the new one serves.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edge_client.predictions import Served
from export.checkpoint import Checkpoint, InputSpec
from export.errors import ParityError
from export.formats import ExportFormat, InferenceProvider, Quantization
from export.inference import ModelServer, Prediction
from export.pipeline import EvalSet, ExportResult, export_checkpoint
from fedfmx.config import FleetConfig
from fedfmx.errors import FedFMXError
from fedfmx.federation.aggregation import Arrays
from fedfmx.profiles import DeviceProfile
from fedfmx.wire.messages import ModelHeader

log = logging.getLogger(__name__)

PARITY_ROWS = 512
"""Local images used for the parity check and the int8 calibration."""


class DeviceModelServer:
    """The device's ONNX Runtime copy of the latest global model it could verify and export."""

    def __init__(
        self, directory: Path, fleet: FleetConfig, profile: DeviceProfile, spec: InputSpec
    ) -> None:
        self.directory = directory
        self.fleet = fleet
        self.profile = profile
        self.spec = spec
        self.server: ModelServer | None = None
        self.version: int | None = None

    @property
    def quantization(self) -> Quantization:
        """int8 profiles get dynamic int8: it needs no calibration and passed parity on every
        federated model we exported, where static QDQ did not (docs/export.md)."""
        if self.profile.inference_precision == "int8":
            return Quantization.int8_dynamic
        return Quantization.none

    def refresh(
        self, header: ModelHeader, weights: Arrays, images: np.ndarray, names: np.ndarray
    ) -> ExportResult | None:
        """Export `header`'s version, check it on the local rows (`images`, class `names`) and
        swap it in; None when it is already serving, has no classes yet (version 0), or the
        export was refused."""
        if header.version == self.version or not len(images) or not header.class_names:
            return None
        registry = {name: i for i, name in enumerate(header.class_names)}
        targets = np.array([registry.get(str(name), -1) for name in names], dtype=np.int64)
        rows = np.random.default_rng(header.version).permutation(len(images))[:PARITY_ROWS]
        checkpoint = Checkpoint(self.fleet, header, self.spec, weights)
        out = self.directory / f"model-v{header.version}.onnx"
        try:
            result = export_checkpoint(
                checkpoint,
                ExportFormat.onnx,
                self.quantization,
                out,
                EvalSet(images=images[rows], targets=targets[rows]),
                calibration=images[rows],
            )
        except ParityError as error:
            log.warning("model version %s not served: %s", header.version, error)
            return None
        if self.server is None:
            self.server = ModelServer(
                out,
                InferenceProvider(self.profile.inference_provider),
                threads=self.profile.threads,
                fallback_to_cpu=self.profile.gpu_fallback_to_cpu,
            )
        else:
            self.server.swap(out)
        self.version = header.version
        for old in self.directory.glob("model-v*.onnx"):
            if old != out:
                old.unlink(missing_ok=True)
        log.info(
            "serving model version %s (%s, top-1 agreement %.2f%% on %d local images)",
            header.version,
            result.metadata.precision,
            100 * result.parity.top1_agreement,
            result.parity.rows,
        )
        return result

    def served(self) -> Served:
        """The serving version as the stream predictor uses it (logits, class names)."""
        if self.server is None or self.version is None:
            raise FedFMXError("no model version is serving yet")
        current = self.server.current
        return Served(self.version, current.logits, list(current.metadata.class_names))

    def predict(self, images: np.ndarray) -> Prediction:
        if self.server is None:
            raise FedFMXError("no model version is serving yet")
        return self.server.predict(images)
