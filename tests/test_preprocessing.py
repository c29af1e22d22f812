"""The one preprocessing path, and the RGB camera-size input for the pretrained trunk."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from stream_images import digit_pixels, encode

from export.checkpoint import InputSpec
from export.images import load_images
from fedfmx.config import FleetConfig, ImageInputConfig, parse_fleet
from fedfmx.data.preprocessing import decode_image, fit_pixels, model_input
from fedfmx.data.stream import ArraySamples, StreamPosition
from fedfmx.device.learner import DeviceLearner
from fedfmx.errors import ConfigError, DataError
from fedfmx.learner.model import build_model


def test_center_crop_keeps_the_middle_and_stretch_keeps_everything() -> None:
    frame = np.zeros((120, 160, 3), np.uint8)
    frame[:, :10] = 255  # a white band at the left edge of a 4:3 frame
    square = ImageInputConfig(channels=3, height=96, width=96, fit="center_crop")
    cropped = fit_pixels(frame, square)
    assert cropped.shape == (3, 96, 96) and cropped.dtype == np.uint8
    assert cropped.max() == 0  # the band was outside the central square
    stretched = fit_pixels(frame, square.model_copy(update={"fit": "stretch"}))
    assert stretched[:, :, :5].min() == 255
    grey = model_input(frame, ImageInputConfig(channels=1, height=8, width=8))
    assert grey.shape == (1, 8, 8) and grey.dtype == np.float32 and 0 <= grey.min() <= 1


def test_decode_refuses_from_the_header_before_decoding() -> None:
    big = io.BytesIO()
    Image.new("L", (3000, 2000)).save(big, format="PNG")  # 6 Mpx, a few KB compressed
    with pytest.raises(DataError, match="pixel bound"):
        decode_image(big.getvalue(), max_pixels=1_000_000)
    gif = io.BytesIO()
    Image.new("L", (4, 4)).save(gif, format="GIF")
    with pytest.raises(DataError, match="only JPEG and PNG"):
        decode_image(gif.getvalue())
    with pytest.raises(DataError, match="0 bytes"):
        decode_image(b"")


def test_predict_reads_png_and_jpeg_folders_through_the_same_path(tmp_path: Path) -> None:
    pixels = digit_pixels(5, 2)
    (tmp_path / "a.png").write_bytes(encode(pixels[0]))
    (tmp_path / "b.png").write_bytes(encode(pixels[1]))
    images, names = load_images(tmp_path, InputSpec(channels=1, height=8, width=8))
    assert names == ["a.png", "b.png"]
    spec = ImageInputConfig(channels=1, height=8, width=8)
    np.testing.assert_array_equal(images, np.stack([model_input(p, spec) for p in pixels]))


def camera_fleet(size: int) -> FleetConfig:
    return parse_fleet(
        {
            "method": "fedfmx",  # the SGD learner, which caches trunk features
            "data": {
                "dataset": "coil20",
                "image": {"channels": 3, "height": size, "width": size, "fit": "center_crop"},
            },
            "model": {
                "backbone": "efficientnet_lite0",
                "trunk_input_size": size,
                "feature_dim": 16,
                "num_experts": 2,
                "expert_hidden": 8,
            },
            "fedfmx": {"k_max": 2, "max_experts_per_round": 1},
        }
    )


def test_an_rgb_camera_size_fleet_runs_the_trunk_at_its_size_and_caches_under_it(
    tmp_path: Path,
) -> None:
    fleet = camera_fleet(128)
    frame = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    x = torch.from_numpy(model_input(frame, fleet.data.image)[None])  # type: ignore[arg-type]
    assert x.shape == (1, 3, 128, 128)
    model = build_model(fleet.model, fleet.routing, num_classes=2, seed=0).eval()
    with torch.no_grad():
        assert model(x).shape == (1, 2)
        at_128 = model.backbone.trunk_features(x)  # type: ignore[operator]
        small = build_model(camera_fleet(64).model, fleet.routing, 2, seed=0).eval()
        at_64 = small.backbone.trunk_features(x)  # type: ignore[operator]
    assert not torch.allclose(at_128, at_64)  # another input size is other features ...
    learner = DeviceLearner(
        "cam", fleet, ArraySamples(x.numpy(), np.array(["a"])), NoArrivals(), 0, tmp_path
    )
    assert learner.feature_cache is not None
    assert learner.feature_cache.backbone_id.endswith("-128px")  # ... cached under its own id


class NoArrivals:
    """A stream that holds nothing (the learner is only built here, never run)."""

    def position(self, global_round: int) -> StreamPosition:
        return StreamPosition(task=None, round_in_task=0)

    def available(self, global_round: int) -> np.ndarray:
        return np.zeros(0, dtype=np.int64)


def test_rgb_input_needs_the_pretrained_trunk() -> None:
    with pytest.raises(ConfigError, match="efficientnet_lite0"):
        parse_fleet(
            {"data": {"dataset": "coil20", "image": {"channels": 3, "height": 64, "width": 64}}}
        )
