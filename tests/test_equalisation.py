"""Residual-stream equalisation: which tensors form a stream, and that the function stays."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from export.equalisation import equalise_streams, residual_streams


def _block_model(rng: np.random.Generator) -> onnx.ModelProto:
    """stem → ReLU6 → project p1 ─┬→ expand → ReLU6 → project p2 → (+) s2 → head
    └──────────────────────────────↗"""
    shapes = {
        "stem": (4, 3, 3, 3),
        "p1": (6, 4, 1, 1),
        "e": (8, 6, 1, 1),
        "p2": (6, 8, 1, 1),
        "head": (5, 6, 1, 1),
    }
    init = []
    for name, shape in shapes.items():
        scale = rng.uniform(0.1, 10, size=(shape[0], 1, 1, 1))  # uneven channel ranges
        init.append(
            numpy_helper.from_array(
                (rng.normal(size=shape) * scale).astype(np.float32), f"{name}.w"
            )
        )
        init.append(
            numpy_helper.from_array(rng.normal(size=shape[0]).astype(np.float32), f"{name}.b")
        )
    init += [
        numpy_helper.from_array(np.array(0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6, np.float32), "hi"),
    ]

    def conv(name: str, x: str, out: str, pads: int = 0) -> onnx.NodeProto:
        return helper.make_node(
            "Conv", [x, f"{name}.w", f"{name}.b"], [out], name=name, pads=[pads] * 4
        )

    nodes = [
        conv("stem", "images", "t0", 1),
        helper.make_node("Clip", ["t0", "lo", "hi"], ["a0"]),
        conv("p1", "a0", "s1"),
        conv("e", "s1", "t1"),
        helper.make_node("Clip", ["t1", "lo", "hi"], ["a1"]),
        conv("p2", "a1", "p2out"),
        helper.make_node("Add", ["s1", "p2out"], ["s2"], name="add"),
        conv("head", "s2", "features"),
    ]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [None, 3, 6, 6])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, None)],
        init,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, x: np.ndarray, name: str = "features") -> np.ndarray:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    if name != "features":
        probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run([name], {"images": x})[0])


def test_the_stream_is_the_tensors_an_add_joins_with_their_writers_and_readers() -> None:
    model = _block_model(np.random.default_rng(0))
    streams = residual_streams(model)
    by_tensors = {tuple(s.tensors): s for s in streams}
    stream = by_tensors[("p2out", "s1", "s2")]
    assert sorted(n.name for n in stream.writers) == ["p1", "p2"]
    assert sorted(n.name for n in stream.readers) == ["e", "head"]
    # the stem's output goes through a ReLU6, so it is no stream
    assert all("t0" not in s.tensors for s in streams)


def test_equalisation_keeps_the_float_function_and_evens_the_stream() -> None:
    rng = np.random.default_rng(1)
    model = _block_model(rng)
    calibration = rng.normal(size=(32, 3, 6, 6)).astype(np.float32)
    fresh = rng.normal(size=(16, 3, 6, 6)).astype(np.float32)
    before = _run(model, fresh)
    peaks_before = np.abs(_run(model, calibration, "s2")).max(axis=(0, 2, 3))
    equalised = equalise_streams(model, calibration, migration=1.0)
    np.testing.assert_allclose(
        _run(equalised, fresh), before, rtol=1e-4, atol=1e-4 * np.abs(before).max()
    )
    stream_peaks = np.max(
        [
            np.abs(_run(equalised, calibration, t)).max(axis=(0, 2, 3))
            for t in ("s1", "p2out", "s2")
        ],
        axis=0,
    )
    np.testing.assert_allclose(stream_peaks, stream_peaks.max(), rtol=1e-4)  # α = 1: all equal
    assert peaks_before.max() / peaks_before.min() > 2  # the test had something to even out
