"""The frozen pretrained trunk as an ONNX file of its own, int8 on the device (issue 16).

The trunk never changes, so a device makes its int8 trunk once and keeps it; every model
version changes only the small trained part behind it (`export.template`). The same file
computes the features a device trains on (its feature cache), and the features its served model
classifies: training and serving see one feature extractor.

int8 recipe (static QDQ; `benchmarks/trunk_int8.py` measures each step):

- **ReLU6 quantized with its convolution.** EfficientNet-Lite's activations are ONNX `Clip`
  [0, 6]. With `Clip` among the quantized op types ONNX Runtime drops it into the convolution's
  output range; without it (the first recipe: Conv/Gemm/MatMul only) each convolution's output
  was quantized over its pre-activation range (−37…42 after the stem: some 20 of the 256 levels
  left for [0, 6]), which is most of the 90 % agreement the first attempt measured.
- per-channel int8 weights, uint8 activations, MinMax ranges calibrated on the device's own
  images (never a test split).
- **Bias correction** of the weight rounding (Nagel et al. 2019, "Data-free quantization"):
  for each convolution `b ← b − (W_q − W)·E[x]`, with `E[x]` the per-channel mean of its input
  over the calibration images and `W_q` the weights as they will be quantized (symmetric, per
  output channel, ±127). The rounding's mean shift no longer accumulates through the layers.
- **A float prefix**: the stem and the first four blocks stay float (`FLOAT_CONVS`), where
  rounding costs the features most for the fewest weights.
- **Residual streams equalised** (`export.equalisation`) and the other weights rounded up or
  down by their layer's output error (`export.rounding.adaround`), before bias correction.

`docs/decisions.md` §22 measures each lever; the 99 % agreement bound is still missed (98.15 %).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from export.checkpoint import InputSpec
from export.equalisation import MIGRATION, equalise_streams, residual_streams
from export.onnx_model import trace_onnx
from export.quantize import ImageCalibration, quiet_quantizer
from export.reconstruction import reconstruct
from export.rounding import adarounded_weights, conv_inputs, rounded_weights
from export.trunk_runtime import fp32_trunk_path as fp32_trunk_path  # importable from here
from export.trunk_runtime import int8_trunk_path
from fedfmx.closed_form.head import FeatureStatistics, ridge_scale, solve_head
from fedfmx.errors import DataError
from fedfmx.trunk.spec import FEATURES_NAME

QUANTIZED_OPS = ["Conv", "Clip", "Add", "ReduceMean"]
Rounding = Literal["nearest", "adaround"]
FLOAT_CONVS = 12
"""The stem and the first four blocks (everything the 32 and 16 px feature maps go through)
stay float, activations included: 27,392 weights, 0.8 % of the trunk's. They are where int8
hurts most — the first depthwise convolution's 288 weights alone, rounded to nearest, take the
features to 16.8 dB SQNR (`docs/decisions.md`)."""
CALIBRATION_BATCH = 32
PARITY_RIDGE = 0.01
"""λ of the parity check's ridge head, in units of tr(G)/d."""


def export_trunk(spec: InputSpec, input_size: int, out: Path) -> Path:
    """The fp32 trunk `unit images [N, C, H, W] -> pooled features [N, 1280]` as ONNX (torch),
    prepared for quantization here (`quant_pre_process`: shape inference, batch norms folded
    into the convolutions): ONNX Runtime's pre-processing tools import torch when it is
    installed, and the device that quantizes the trunk may have none."""
    import torch

    from fedfmx.trunk.pretrained import efficientnet_lite0_trunk, imagenet_input

    class TrunkFeatures(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = efficientnet_lite0_trunk(input_size)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            maps: torch.Tensor = self.trunk.extract_features(imagenet_input(x, input_size))
            return maps.mean(dim=(2, 3))

    example = torch.zeros(2, spec.channels, spec.height, spec.width)
    return save_prepared(trace_onnx(TrunkFeatures().eval(), example, FEATURES_NAME), out)


def save_prepared(proto: onnx.ModelProto, out: Path) -> Path:
    """A traced trunk written to `out` prepared for quantization (`quant_pre_process`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        traced = Path(scratch) / "traced.onnx"
        onnx.save_model(proto, str(traced))
        quant_pre_process(str(traced), str(out))
    return out


def quantize_trunk(
    fp32: Path,
    out: Path,
    calibration: np.ndarray,
    op_types: list[str] = QUANTIZED_OPS,
    bias_correction: bool = True,
    rounding: Rounding = "adaround",
    float_convs: int = FLOAT_CONVS,
    migration: float | None = MIGRATION,
    wide_streams: bool = False,
    reconstruction: bool = False,
) -> Path:
    """The int8 trunk of the `export_trunk` file `fp32`, calibrated on `calibration` images
    (ONNX Runtime only): residual streams equalised (`migration` α, None: not), everything
    before the `float_convs`-th convolution kept float, the other weights rounded by
    `rounding`, biases corrected, then static QDQ.

    Two levers measured and not shipped (`docs/decisions.md`): `wide_streams` (the residual
    streams' tensors in uint16: closer to parity, but slower than fp32) and `reconstruction`
    (`export.reconstruction` on the quantized graph: no gain, 4x the time).

    The keyword arguments exist for the benchmark's ablation of the recipe."""
    if not len(calibration):
        raise DataError("an int8 trunk needs calibration images from the device's own data")
    with quiet_quantizer(), tempfile.TemporaryDirectory() as scratch:
        corrected = Path(scratch) / "corrected.onnx"
        model = onnx.load_model(str(fp32))  # prepared by `export_trunk`
        if migration is not None:
            equalise_streams(model, calibration, migration)
        kept, quantized = float_prefix(model, float_convs)
        teacher = onnx.ModelProto()
        if reconstruction:
            teacher.CopyFrom(model)  # the float function, before any weight is rounded
        weights = {} if rounding == "nearest" else adarounded_weights(model, calibration, quantized)
        if bias_correction:
            correct_biases(model, calibration, quantized, weights)
        set_weights(model, weights)
        overrides = wide_stream_overrides(model) if wide_streams else {}
        onnx.save_model(model, corrected)
        quantize_static(
            corrected,
            out,
            ImageCalibration(calibration, CALIBRATION_BATCH),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=op_types,
            nodes_to_exclude=[node.name for node in kept],
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"TensorQuantOverrides": overrides},
        )
        if reconstruction:
            int8 = onnx.load_model(str(out))
            reconstruct(int8, teacher, calibration, [node.name for node in quantized])
            onnx.save_model(int8, str(out))
    return out


def wide_stream_overrides(model: onnx.ModelProto) -> dict[str, list[dict[str, object]]]:
    """ONNX Runtime's `TensorQuantOverrides` that quantize every residual stream's tensors
    (`export.equalisation.residual_streams`) as uint16, the rest staying uint8. uint16 has
    256x the levels (quantization noise −48 dB); ONNX Runtime has no int8×uint16 kernel, so the
    convolutions that read or write a stream then run as DequantizeLinear → float Conv."""
    return {
        name: [{"quant_type": QuantType.QUInt16}]
        for stream in residual_streams(model)
        for name in stream.tensors
    }


def float_prefix(
    model: onnx.ModelProto, float_convs: int
) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
    """(the nodes that stay float, the convolutions that are quantized): every node before
    the `float_convs`-th convolution (graph order is topological) stays float, activations
    included, so the first quantized tensor is that convolution's input."""
    nodes = list(model.graph.node)
    convs = [i for i, node in enumerate(nodes) if node.op_type == "Conv"]
    end = convs[float_convs] if float_convs < len(convs) else len(nodes)
    return nodes[:end], [nodes[i] for i in convs if i >= end]


def correct_biases(
    model: onnx.ModelProto,
    calibration: np.ndarray,
    convs: list[onnx.NodeProto] | None = None,
    quantized: dict[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """Each convolution's bias (of `convs`, default all) minus the mean output shift its int8
    weights cause: `b − (W_q − W)·E[x]` (for a grouped convolution, per channel of its group),
    `E[x]` measured on the float `model`. `W_q` is `quantized[weight name]` where given, else
    nearest rounding."""
    graph = model.graph
    convs = [n for n in convs or graph.node if n.op_type == "Conv" and len(n.input) == 3]
    initialisers = {init.name: init for init in graph.initializer}
    sums = [np.zeros(0)] * len(convs)
    for values in conv_inputs(model, calibration, [node.input[0] for node in convs]):
        for i, value in enumerate(values):
            total = np.asarray(value, np.float64).mean(axis=(2, 3)).sum(axis=0)
            sums[i] = total if not len(sums[i]) else sums[i] + total
    for node, total in zip(convs, sums, strict=True):
        mean_input = total / len(calibration)
        weight_init, bias_init = initialisers[node.input[1]], initialisers[node.input[2]]
        weights = numpy_helper.to_array(weight_init)
        rounded = (quantized or {}).get(weight_init.name)
        error = (rounded_weights(weights) if rounded is None else rounded) - weights
        if error.shape[1] == len(mean_input):
            shift = np.einsum("oikl,i->o", error, mean_input)
        else:  # depthwise: output channel o reads input channel o
            shift = error.reshape(len(error), -1).sum(axis=1) * mean_input
        bias = numpy_helper.to_array(bias_init) - shift.astype(np.float32)
        bias_init.CopyFrom(numpy_helper.from_array(bias.astype(np.float32), bias_init.name))
    return model


def set_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """`model` with the initialisers named in `weights` replaced by them."""
    for init in model.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
    return model


@dataclass(frozen=True)
class TrunkParity:
    """What swapping the fp32 trunk for the int8 one changes, judged by a ridge head.

    `same_head_*`: the head fitted on fp32 features is fed int8 features (what a model trained
    on the fp32 trunk would see); `own_head_accuracy`: the head is fitted on int8 features
    (what a fleet gets whose devices train on the int8 trunk, as they do here).
    """

    rows: int
    same_head_agreement: float
    fp32_accuracy: float
    same_head_accuracy: float
    own_head_accuracy: float

    @property
    def same_head_drop(self) -> float:
        return self.fp32_accuracy - self.same_head_accuracy

    @property
    def own_head_drop(self) -> float:
        return self.fp32_accuracy - self.own_head_accuracy


@dataclass(frozen=True, eq=False)
class TrunkFeatures:
    """Both trunks' features of the same labelled images."""

    fp32: np.ndarray
    int8: np.ndarray
    names: np.ndarray


def trunk_parity(fit: TrunkFeatures, judge: TrunkFeatures) -> TrunkParity:
    """Fit ridge heads (`λ = 0.01·tr(G)/d`) on `fit`, compare their decisions on `judge`."""
    classes = sorted({str(n) for n in fit.names})

    def head(features: np.ndarray) -> np.ndarray:
        stats = FeatureStatistics.of(features, [str(n) for n in fit.names])
        return solve_head(stats, classes, PARITY_RIDGE * ridge_scale(stats))

    fp32_head, int8_head = head(fit.fp32), head(fit.int8)
    reference = (judge.fp32 @ fp32_head.T).argmax(axis=1)
    swapped = (judge.int8 @ fp32_head.T).argmax(axis=1)
    own = (judge.int8 @ int8_head.T).argmax(axis=1)
    index = {name: i for i, name in enumerate(classes)}
    truth = np.array([index.get(str(n), -1) for n in judge.names])
    return TrunkParity(
        rows=len(truth),
        same_head_agreement=float((swapped == reference).mean()),
        fp32_accuracy=float((reference == truth).mean()),
        same_head_accuracy=float((swapped == truth).mean()),
        own_head_accuracy=float((own == truth).mean()),
    )


def device_trunk(
    folder: Path,
    spec: InputSpec,
    input_size: int,
    calibration: np.ndarray,
    fp32_folder: Path | None = None,
    sources: tuple[str, ...] = (),
) -> Path:
    """The device's int8 trunk under `folder`, made once from its own `calibration` images;
    with `sources`, the trunk that also outputs those maps (`export.tap_trunk`).

    The fp32 trunk is exported here when torch is installed; a serving-only device (no torch)
    reads the one `fedfmx-edge export-serving` wrote into `fp32_folder` (default: `folder`;
    it may be read-only, as /etc is under systemd's ProtectSystem). Files are written under a
    temporary name and renamed, so a crash never leaves half a trunk behind.
    """
    int8 = int8_trunk_path(folder, input_size, sources)
    if int8.is_file():
        return int8
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = fp32_trunk_path(fp32_folder or folder, input_size, sources)
    if not fp32.is_file():
        try:
            import torch  # noqa: F401  (only to say clearly what is missing)
        except ImportError:
            raise DataError(
                f"{fp32}: no fp32 trunk; write it with `fedfmx-edge export-serving` on a "
                "machine with torch"
            ) from None
        from export.tap_trunk import export_tap_trunk

        partial = fp32.with_suffix(".tmp")
        export_tap_trunk(spec, input_size, sources, partial)
        partial.replace(fp32)
    partial = int8.with_suffix(".tmp")
    quantize_trunk(fp32, partial, calibration)
    partial.replace(int8)
    return int8
