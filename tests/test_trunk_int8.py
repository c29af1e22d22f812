"""The int8 trunk: the bias-correction formula, and the trunk itself on a real slice
(the recipe's other transforms: `test_rounding.py`, `test_equalisation.py`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.checkpoint import InputSpec
from export.rounding import WEIGHT_LEVELS, rounded_weights
from export.trunk import (
    FLOAT_CONVS,
    TrunkFeatures,
    correct_biases,
    export_trunk,
    float_prefix,
    quantize_trunk,
    trunk_parity,
)
from export.trunk_runtime import TrunkRuntime
from fedfmx.data.datasets import load_dataset
from fedfmx.errors import ConfigError, DataError

FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_rounded_weights_are_127_levels_per_output_channel() -> None:
    weights = np.random.default_rng(0).normal(size=(6, 3, 3, 3)).astype(np.float32)
    weights[2] *= 100  # one loud channel must not coarsen the others
    rounded = rounded_weights(weights)
    for channel, original in zip(rounded, weights, strict=True):
        scale = np.abs(original).max() / WEIGHT_LEVELS
        assert np.abs(channel - original).max() <= scale / 2 + 1e-6
        assert len(np.unique(np.round(channel / scale))) <= 2 * WEIGHT_LEVELS + 1


def _conv_model(weights: np.ndarray, group: int) -> onnx.ModelProto:
    channels = weights.shape[1] * group
    node = helper.make_node("Conv", ["images", "w", "b"], ["y"], group=group, pads=[1] * 4)
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [None, channels, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(weights, "w"),
            numpy_helper.from_array(np.zeros(len(weights), np.float32), "b"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize(("group", "shape"), [(1, (4, 3, 3, 3)), (3, (3, 1, 3, 3))])
def test_bias_correction_cancels_the_mean_shift_of_rounded_weights(
    group: int, shape: tuple[int, ...]
) -> None:
    """With the corrected bias, the rounded convolution's mean output (over the calibration
    images, away from the padded border) is far closer to the float convolution's: exact in
    expectation, up to how much the input mean varies from one kernel position to another."""
    rng = np.random.default_rng(1)
    weights = rng.normal(size=shape) * np.array([1, 30, 0.01, 5])[: shape[0], None, None, None]
    weights = weights.astype(np.float32)
    images = (rng.random((32, 3, 6, 6)) * 4 + 2).astype(np.float32)  # mean far from zero
    corrected = correct_biases(_conv_model(weights, group), images)
    quantized = onnx.ModelProto()
    quantized.CopyFrom(corrected)
    quantized.graph.initializer[0].CopyFrom(numpy_helper.from_array(rounded_weights(weights), "w"))

    def mean_output(model: onnx.ModelProto) -> np.ndarray:
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        out = session.run(None, {"images": images})[0]
        return np.asarray(out)[:, :, 1:-1, 1:-1].mean(axis=(0, 2, 3))

    uncorrected = _conv_model(rounded_weights(weights), group)
    reference = mean_output(_conv_model(weights, group))
    before = np.abs(mean_output(uncorrected) - reference)
    after = np.abs(mean_output(quantized) - reference)
    assert after.sum() < 0.1 * before.sum()


def test_the_float_prefix_is_every_node_before_the_first_quantized_convolution() -> None:
    first = helper.make_node("Conv", ["images", "w1", "b1"], ["a"], name="first")
    clip = helper.make_node("Clip", ["a", "lo", "hi"], ["b"], name="clip")
    second = helper.make_node("Conv", ["b", "w2", "b2"], ["y"], name="second")
    graph = helper.make_graph([first, clip, second], "g", [], [])
    model = helper.make_model(graph)
    kept, quantized = float_prefix(model, 1)
    assert [n.name for n in kept] == ["first", "clip"]
    assert [n.name for n in quantized] == ["second"]
    kept, quantized = float_prefix(model, 0)
    assert kept == [] and [n.name for n in quantized] == ["first", "second"]
    kept, quantized = float_prefix(model, 5)
    assert len(kept) == 3 and quantized == []


def test_a_trunk_needs_calibration_images(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="calibration"):
        quantize_trunk(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", np.zeros((0, 1, 28, 28)))


def _efficientnet_installed() -> bool:
    try:
        from fedfmx.trunk.pretrained import weights_path

        weights_path()
    except ConfigError:
        return False
    return True


@pytest.mark.skipif(
    not FASHION.is_dir(), reason="Fashion-MNIST not installed (dataset-fashion-mnist)"
)
@pytest.mark.skipif(
    not _efficientnet_installed(), reason="EfficientNet-Lite0 weights not installed"
)
def test_int8_trunk_keeps_a_heads_accuracy_on_real_images(tmp_path: Path) -> None:
    """Calibrated on 64 training images; ridge heads fitted on 400 other training images and
    judged on 400 test images. Bound: 2 points (400 rows: one row is 0.25 points, so the
    benchmark's 1-point bound on 2,000 rows is checked there, not here)."""
    dataset = load_dataset("fashion_mnist")
    rng = np.random.default_rng(0)
    train, test = rng.permutation(len(dataset.train_x))[:464], rng.permutation(10_000)[:400]
    fp32_path = export_trunk(InputSpec.of_dataset(dataset), 64, tmp_path / "fp32.onnx")
    int8_path = quantize_trunk(fp32_path, tmp_path / "int8.onnx", dataset.train_x[train[:64]])
    graph = onnx.load_model(str(int8_path)).graph
    int8_weights = {i.name for i in graph.initializer if i.data_type == TensorProto.INT8}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    producers = {n.output[0]: n for n in graph.node}
    assert len(convs) == 49
    quantized = [
        c.input[1] in producers and producers[c.input[1]].input[0] in int8_weights for c in convs
    ]
    assert quantized == [False] * FLOAT_CONVS + [True] * (49 - FLOAT_CONVS)
    fp32, int8 = TrunkRuntime.load(fp32_path, 64), TrunkRuntime.load(int8_path, 64)
    names = np.array(dataset.class_names)
    fit_x, judge_x = dataset.train_x[train[64:]], dataset.test_x[test]
    fit = TrunkFeatures(
        fp32.features(fit_x), int8.features(fit_x), names[dataset.train_y[train[64:]]]
    )
    judge = TrunkFeatures(
        fp32.features(judge_x), int8.features(judge_x), names[dataset.test_y[test]]
    )
    parity = trunk_parity(fit, judge)
    assert parity.fp32_accuracy > 0.6  # the head learnt something to lose
    assert parity.same_head_drop <= 0.02
    assert parity.own_head_drop <= 0.02
    assert parity.same_head_agreement >= 0.9
    assert fp32.feature_id != int8.feature_id
