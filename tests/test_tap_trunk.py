"""The ONNX trunk that exposes closed-form FedFMX's taps (`export.tap_trunk`) and the numpy
side that reads it: pooling and projections against torch's, equalisation that leaves the
exposed maps alone, and the int8 recipe applied to the tap graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from lite0_helpers import needs_weights
from onnx import TensorProto

from export.checkpoint import InputSpec
from export.equalisation import equalise_streams, residual_streams
from export.feature_maps import ExpertBank, FixedMaps, closed_form_features, tap_rows
from export.tap_trunk import STREAM_SUFFIX, export_tap_trunk
from export.trunk import quantize_trunk
from export.trunk_runtime import TrunkRuntime, fp32_trunk_path
from fedfmx.closed_form.feature_maps import TapFeatures
from fedfmx.data.datasets import load_dataset
from fedfmx.trunk.spec import FEATURES_NAME
from fedfmx.trunk.taps import TAP_WIDTH, TAPS, tap_slice, tap_sources, tap_vector

FLEET_TAPS = ("pool", "block4_4x4", "block7_4x4", "block10_2x2")
"""The default fleet's: `φ_0`'s pool and the three expert taps."""
SIZE = 64


def test_tap_sources_are_the_maps_beyond_the_pool_in_trunk_order() -> None:
    assert tap_sources(FLEET_TAPS) == ("block4", "block7", "block10")
    assert tap_sources(["head2x2", "block2_4x4", "pool"]) == ("block2", "head")
    assert tap_sources(["pool"]) == ()


def test_numpy_tap_rows_are_torchs_tap_vector_on_any_map_size() -> None:
    """Maps of 5×5 and 3×3 (grids that do not divide them: cells overlap, as in torch)."""
    generator = torch.Generator().manual_seed(0)
    outputs = {}
    for tap in TAPS:
        side = 3 if tap.source == "head" else 5
        outputs[tap.source] = torch.rand(2, tap.channels, side, side, generator=generator)
    expected = tap_vector(outputs).numpy()
    arrays = {name: value.numpy() for name, value in outputs.items()}
    arrays[FEATURES_NAME] = arrays["head"].mean(axis=(2, 3))
    taps = [tap.name for tap in TAPS]
    np.testing.assert_allclose(tap_rows(arrays, taps), expected, rtol=1e-6, atol=1e-7)
    some = tap_rows(arrays, FLEET_TAPS)
    np.testing.assert_allclose(some, expected[:, _columns(FLEET_TAPS)], rtol=1e-6, atol=1e-7)


def _columns(taps: tuple[str, ...]) -> np.ndarray:
    """Where `taps` lie in the full tap vector, side by side."""
    return np.concatenate([np.arange(TAP_WIDTH)[tap_slice(t)] for t in taps])


def test_numpy_tap_features_are_torchs_tap_experts() -> None:
    """`φ_t` in numpy from the experts' projections, against `TapFeatures` (scale-free rows)."""
    taps = torch.rand(5, TAP_WIDTH, generator=torch.Generator().manual_seed(1)) * 30
    experts = [TapFeatures(name, 32, seed=index) for index, name in enumerate(FLEET_TAPS)]
    with torch.no_grad():
        expected = torch.cat([expert(taps) for expert in experts], dim=1).numpy()
    maps = FixedMaps(
        pretrained=True,
        projection=None,
        experts=tuple(ExpertBank(np.zeros(0), 0, e.vector.projection.numpy()) for e in experts),
        parameters={"head.weight": (1, 128)},
        taps=FLEET_TAPS,
    )
    rows = taps.numpy()[:, _columns(FLEET_TAPS)]
    np.testing.assert_allclose(closed_form_features(maps, rows), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="wide"):
        closed_form_features(maps, rows[:, :-1])


@pytest.fixture(scope="module")
def tap_trunk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default fleet's fp32 tap trunk for 28×28 grey images (made once: ~20 s)."""
    folder = tmp_path_factory.mktemp("tap-trunk")
    sources = tap_sources(FLEET_TAPS)
    path = fp32_trunk_path(folder, SIZE, sources)
    return export_tap_trunk(InputSpec(channels=1, height=28, width=28), SIZE, sources, path)


def _images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 1, 28, 28), dtype=np.float32)


def _without_identities(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its exposed maps written straight by the residual stream (the guard
    undone): the stream is then equalisable and its graph output rescaled."""
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    kept = [node for node in bare.graph.node if node.op_type != "Identity"]
    for node in kept:
        node.output[:] = [name.removesuffix(STREAM_SUFFIX) for name in node.output]
        node.input[:] = [name.removesuffix(STREAM_SUFFIX) for name in node.input]
    del bare.graph.node[:]
    bare.graph.node.extend(kept)
    return bare


def _tap_rows_of(model: onnx.ModelProto, folder: Path, images: np.ndarray) -> np.ndarray:
    path = folder / "probe.onnx"
    onnx.save_model(model, str(path))
    return TrunkRuntime.load(path, SIZE, taps=FLEET_TAPS).features(images)


@needs_weights
def test_equalisation_leaves_the_exposed_taps_as_the_float_trunks(
    tap_trunk: Path, tmp_path: Path
) -> None:
    model = onnx.load_model(str(tap_trunk))
    images = _images(8)
    before = _tap_rows_of(model, tmp_path, images)
    streams = len(residual_streams(model))
    assert streams > 0  # the streams the maps do not sit on are still equalised
    equalised = _tap_rows_of(equalise_streams(model, images), tmp_path, images)
    np.testing.assert_allclose(equalised, before, rtol=0, atol=1e-5 * np.abs(before).max())
    # without the Identity readers the same equalisation rescales the exposed maps
    bare = _without_identities(onnx.load_model(str(tap_trunk)))
    assert len(residual_streams(bare)) > streams
    rescaled = _tap_rows_of(equalise_streams(bare, images), tmp_path, images)
    assert np.abs(rescaled - before).max() > 0.01 * np.abs(before).max()


@needs_weights
def test_the_int8_recipe_quantizes_the_tap_trunk_and_keeps_its_outputs(
    tap_trunk: Path, tmp_path: Path
) -> None:
    """Calibrated on 32 digits (drawn on the trunk's 28×28 canvas): the graph keeps its named
    outputs, it carries int8 weights, and the tap vectors stay near the fp32 ones (parity is
    measured by `benchmarks/tap_trunk_int8.py`)."""
    dataset = load_dataset("digits")
    images = np.zeros((48, 1, 28, 28), np.float32)
    images[:, :, 10:18, 10:18] = dataset.train_x[:48]  # 8×8 digits on a 28×28 canvas
    int8 = quantize_trunk(tap_trunk, tmp_path / "int8.onnx", images[:32])
    graph = onnx.load_model(str(int8)).graph
    assert [o.name for o in graph.output] == [FEATURES_NAME, "block4", "block7", "block10"]
    assert any(i.data_type == TensorProto.INT8 for i in graph.initializer)
    fp32 = TrunkRuntime.load(tap_trunk, SIZE, taps=FLEET_TAPS).features(images[32:])
    quantized = TrunkRuntime.load(int8, SIZE, taps=FLEET_TAPS).features(images[32:])
    error = quantized - fp32
    sqnr_db = 10 * np.log10((fp32**2).sum() / (error**2).sum())
    assert sqnr_db > 10, sqnr_db
