"""The int8 ONNX trunk a training device computes its features with (`int8_trunk: true`).

Made once under `state_dir/trunk` from the first images the device's stream offers (its own
data, never a test split: `export.trunk`), then kept: restarts and every round reuse the file,
and the feature cache files its features under the file's own hash.
"""

from __future__ import annotations

import numpy as np

from edge_client.config import DeviceConfig
from edge_client.device_data import DeviceData
from export.checkpoint import InputSpec
from export.trunk import TrunkRuntime, device_trunk
from fedfmx.config import FleetConfig
from fedfmx.errors import ConfigError
from fedfmx.stream import DeviceStream, SampleTable

CALIBRATION_IMAGES = 256


def calibration_images(samples: SampleTable, stream: DeviceStream, rounds: int) -> np.ndarray:
    """The first `CALIBRATION_IMAGES` images of the earliest round that offers any."""
    for global_round in range(rounds):
        ids = stream.available(global_round)
        if len(ids):
            images, _ = samples.rows(ids[:CALIBRATION_IMAGES])
            if images.ndim == 4 and len(images):
                return images
    return np.zeros((0, 1, 1, 1), np.float32)


def open_device_trunk(config: DeviceConfig, fleet: FleetConfig, data: DeviceData) -> TrunkRuntime:
    """The device's int8 trunk (`int8_trunk: true`)."""
    if config.serves:
        raise ConfigError(
            "int8_trunk with serve_predictions is not supported yet (the exported model would "
            "carry the fp32 trunk): serve from a `role: serve` device, or set "
            "serve_predictions: false"
        )
    if fleet.model.backbone != "efficientnet_lite0":
        raise ConfigError("int8_trunk needs model.backbone efficientnet_lite0 (a frozen trunk)")
    size = fleet.model.trunk_input_size
    folder = config.state_dir / "trunk"
    images = calibration_images(data.samples, data.stream, fleet.protocol.num_rounds)
    if not len(images) and not any(folder.glob("*.int8.onnx")):
        raise ConfigError("int8_trunk: the device holds no images yet to calibrate its trunk on")
    path = device_trunk(folder, InputSpec.of_fleet(fleet), size, images)
    return TrunkRuntime.load(path, size, fleet.training.threads)
