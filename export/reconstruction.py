"""Layer-by-layer output reconstruction of a quantized trunk against its float teacher.

AdaRound (`export.rounding`) rounds each layer's weights so that the layer's output on its
*float* inputs moves least; in the quantized trunk the layer reads *quantized* inputs `x̃`,
already off by every earlier layer's rounding and by the uint8 activations — the larger error
(`docs/decisions.md`). Reconstruction (in the spirit of AdaQuant, Hubara et al. 2021, and of
BRECQ's output reconstruction, Li et al. 2021, one layer at a time) re-chooses each layer's
rounding and bias in graph order, with the earlier layers already re-chosen, so that its output
on the quantized inputs matches the float trunk's on the float inputs:

    min over W̃ on W's grid (each weight on the level below or above W/s), b̃:
        Σ_x ‖W̃x̃ + b̃ − (Wx + b)‖²

over every input patch of the calibration images. With the means `μ̃ = E[x̃]`, `μ = E[x]` the
best bias for any `W̃` is `b̃ = b + Wμ − W̃μ̃`, and what is left is `adaround`'s quadratic form
on the centred statistics `G = Σ (x̃−μ̃)(x̃−μ̃)ᵀ`, `C = Σ (x̃−μ̃)(x−μ)ᵀ`. The layer can thereby
cancel part of the error it receives, which rounding against float inputs cannot. The weights
never leave their quantization grid (the scales are the quantized model's own), so the result
is the same int8 model with other integers in it; the float teacher is the function the
device would otherwise compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from export.rounding import PATCH_BATCH, WEIGHT_LEVELS, adaround, conv_inputs, conv_patches


@dataclass
class PairedStatistics:
    """Patch sums of one convolution over the calibration images, per group (`[groups, …]`):
    quantized inputs `x̃` against the float inputs `x` at the same positions."""

    rows: int
    quantized_sum: np.ndarray
    float_sum: np.ndarray
    gram: np.ndarray
    cross: np.ndarray

    @classmethod
    def empty(cls, groups: int, k: int) -> PairedStatistics:
        """No patches yet, for `groups` groups of `K = k` inputs."""
        vector, matrix = np.zeros((groups, k)), np.zeros((groups, k, k))
        return cls(0, vector, vector.copy(), matrix, matrix.copy())

    def add(self, quantized: np.ndarray, floats: np.ndarray) -> None:
        """Fold in patches `[groups, rows, K]` of both inputs."""
        self.rows += quantized.shape[1]
        self.quantized_sum += quantized.sum(axis=1)
        self.float_sum += floats.sum(axis=1)
        self.gram += np.matmul(quantized.transpose(0, 2, 1), quantized)
        self.cross += np.matmul(quantized.transpose(0, 2, 1), floats)

    def centred(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(`μ̃`, `μ`, `G − n μ̃μ̃ᵀ`, `C − n μ̃μᵀ`)."""
        mu_q, mu = self.quantized_sum / self.rows, self.float_sum / self.rows
        gram = self.gram - self.rows * mu_q[:, :, None] * mu_q[:, None, :]
        cross = self.cross - self.rows * mu_q[:, :, None] * mu[:, None, :]
        return mu_q, mu, gram, cross


def paired_statistics(
    quantized: onnx.ModelProto,
    teacher: onnx.ModelProto,
    calibration: np.ndarray,
    node: onnx.NodeProto,
    teacher_node: onnx.NodeProto,
    kernel: tuple[int, ...],
) -> PairedStatistics:
    """`PairedStatistics` of `node` (in `quantized`, reading a dequantized input) and the same
    convolution `teacher_node` in the float `teacher`."""
    groups = next((a.i for a in node.attribute if a.name == "group"), 1)
    stats = PairedStatistics.empty(groups, int(np.prod(kernel[1:])))
    pairs = zip(
        conv_inputs(quantized, calibration, [node.input[0]]),
        conv_inputs(teacher, calibration, [teacher_node.input[0]]),
        strict=True,
    )
    for (x_q,), (x,) in pairs:
        for start in range(0, len(x), PATCH_BATCH):
            stop = start + PATCH_BATCH
            stats.add(
                conv_patches(node, kernel, x_q[start:stop]).astype(np.float64),
                conv_patches(teacher_node, kernel, x[start:stop]).astype(np.float64),
            )
    return stats


def reconstruct(
    quantized: onnx.ModelProto,
    teacher: onnx.ModelProto,
    calibration: np.ndarray,
    convs: list[str],
) -> onnx.ModelProto:
    """`quantized` (a QDQ model of `teacher`) with the int8 weights and int32 biases of the
    convolutions named in `convs` re-chosen in that (graph) order, in place (module docstring);
    each layer's statistics are measured with the layers before it already re-chosen."""
    producers = {out: node for node in quantized.graph.node for out in node.output}
    initialisers = {init.name: init for init in quantized.graph.initializer}
    teacher_nodes = {node.name: node for node in teacher.graph.node}
    teacher_weights = {i.name: numpy_helper.to_array(i) for i in teacher.graph.initializer}
    for node in (n for n in quantized.graph.node if n.name in set(convs)):
        original = teacher_nodes[node.name]
        w, b = teacher_weights[original.input[1]], teacher_weights[original.input[2]]
        weight_dq, bias_dq = producers[node.input[1]], producers[node.input[2]]
        levels_init, weight_scale = (initialisers[n] for n in weight_dq.input[:2])
        bias_init, bias_scale = (initialisers[n] for n in bias_dq.input[:2])
        stats = paired_statistics(quantized, teacher, calibration, node, original, w.shape)
        mu_q, mu, gram, cross = stats.centred()
        rounded = adaround(w, gram, cross=cross)
        groups = len(gram)
        rows = rounded.reshape(groups, -1, gram.shape[1]).astype(np.float64)
        teacher_rows = w.reshape(groups, -1, gram.shape[1]).astype(np.float64)
        shift = np.einsum("gok,gk->go", teacher_rows, mu) - np.einsum("gok,gk->go", rows, mu_q)
        scale = numpy_helper.to_array(weight_scale).reshape((-1,) + (1,) * (w.ndim - 1))
        levels = np.clip(np.round(rounded / scale), -WEIGHT_LEVELS, WEIGHT_LEVELS)
        bias = b + shift.reshape(-1)
        bias_levels = np.round(bias / numpy_helper.to_array(bias_scale))
        levels_init.CopyFrom(numpy_helper.from_array(levels.astype(np.int8), levels_init.name))
        bias_init.CopyFrom(numpy_helper.from_array(bias_levels.astype(np.int32), bias_init.name))
    return quantized
