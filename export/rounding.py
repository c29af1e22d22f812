"""How a convolution's weights are rounded to int8: to nearest, or by AdaRound.

ONNX Runtime quantizes weights symmetrically per output channel: `s = max|w|/127`,
`q = round(w/s)` in −127…127. Rounding each weight to its nearest level minimises each
weight's own error, not the layer's: AdaRound (Nagel et al. 2020, "Up or down? Adaptive
rounding for post-training quantization") chooses, per weight, the level below or above so that
the layer's *output* on the calibration images moves least,

    min over h ∈ {0, 1}:   Σ_x ‖(W̃ − W)·x‖²,   W̃ = s·clip(⌊W/s⌋ + h, −127, 127),

where `x` runs over the convolution's input patches. The objective is a quadratic form in the
Gram matrix `G = Σ x xᵀ` of the patches (`tr(ΔW G ΔWᵀ)`), so the calibration images are read
once per layer and the optimisation never touches them again. The paper relaxes `h` to a
rectified sigmoid and anneals it to 0/1 with Adam; here the same binary choice is made by
greedy coordinate descent from nearest rounding (`adaround`), which on this trunk reached a
lower objective in a fraction of the time (`docs/decisions.md`). The result is a grid point of
the same scale, so ONNX Runtime's quantizer takes it unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
import onnxruntime as ort
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper, numpy_helper

from export.onnx_model import INPUT_NAME

WEIGHT_LEVELS = 127
"""ONNX Runtime's symmetric int8 weights take −127…127."""
PROBE_BATCH = 32
PATCH_BATCH = 8
"""Images whose patches are materialised at a time (early depthwise layers: ~3.5 MB each)."""


def weight_scales(weights: np.ndarray) -> np.ndarray:
    """`s` per output channel, shaped to broadcast against `weights` [O, …]."""
    scale = np.abs(weights.reshape(len(weights), -1)).max(axis=1) / WEIGHT_LEVELS
    scale[scale == 0] = 1.0
    return scale.reshape((-1,) + (1,) * (weights.ndim - 1))


def rounded_weights(weights: np.ndarray) -> np.ndarray:
    """`W_q`: each weight rounded to its nearest level, dequantized (as ONNX Runtime does)."""
    scale = weight_scales(weights)
    levels = np.clip(np.round(weights / scale), -WEIGHT_LEVELS, WEIGHT_LEVELS)
    return (levels * scale).astype(np.float32)


def conv_inputs(
    model: onnx.ModelProto, calibration: np.ndarray, tensors: list[str]
) -> Iterator[list[np.ndarray]]:
    """The values of `tensors` (names in `model`'s graph) over `calibration` images,
    `PROBE_BATCH` images at a time (the whole set's activations never sit in memory)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {output.name for output in probe.graph.output}
    for name in dict.fromkeys(tensors):
        if name not in known:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    for start in range(0, len(calibration), PROBE_BATCH):
        batch = np.ascontiguousarray(calibration[start : start + PROBE_BATCH], np.float32)
        yield [np.asarray(value) for value in session.run(tensors, {INPUT_NAME: batch})]


def conv_patches(node: onnx.NodeProto, kernel: tuple[int, ...], x: np.ndarray) -> np.ndarray:
    """The input patches each output of `node` reads, grouped as its weights are:
    `[groups, rows, K]`, `K = C_in/groups · kh · kw` (one group for an ordinary convolution,
    one per channel for a depthwise one); `kernel` is the weights' shape."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ValueError(f"{node.name}: auto_pad is not supported, pads must be explicit")
    if any(d != 1 for d in attributes.get("dilations", [1, 1])):
        raise ValueError(f"{node.name}: dilated convolutions are not supported")
    groups = int(attributes.get("group", 1))
    kh, kw = kernel[2:]
    top, left, bottom, right = attributes.get("pads", [0, 0, 0, 0])
    sh, sw = attributes.get("strides", [1, 1])
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    windows = sliding_window_view(padded, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    n, c, ho, wo = windows.shape[:4]
    # [N, groups, C/groups, Ho, Wo, kh, kw] -> [groups, N·Ho·Wo, C/groups·kh·kw]
    grouped = windows.reshape(n, groups, c // groups, ho, wo, kh, kw)
    return grouped.transpose(1, 0, 3, 4, 2, 5, 6).reshape(groups, n * ho * wo, -1)


def patch_grams(
    model: onnx.ModelProto, calibration: np.ndarray, convs: list[onnx.NodeProto]
) -> list[np.ndarray]:
    """`G = Σ x xᵀ` over every input patch `x` of each convolution in `convs`
    (`[groups, K, K]`), on the float model."""
    weights = {i.name: i for i in model.graph.initializer}
    shapes = [tuple(weights[node.input[1]].dims) for node in convs]
    grams: list[np.ndarray] = [np.zeros(0)] * len(convs)
    for values in conv_inputs(model, calibration, [node.input[0] for node in convs]):
        for i, (node, x) in enumerate(zip(convs, values, strict=True)):
            for start in range(0, len(x), PATCH_BATCH):
                patches = conv_patches(node, shapes[i], x[start : start + PATCH_BATCH])
                gram = np.matmul(patches.transpose(0, 2, 1), patches).astype(np.float64)
                grams[i] = gram if not len(grams[i]) else grams[i] + gram
    return grams


def adaround(
    weights: np.ndarray, gram: np.ndarray, sweeps: int = 4, cross: np.ndarray | None = None
) -> np.ndarray:
    """`W̃` (dequantized, `weights`' shape): each weight on the level below or above `W/s`,
    whichever (jointly) keeps `E = tr(ΔW G ΔWᵀ)` smallest; `gram` is `[groups, K, K]`
    (`patch_grams`).

    Starts from nearest rounding and visits each weight in turn, moving it to its other
    neighbouring level when that lowers `E`: with `g = ΔW G` the change is
    `2δ·g_k + δ²·G_kk` for a move `δ = ±s`, and `g` is updated in `O(K)` per move, so a sweep
    over a layer costs about one `ΔW G` product. `E` never rises, so the result is never worse
    than nearest on the calibration images; stops after `sweeps` sweeps or one without a move.

    With `cross` (`C = Σ x̃ xᵀ`, `[groups, K, K]`) the layer reads other inputs `x̃` than the
    ones `W` was trained on (the quantized trunk's), `gram` is theirs (`Σ x̃ x̃ᵀ`), and the
    objective is the output error against the float layer on its float inputs,
    `E = Σ ‖W̃x̃ − Wx‖² = tr(W̃ G W̃ᵀ) − 2 tr(W̃ C Wᵀ) + const`: the same moves with
    `g = W̃ G − W Cᵀ` (which is `ΔW G` when `x̃ = x`)."""
    groups = len(gram)
    shape = weights.shape
    w = weights.reshape(groups, -1, gram.shape[1]).astype(np.float64)
    s = weight_scales(weights).reshape(groups, -1, 1)
    exact = w / s
    levels = np.clip(np.round(exact), -WEIGHT_LEVELS, WEIGHT_LEVELS)
    # the other neighbour of each weight; each channel's largest weight stays on ±127 (it
    # fixes the scale ONNX Runtime computes)
    other = np.where(levels > exact, np.floor(exact), np.ceil(exact))
    movable = (np.abs(levels) < WEIGHT_LEVELS) & (np.abs(other) <= WEIGHT_LEVELS)
    if cross is None:
        g = np.matmul(levels * s - w, gram)
    else:
        g = np.matmul(levels * s, gram) - np.matmul(w, cross.transpose(0, 2, 1))
    diagonal = np.diagonal(gram, axis1=1, axis2=2)
    for _ in range(sweeps):
        moved = False
        for k in range(gram.shape[1]):
            step = (other[:, :, k] - levels[:, :, k]) * s[:, :, 0] * movable[:, :, k]
            gain = 2 * step * g[:, :, k] + step**2 * diagonal[:, k, None]
            take = gain < 0
            if not take.any():
                continue
            moved = True
            step = step * take
            levels[:, :, k], other[:, :, k] = (
                np.where(take, other[:, :, k], levels[:, :, k]),
                np.where(take, levels[:, :, k], other[:, :, k]),
            )
            g += step[:, :, None] * gram[:, None, k, :]
        if not moved:
            break
    return (levels * s).reshape(shape).astype(np.float32)


def adarounded_weights(
    model: onnx.ModelProto, calibration: np.ndarray, convs: list[onnx.NodeProto]
) -> dict[str, np.ndarray]:
    """`W̃` of each convolution in `convs` by `adaround`, keyed by its weight's name."""
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    grams = patch_grams(model, calibration, convs)
    return {
        node.input[1]: adaround(weights[node.input[1]], gram)
        for node, gram in zip(convs, grams, strict=True)
    }
