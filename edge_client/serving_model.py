"""A served model built without torch: the fleet's template filled with each verified version.

A serving-only device (`role: serve`) runs ONNX Runtime and no torch (~220 MB less resident on
a Pi). Each global version it verifies is written into the template `fedfmx-edge export-serving`
made (`export.template`: exact, the same float32 numbers in the same graph), quantized to
dynamic int8 when the profile asks for int8 (`export.quantize`, ONNX Runtime only), checked
against the fp32 file on the device's own recent labelled images (`export.parity`: ≥ 99 % top-1
agreement, ≤ 1 point), and swapped in atomically; a version that fails is refused and the one
before keeps serving. With a frozen pretrained trunk the frames first cross the device's int8
trunk (`export.trunk`, made once from its own images in a child process, under `work`), whose
features the template classifies.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from edge_client.device_trunk import make_trunk_in_child
from edge_client.predictions import Served
from export.checkpoint import InputSpec
from export.errors import ParityError
from export.inference import OnnxClassifier, open_session, read_onnx_metadata
from export.metadata import ExportMetadata
from export.parity import ParityReport, batched_logits, compare_logits, require_parity
from export.quantize import quantize_onnx
from export.template import fill_template
from export.trunk_runtime import TrunkRuntime
from fedfmx.errors import FedFMXError
from fedfmx.federation.aggregation import Arrays
from fedfmx.profiles import DeviceProfile
from fedfmx.wire.messages import ModelHeader

log = logging.getLogger(__name__)

TEMPLATE_FILE = "template.onnx"
PARITY_ROWS = 512
"""Local images the parity check (and the trunk's calibration) use."""
PARITY_BATCH = 32
"""Rows per parity run, in sessions without a memory arena: the check's peak stays small."""


@dataclass(frozen=True, eq=False)
class ServedVersion:
    version: int
    classifier: OnnxClassifier
    parity: ParityReport | None
    """None for fp32: the filled template is the model itself."""


class ServingModel:
    """The template under `files` (and the int8 trunk made there), serving the newest version."""

    def __init__(
        self, files: Path, work: Path, profile: DeviceProfile, input_size: int | None
    ) -> None:
        self.files = files
        self.work = work
        self.profile = profile
        self.input_size = input_size
        """The trunk's input side when the fleet has a frozen pretrained trunk, else None."""
        template_path = files / TEMPLATE_FILE
        self.template = _load_template(template_path)
        self.metadata = read_onnx_metadata(template_path)
        self.trunk: TrunkRuntime | None = None
        self.current: ServedVersion | None = None
        self._lock = threading.Lock()
        work.mkdir(parents=True, exist_ok=True)

    @property
    def spec(self) -> InputSpec:
        return self.metadata.input

    def refresh(
        self, header: ModelHeader, weights: Arrays, images: np.ndarray, names: np.ndarray
    ) -> ServedVersion | None:
        """Serve `header`'s version (None: already serving it, no classes, no local images to
        check it on yet, or refused by the parity check)."""
        current = self.current
        if current is not None and current.version == header.version:
            return None
        if not header.class_names or not len(images):
            return None
        rows = np.random.default_rng(header.version).permutation(len(images))[:PARITY_ROWS]
        inputs = self._inputs(images[rows])
        registry = {name: i for i, name in enumerate(header.class_names)}
        targets = np.array([registry.get(str(n), -1) for n in names[rows]], dtype=np.int64)
        int8 = self.profile.inference_precision == "int8"
        metadata = self.metadata.model_copy(
            update={
                "model_version": header.version,
                "class_names": list(header.class_names),
                "precision": "int8-dynamic" if int8 else "fp32",
            }
        )
        fp32_path = self.work / f"model-v{header.version}.fp32.onnx"
        onnx.save_model(fill_template(self.template, weights, metadata, str(fp32_path)), fp32_path)
        served_path, report = fp32_path, None
        if int8:
            served_path = self.work / f"model-v{header.version}.onnx"
            quantize_onnx(fp32_path, served_path, "dynamic", metadata, preprocess=False)
            reference = self._classifier(fp32_path, metadata, arena=False)
            candidate = self._classifier(served_path, metadata, arena=False)
            report = compare_logits(
                batched_logits(reference.logits, inputs, PARITY_BATCH),
                batched_logits(candidate.logits, inputs, PARITY_BATCH),
                targets,
            )
            del reference, candidate  # their sessions go before the served one opens
            try:
                require_parity(report, True, f"model version {header.version} int8")
            except ParityError as error:
                log.warning("model version %s not served: %s", header.version, error)
                return None
        served = ServedVersion(header.version, self._classifier(served_path, metadata), report)
        with self._lock:
            self.current = served
        for old in self.work.glob("model-v*.onnx"):
            if old not in (served_path, fp32_path):
                old.unlink(missing_ok=True)
        log.info("serving model version %s (%s)", header.version, metadata.precision)
        return served

    def _inputs(self, images: np.ndarray) -> np.ndarray:
        """What the template reads: the images, or their int8 trunk features."""
        if self.input_size is None:
            return images
        if self.trunk is None:
            trunk = make_trunk_in_child(self.work, self.spec, self.input_size, images, self.files)
            self.trunk = TrunkRuntime.load(trunk, self.input_size, self.profile.threads)
        return self.trunk.features(images)

    def _classifier(
        self, path: Path, metadata: ExportMetadata, arena: bool = True
    ) -> OnnxClassifier:
        session = open_session(path, ["CPUExecutionProvider"], self.profile.threads, arena)
        return OnnxClassifier(path, session, metadata)

    def served(self) -> Served:
        """The serving version as the stream predictor uses it (frames in, logits out)."""
        current = self.current
        if current is None:
            raise FedFMXError("no model version is serving yet")
        classifier = current.classifier

        def logits(images: np.ndarray) -> np.ndarray:
            return classifier.logits(self._inputs(images))

        return Served(current.version, logits, list(classifier.metadata.class_names))


def _load_template(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise FedFMXError(
            f"{path}: no serving template; write it with `fedfmx-edge export-serving`"
        )
    return onnx.load_model(str(path))
