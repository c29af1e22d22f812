"""On-device inference: an ONNX Runtime session over an exported file, and atomic model swaps.

The execution provider comes from the device profile's `inference_provider` setting: `cpu`
everywhere (Raspberry Pi), `cuda` or `tensorrt` on a Jetson whose onnxruntime-gpu build offers
them. A provider that is asked for but missing is an error unless the profile allows falling
back to the CPU, so a Jetson never silently runs ten times slower than its operator expects.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from export.errors import MAX_MODEL_FILE_BYTES, first_line, refuse_oversize
from export.formats import InferenceProvider
from export.metadata import METADATA_KEY, ExportMetadata
from export.parity import batched_logits
from fedfmx.errors import ConfigError, DataError

PROVIDER_CHAINS: dict[InferenceProvider, list[str]] = {
    InferenceProvider.cpu: ["CPUExecutionProvider"],
    InferenceProvider.cuda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    InferenceProvider.tensorrt: [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ],
}
"""What each profile setting asks ONNX Runtime for, best first (ORT assigns nodes in order)."""

_LOAD_ERRORS = (
    ort_errors.Fail,
    ort_errors.InvalidArgument,
    ort_errors.InvalidGraph,
    ort_errors.InvalidProtobuf,
    ort_errors.NoSuchFile,
    ort_errors.NoModel,
    ort_errors.NotImplemented,
    ort_errors.RuntimeException,
)


def execution_providers(
    provider: InferenceProvider, fallback_to_cpu: bool, available: list[str] | None = None
) -> list[str]:
    """The provider list for a session; `ConfigError` if the asked-for one is missing and the
    profile does not allow the CPU instead."""
    present = ort.get_available_providers() if available is None else available
    wanted = PROVIDER_CHAINS[provider][0]
    if wanted in present:
        return [p for p in PROVIDER_CHAINS[provider] if p in present]
    if not fallback_to_cpu:
        raise ConfigError(
            f"inference provider {provider.value!r} needs {wanted}, which this onnxruntime build "
            f"lacks (has: {', '.join(present)}); install onnxruntime-gpu or use provider cpu"
        )
    return ["CPUExecutionProvider"]


def open_session(
    path: Path, providers: list[str], threads: int, arena: bool = True
) -> ort.InferenceSession:
    """An ORT session on `threads` intra-op threads; a missing or corrupt file is a DataError.

    `arena=False` returns activation memory after each run instead of keeping it pooled (a
    trunk run in batches beside torch on a Pi's memory budget)."""
    if not path.is_file():
        raise DataError(f"{path}: no such model file")
    refuse_oversize(path, MAX_MODEL_FILE_BYTES, "a model")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = arena
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except _LOAD_ERRORS as error:
        problem = first_line(error).replace(f" from {path}", "")
        raise DataError(f"{path}: not a loadable ONNX model ({problem})") from None


class Prediction(NamedTuple):
    class_ids: np.ndarray
    """Global class id per image (int64 [N])."""
    class_names: list[str]
    probabilities: np.ndarray
    """Softmax probability of the predicted class (float32 [N])."""


@dataclass(frozen=True, eq=False)
class OnnxClassifier:
    """One loaded model file: its session and its metadata."""

    path: Path
    session: ort.InferenceSession
    metadata: ExportMetadata

    @classmethod
    def load(
        cls,
        path: Path,
        provider: InferenceProvider = InferenceProvider.cpu,
        threads: int = 1,
        fallback_to_cpu: bool = True,
    ) -> OnnxClassifier:
        """Open `path`, read its metadata and run one blank image through it, so a model that
        cannot serve fails here and not on the first real request."""
        session = open_session(path, execution_providers(provider, fallback_to_cpu), threads)
        classifier = cls(path, session, _session_metadata(session, path))
        spec = classifier.metadata.input
        classifier.logits(np.zeros((1, spec.channels, spec.height, spec.width), np.float32))
        return classifier

    def logits(self, images: np.ndarray) -> np.ndarray:
        feed = {self.session.get_inputs()[0].name: np.ascontiguousarray(images, np.float32)}
        try:
            return np.asarray(self.session.run(None, feed)[0])
        except _LOAD_ERRORS as error:
            raise DataError(f"{self.path}: inference failed ({first_line(error)})") from None

    def predict(self, images: np.ndarray, batch_size: int = 256) -> Prediction:
        """Top-1 class of each image, run `batch_size` images at a time."""
        logits = batched_logits(self.logits, images, batch_size)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = shifted / shifted.sum(axis=1, keepdims=True)
        ids = probs.argmax(axis=1)
        names = [self.metadata.class_names[i] for i in ids]
        return Prediction(ids.astype(np.int64), names, probs[np.arange(len(ids)), ids])


def read_onnx_metadata(path: Path) -> ExportMetadata:
    """The FedFMX metadata of an ONNX file (a `DataError` for a foreign or corrupt file)."""
    return _session_metadata(open_session(path, ["CPUExecutionProvider"], threads=1), path)


def _session_metadata(session: ort.InferenceSession, path: Path) -> ExportMetadata:
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    return ExportMetadata.parse(raw, str(path))


class ModelServer:
    """Serves predictions while new global model versions arrive.

    `swap` loads and smoke-tests the new file in a new session first and only then replaces the
    reference; each `predict` reads the reference once, so a request never mixes two versions,
    and if the new file cannot be loaded the old model keeps serving (the error propagates).
    """

    def __init__(
        self,
        path: Path,
        provider: InferenceProvider = InferenceProvider.cpu,
        threads: int = 1,
        fallback_to_cpu: bool = True,
    ) -> None:
        self._provider: InferenceProvider = provider
        self._threads = threads
        self._fallback = fallback_to_cpu
        self._current = self._load(path)
        self._swap_lock = threading.Lock()

    def _load(self, path: Path) -> OnnxClassifier:
        return OnnxClassifier.load(path, self._provider, self._threads, self._fallback)

    @property
    def current(self) -> OnnxClassifier:
        return self._current

    def swap(self, path: Path) -> ExportMetadata:
        with self._swap_lock:  # two concurrent swaps must not race on which one wins
            loaded = self._load(path)
            self._current = loaded
        return loaded.metadata

    def predict(self, images: np.ndarray, batch_size: int = 256) -> Prediction:
        return self._current.predict(images, batch_size)
