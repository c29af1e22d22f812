"""Output reconstruction of a quantized model against its float teacher
(`export.reconstruction`), and a 16-bit QDQ of a tiny graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from export.quantize import ImageCalibration
from export.reconstruction import PairedStatistics, reconstruct
from export.rounding import adaround, rounded_weights
from export.trunk import wide_stream_overrides


def _output_error(rounded: np.ndarray, w: np.ndarray, x_q: np.ndarray, x: np.ndarray) -> float:
    """`Σ ‖W̃x̃ + b̃ − Wx‖²` with the best bias `b̃` (rows of `x` are patches)."""
    residual = x_q @ rounded.T - x @ w.T
    return float(((residual - residual.mean(axis=0)) ** 2).sum())


def test_adaround_with_the_float_inputs_as_cross_term_is_plain_adaround() -> None:
    """`C = G` (the layer reads the inputs it was trained on) is AdaRound's own objective."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 6)).astype(np.float32)
    x = rng.normal(size=(200, 6))
    gram = (x.T @ x)[None]
    assert np.array_equal(adaround(w, gram), adaround(w, gram, cross=gram))


def test_reconstruction_is_never_worse_than_nearest_on_its_objective() -> None:
    """Inputs off by a systematic error (scaled and shifted, as a quantized trunk's are):
    the re-chosen rounding plus its best bias reproduces the float output better than nearest
    rounding plus its best bias (by construction never worse; here strictly better, although a
    weight may move by one level only, so a 2 % scale error is only partly cancelled)."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(5, 8)).astype(np.float32)
    x = rng.normal(size=(500, 8))
    x_q = x * 1.02 + 0.05 + rng.normal(scale=0.01, size=x.shape)
    stats = PairedStatistics.empty(1, 8)
    stats.add(x_q[None], x[None])
    _, _, gram, cross = stats.centred()
    rounded = adaround(w, gram, cross=cross)
    nearest = _output_error(rounded_weights(w), w, x_q, x)
    assert _output_error(rounded, w, x_q, x) < nearest
    scale = np.abs(w).max(axis=1, keepdims=True) / 127
    levels = rounded / scale
    assert np.allclose(levels, np.round(levels), atol=1e-4)  # still on the grid
    assert np.all(np.abs(levels - w / scale) < 1 + 1e-4)  # the level below or above


def _two_convs() -> onnx.ModelProto:
    """images → Conv 3×3 → Clip[0, 6] → Conv 1×1 → y."""
    rng = np.random.default_rng(2)
    first = helper.make_node("Conv", ["images", "w1", "b1"], ["a"], name="first", pads=[1] * 4)
    clip = helper.make_node("Clip", ["a", "lo", "hi"], ["c"], name="clip")
    second = helper.make_node("Conv", ["c", "w2", "b2"], ["y"], name="second")
    initialisers = {
        "w1": rng.normal(size=(8, 3, 3, 3)),
        "b1": rng.normal(size=8),
        "w2": rng.normal(size=(4, 8, 1, 1)),
        "b2": rng.normal(size=4),
        "lo": np.array(0.0),
        "hi": np.array(6.0),
    }
    graph = helper.make_graph(
        [first, clip, second],
        "two",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [None, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in initialisers.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"images": images})[0])


def test_reconstructing_a_qdq_model_brings_its_output_closer_to_the_float_one(
    tmp_path: Path,
) -> None:
    """On a real QDQ graph from ONNX Runtime's quantizer: the edited integers keep the graph
    valid (int8 weights, int32 biases, the same scales) and the second convolution, reading
    the first one's uint8 output, compensates part of that input's error."""
    images = np.random.default_rng(3).random((64, 3, 6, 6)).astype(np.float32) * 2
    teacher = _two_convs()
    onnx.save_model(teacher, str(tmp_path / "fp32.onnx"))
    quantize_static(
        tmp_path / "fp32.onnx",
        tmp_path / "int8.onnx",
        ImageCalibration(images),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    quantized = onnx.load_model(str(tmp_path / "int8.onnx"))
    scales_before = {
        i.name: numpy_helper.to_array(i).copy()
        for i in quantized.graph.initializer
        if i.name.endswith("scale")
    }
    error = _run(quantized, images) - _run(teacher, images)
    reconstruct(quantized, teacher, images, ["first", "second"])
    after = _run(quantized, images) - _run(teacher, images)
    assert (after**2).sum() < (error**2).sum()
    for init in quantized.graph.initializer:
        if init.name in scales_before:
            assert np.array_equal(numpy_helper.to_array(init), scales_before[init.name])
    types = {i.name: i.data_type for i in quantized.graph.initializer}
    assert types["w2_quantized"] == TensorProto.INT8
    assert types["b2_quantized"] == TensorProto.INT32


def _stream_model() -> onnx.ModelProto:
    """Two convolutions write a stream `s = a + b`, a third reads it. Every weight is an
    integer and each output channel's largest is ±127, so int8 weights are exact (scale 1)."""
    rng = np.random.default_rng(4)

    def exact(shape: tuple[int, ...]) -> np.ndarray:
        w = rng.integers(-126, 127, size=shape)
        w[:, 0] = 127
        return w

    initialisers = {
        "wa": exact((4, 3, 1, 1)),
        "ba": np.zeros(4),
        "wb": exact((4, 3, 1, 1)),
        "bb": np.zeros(4),
        "wc": exact((2, 4, 1, 1)),
        "bc": np.zeros(2),
    }
    nodes = [
        helper.make_node("Conv", ["images", "wa", "ba"], ["a"], name="a"),
        helper.make_node("Conv", ["images", "wb", "bb"], ["b"], name="b"),
        helper.make_node("Add", ["a", "b"], ["s"], name="add"),
        helper.make_node("Conv", ["s", "wc", "bc"], ["y"], name="c"),
    ]
    graph = helper.make_graph(
        nodes,
        "stream",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [None, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in initialisers.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_a_16_bit_stream_in_a_qdq_graph_agrees_with_float_far_better(tmp_path: Path) -> None:
    """`wide_stream_overrides` makes ONNX Runtime quantize the stream's tensors (a, b, s) as
    uint16 and nothing else. Weights exact, images on the uint8 grid (`k/255`, both ends
    present), the reader `c` float: the only error left is the stream's rounding, whose step
    is 257x finer in uint16 (`range/65535` against `range/255`), so the output's squared error
    should fall by about `20·log10(257)` = 48 dB."""
    images = np.random.default_rng(5).integers(0, 256, size=(64, 3, 4, 4)) / 255
    images.reshape(-1)[:2] = [0, 1]
    images = images.astype(np.float32)
    model = _stream_model()
    onnx.save_model(model, str(tmp_path / "fp32.onnx"))
    overrides = wide_stream_overrides(model)
    assert sorted(overrides) == ["a", "b", "s"]
    errors = {}
    for name, extra in (("uint8", {}), ("uint16", overrides)):
        quantize_static(
            tmp_path / "fp32.onnx",
            tmp_path / f"{name}.onnx",
            ImageCalibration(images),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv", "Add"],
            nodes_to_exclude=["c"],
            extra_options={"TensorQuantOverrides": extra},
        )
        quantized = onnx.load_model(str(tmp_path / f"{name}.onnx"))
        errors[name] = float(((_run(quantized, images) - _run(model, images)) ** 2).sum())
    zero_points = {
        i.name: i.data_type for i in quantized.graph.initializer if i.name.endswith("zero_point")
    }
    assert zero_points["s_zero_point"] == TensorProto.UINT16
    assert zero_points["images_zero_point"] == TensorProto.UINT8
    assert 10 * np.log10(errors["uint8"] / errors["uint16"]) > 40
