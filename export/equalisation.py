"""Range equalisation of the trunk's residual streams, so per-tensor uint8 activations fit them.

ONNX Runtime quantizes each activation tensor with one scale, set by its widest channel. In
EfficientNet-Lite the tensors that suffer are the linear bottlenecks: each stage's residual
stream (the outputs of the projecting convolutions and the Adds that sum them), −67…59 wide
where most channels span a few units — the largest per-tensor quantization losses measured
(`docs/decisions.md`). The stream is linear (no activation function on it), so scaling its
channel `c` by `s_c` in every convolution that writes it (rows of weight and bias) and by
`1/s_c` in every convolution that reads it (input columns) leaves the function exactly as it
was — the cross-layer equalisation of Nagel et al. 2019, applied to a whole stream at once.

With per-channel int8 weights the writers' rows are free to scale; the readers' columns are
not (a shrunk column is rounded more coarsely against its row's largest weight), so the scale
moves only part of the way, as SmoothQuant (Xiao et al. 2023) does:
`s_c = (R / R_c)^α` with `R_c` channel c's largest |value| over the calibration images and
`R = max_c R_c`. The ReLU6 tensors are left alone: their range is [0, 6] by construction,
their losses are small, and rescaling a channel through a `Clip` would move its bound to
`6·s_c`, which a `Clip` (one bound per tensor) cannot express.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from export.rounding import conv_inputs

MIGRATION = 0.5
"""α: how far a channel's range moves towards the widest one's."""


@dataclass(frozen=True)
class Stream:
    """One residual stream: the tensors linked by Adds, who writes them, who reads them."""

    tensors: list[str]
    writers: list[onnx.NodeProto]
    readers: list[onnx.NodeProto]


def residual_streams(model: onnx.ModelProto) -> list[Stream]:
    """Every set of tensors joined by `Add` nodes (or one convolution's output read only by
    convolutions) whose producers and other consumers are ungrouped convolutions with a bias:
    the streams a per-channel scale passes through unchanged."""
    nodes = list(model.graph.node)
    producer = {out: node for node in nodes for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    for node in nodes:
        if node.op_type == "Add":
            for name in [*node.input[1:], node.output[0]]:
                parent[root(name)] = root(node.input[0])
    for node in nodes:  # a bottleneck that no Add joins is a stream of its own
        readers = consumers.get(node.output[0], [])
        if node.op_type == "Conv" and readers and all(c.op_type == "Conv" for c in readers):
            root(node.output[0])
    groups: dict[str, list[str]] = {}
    for name in parent:
        groups.setdefault(root(name), []).append(name)
    streams = []
    for tensors in groups.values():
        members = set(tensors)
        writers = [producer[t] for t in tensors if t in producer and producer[t].op_type != "Add"]
        readers = [c for t in tensors for c in consumers.get(t, []) if c.output[0] not in members]
        if writers and readers and _ungrouped_convs(writers) and _ungrouped_convs(readers):
            streams.append(Stream(sorted(members), writers, readers))
    return streams


def _ungrouped_convs(nodes: list[onnx.NodeProto]) -> bool:
    return all(
        node.op_type == "Conv"
        and len(node.input) == 3
        and all(a.name != "group" or a.i == 1 for a in node.attribute)
        for node in nodes
    )


def equalise_streams(
    model: onnx.ModelProto, calibration: np.ndarray, migration: float = MIGRATION
) -> onnx.ModelProto:
    """`model` with each residual stream's channels rescaled (`s_c = (R/R_c)^α`) in place;
    the float function is unchanged."""
    streams = residual_streams(model)
    if not streams:
        return model
    names = [t for stream in streams for t in stream.tensors]
    peaks = {name: np.zeros(0) for name in names}
    for values in conv_inputs(model, calibration, names):
        for name, value in zip(names, values, strict=True):
            peak = np.abs(value).max(axis=(0, 2, 3))
            peaks[name] = peak if not len(peaks[name]) else np.maximum(peaks[name], peak)
    initialisers = {init.name: init for init in model.graph.initializer}

    def rescale(name: str, factor: np.ndarray) -> None:
        init = initialisers[name]
        value = numpy_helper.to_array(init) * factor
        init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))

    for stream in streams:
        ranges = np.max([peaks[t] for t in stream.tensors], axis=0)
        widest = ranges.max()
        scale = (widest / np.maximum(ranges, widest * 1e-6)) ** migration
        for writer in stream.writers:
            rescale(writer.input[1], scale[:, None, None, None])
            rescale(writer.input[2], scale)
        for reader in stream.readers:
            rescale(reader.input[1], 1 / scale[None, :, None, None])
    return model
