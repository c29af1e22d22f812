"""int8 with ONNX Runtime's quantization tools.

- **static** (QDQ, the default `int8`): `quant_pre_process` (shape inference, graph
  optimisation), then `quantize_static` with per-channel int8 weights and uint8 activations whose
  ranges are calibrated (MinMax) on samples of the device's own recent data. Quantized: Conv
  (backbone), Gemm/MatMul (backbone projection, expert adapters, head). Kept float: the router's
  Gemm, softmax and AES — routing is a discrete decision, a quantized gate could flip the expert
  subset and with it the prediction, and the router is one d×E matrix, so it costs nothing.
  ONNX Runtime fuses each Q/DQ pair around Conv/Gemm into QLinearConv / QGemm kernels.
- **dynamic** (`int8-dynamic`): `quantize_dynamic` of the linear layers (MatMul/Gemm) only, no
  calibration; activations are quantized per batch at run time. Convolutions stay float:
  ConvInteger has no fused kernel on ARM or x86 and dynamic range finding per conv costs more
  than it saves, which is why DESIGN §9 says static for convolutions, dynamic for linears.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from export.metadata import ExportMetadata
from export.onnx_model import INPUT_NAME, write_onnx_metadata
from fedfmx.errors import DataError

QuantMode = Literal["static", "dynamic"]
CALIBRATION_BATCH = 32
_FLOAT_PARAMETERS = ("router.",)
"""Nodes reading these parameters stay float under static int8 (see the module docstring)."""


class ImageCalibration(CalibrationDataReader):
    """Feeds calibration images to ONNX Runtime's calibrator in fixed-size batches."""

    def __init__(self, images: np.ndarray, batch_size: int = CALIBRATION_BATCH) -> None:
        self._batches: Iterator[np.ndarray] = (
            np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32)
            for start in range(0, len(images), batch_size)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_onnx(
    fp32_model: Path,
    out: Path,
    mode: QuantMode,
    metadata: ExportMetadata,
    calibration: np.ndarray | None = None,
    preprocess: bool = True,
) -> Path:
    """Write the int8 version of `fp32_model` to `out`, carrying `metadata` over.

    `preprocess=False` skips `quant_pre_process`, whose symbolic shape inference cannot read
    the unoptimised graph of a filled template (`export.template`); dynamic int8 needs none."""
    if mode == "static" and (calibration is None or len(calibration) == 0):
        raise DataError("static int8 needs calibration images: pass --calibration PATH")
    with quiet_quantizer(), tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        if preprocess:
            quant_pre_process(str(fp32_model), str(prepared))
        else:
            prepared = fp32_model
        if mode == "static":
            assert calibration is not None
            quantize_static(
                prepared,
                out,
                ImageCalibration(calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["Conv", "Gemm", "MatMul"],
                nodes_to_exclude=_float_nodes(prepared),
            )
        else:
            quantize_dynamic(
                prepared, out, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"]
            )
    proto = onnx.load_model(str(out))
    write_onnx_metadata(proto, metadata)
    onnx.save_model(proto, str(out))
    return out


@contextmanager
def quiet_quantizer() -> Iterator[None]:
    """Silence ONNX Runtime's quantization tools for one call: they log every tensor at INFO
    on the root logger. The level is restored after (setting it for good silenced every INFO
    line a device logged after its first export)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _float_nodes(model: Path) -> list[str]:
    """Names of the nodes that read a parameter in `_FLOAT_PARAMETERS` (the exporter keeps
    parameter names as initialiser names, but node names are its own)."""
    graph = onnx.load_model(str(model)).graph
    return [
        node.name
        for node in graph.node
        if any(name.startswith(_FLOAT_PARAMETERS) for name in node.input)
    ]
