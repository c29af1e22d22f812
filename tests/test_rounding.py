"""AdaRound-style rounding of conv weights: the patches it reads, and what it may change."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.rounding import (
    WEIGHT_LEVELS,
    adaround,
    conv_patches,
    patch_grams,
    rounded_weights,
    weight_scales,
)


def _conv(weights: np.ndarray, group: int, stride: int, pads: list[int]) -> onnx.ModelProto:
    channels = weights.shape[1] * group
    node = helper.make_node(
        "Conv", ["images", "w", "b"], ["y"], group=group, strides=[stride] * 2, pads=pads
    )
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [None, channels, 7, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(weights, "w"),
            numpy_helper.from_array(np.zeros(len(weights), np.float32), "b"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize(
    ("group", "shape", "stride", "pads"),
    [
        (1, (5, 3, 3, 3), 1, [1, 1, 1, 1]),
        (4, (4, 1, 5, 5), 2, [2, 1, 2, 1]),
        (1, (6, 4, 1, 1), 1, [0] * 4),
    ],
)
def test_patches_times_weights_are_the_convolution(
    group: int, shape: tuple[int, ...], stride: int, pads: list[int]
) -> None:
    """The patch layout (padding, stride, groups, weight order) is ONNX Runtime's own."""
    rng = np.random.default_rng(0)
    weights = rng.normal(size=shape).astype(np.float32)
    x = rng.normal(size=(2, shape[1] * group, 7, 7)).astype(np.float32)
    model = _conv(weights, group, stride, pads)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"images": x})[0]
    patches = conv_patches(model.graph.node[0], shape, x)  # [groups, N·Ho·Wo, K]
    rows = weights.reshape(group, -1, patches.shape[2])  # [groups, O/groups, K]
    out = np.matmul(patches, rows.transpose(0, 2, 1))  # [groups, N·Ho·Wo, O/groups]
    n, o, ho, wo = expected.shape
    out = out.reshape(group, n, ho, wo, -1).transpose(1, 0, 4, 2, 3).reshape(n, o, ho, wo)
    np.testing.assert_allclose(out, expected, atol=1e-4)


def _correlated_inputs(
    rng: np.random.Generator, rows: int, k: int, mixing: np.ndarray | None = None
) -> np.ndarray:
    """Inputs on a few shared directions (`mixing`), as a layer's activations are."""
    mixing = rng.normal(size=(4, k)) if mixing is None else mixing
    return rng.normal(size=(rows, 4)) @ mixing + 0.05 * rng.normal(size=(rows, k))


def _error(weights: np.ndarray, rounded: np.ndarray, x: np.ndarray) -> float:
    return float((((rounded - weights).reshape(len(weights), -1) @ x.T) ** 2).sum())


def test_adaround_stays_within_one_level_and_keeps_the_scale() -> None:
    rng = np.random.default_rng(1)
    weights = rng.normal(size=(8, 16, 1, 1)).astype(np.float32)
    x = _correlated_inputs(rng, 500, 16)
    rounded = adaround(weights, (x.T @ x)[None])
    scale = weight_scales(weights)
    levels = rounded / scale
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)  # on the int8 grid
    assert np.abs(np.round(levels) - np.round(weights / scale)).max() <= 1
    assert np.abs(levels - weights / scale).max() < 1  # the level below or above W/s
    assert np.abs(np.round(levels)).max() <= WEIGHT_LEVELS
    # each channel's largest weight is untouched, so ONNX Runtime's requantization is exact
    np.testing.assert_allclose(rounded_weights(rounded), rounded, rtol=1e-6)


def test_adaround_beats_nearest_on_the_calibration_and_on_fresh_inputs() -> None:
    rng = np.random.default_rng(2)
    weights = rng.normal(size=(16, 64, 1, 1)).astype(np.float32)
    mixing = rng.normal(size=(4, 64))
    calibration = _correlated_inputs(rng, 2000, 64, mixing)
    fresh = _correlated_inputs(rng, 2000, 64, mixing)
    rounded = adaround(weights, (calibration.T @ calibration)[None])
    nearest = rounded_weights(weights)
    assert _error(weights, rounded, calibration) < 0.5 * _error(weights, nearest, calibration)
    assert _error(weights, rounded, fresh) < 0.5 * _error(weights, nearest, fresh)


def test_adaround_of_a_depthwise_layer_works_channel_by_channel() -> None:
    rng = np.random.default_rng(3)
    weights = rng.normal(size=(3, 1, 3, 3)).astype(np.float32)
    x = rng.normal(size=(16, 3, 7, 7)).astype(np.float32)
    model = _conv(weights, 3, 1, [1] * 4)
    (gram,) = patch_grams(model, x, [model.graph.node[0]])
    assert gram.shape == (3, 9, 9)
    rounded = adaround(weights, gram)
    patches = conv_patches(model.graph.node[0], weights.shape, x)

    def per_channel(w: np.ndarray) -> np.ndarray:
        delta = (w - weights).reshape(3, 1, 9)
        return (np.matmul(patches, delta.transpose(0, 2, 1)) ** 2).sum(axis=(1, 2))

    assert (per_channel(rounded) <= per_channel(rounded_weights(weights)) + 1e-9).all()
