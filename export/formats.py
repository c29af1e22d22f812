"""The choices the export and predict commands offer, importable without torch or onnxruntime
(the CLI builds its options from them at start-up)."""

from __future__ import annotations

from fedfmx.compat import StrEnum


class ExportFormat(StrEnum):
    onnx = "onnx"
    torchscript = "torchscript"


class Quantization(StrEnum):
    none = "none"
    int8 = "int8"
    """The best int8 each format offers: ONNX static QDQ (calibrated), TorchScript dynamic."""
    int8_dynamic = "int8-dynamic"
    """ONNX dynamic int8 of the linear layers (no calibration data needed)."""


class InferenceProvider(StrEnum):
    """The device profile's `inference_provider` setting."""

    cpu = "cpu"
    cuda = "cuda"
    tensorrt = "tensorrt"
