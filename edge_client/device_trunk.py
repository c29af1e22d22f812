"""The int8 ONNX trunk a training device computes its features with (`int8_trunk: true`).

Made once under `state_dir/trunk` from the first images the device's stream offers (its own
data, never a test split: `export.trunk`), then kept: restarts and every round reuse the file,
and the feature cache files its features under the file's own hash. It is made in a child
process: ONNX Runtime's calibrator holds every layer's activations for all calibration images
(~300 MB at 64 px), memory the device's own process would otherwise keep for good.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from edge_client.config import DeviceConfig
from edge_client.device_data import DeviceData
from export.checkpoint import InputSpec
from export.trunk_runtime import TrunkRuntime, int8_trunk_path
from fedfmx.config import FleetConfig
from fedfmx.data.stream import DeviceStream, SampleTable
from fedfmx.errors import ConfigError
from fedfmx.trunk.taps import tap_sources

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


def open_device_trunk(
    config: DeviceConfig,
    fleet: FleetConfig,
    data: DeviceData,
    fp32_folder: Path | None = None,
    taps: tuple[str, ...] = (),
) -> TrunkRuntime:
    """The device's int8 trunk (`int8_trunk: true`), quantized from the fp32 trunk in
    `fp32_folder` (a device without torch: the one `export-serving` wrote); with `taps`, the
    trunk that outputs the maps they read, giving their vectors (`export.tap_trunk`)."""
    if fleet.model.backbone != "efficientnet_lite0":
        raise ConfigError("int8_trunk needs model.backbone efficientnet_lite0 (a frozen trunk)")
    size = fleet.model.trunk_input_size
    folder = config.state_dir / "trunk"
    images = calibration_images(data.samples, data.stream, fleet.protocol.num_rounds)
    sources = tap_sources(taps)
    if not len(images) and not int8_trunk_path(folder, size, sources).is_file():
        raise ConfigError("int8_trunk: the device holds no images yet to calibrate its trunk on")
    spec = InputSpec.of_fleet(fleet)
    path = make_trunk_in_child(folder, spec, size, images, fp32_folder, sources)
    return TrunkRuntime.load(path, size, fleet.training.threads, taps)


def make_trunk_in_child(
    folder: Path,
    spec: InputSpec,
    input_size: int,
    images: np.ndarray,
    fp32_folder: Path | None = None,
    sources: tuple[str, ...] = (),
) -> Path:
    """`export.trunk.device_trunk` run in a fresh Python process (its memory goes with it)."""
    folder.mkdir(parents=True, exist_ok=True)
    calibration = folder / "calibration.npy"
    np.save(calibration, images)
    code = (
        "import sys, numpy as np; from pathlib import Path; "
        "from export.checkpoint import InputSpec; from export.trunk import device_trunk; "
        "print(device_trunk(Path(sys.argv[1]), InputSpec.model_validate_json(sys.argv[2]), "
        "int(sys.argv[3]), np.load(sys.argv[4]), Path(sys.argv[5]), "
        "tuple(filter(None, sys.argv[6].split(',')))))"
    )
    command = [sys.executable, "-c", code, str(folder), spec.model_dump_json()]
    done = subprocess.run(
        [
            *command,
            str(input_size),
            str(calibration),
            str(fp32_folder or folder),
            ",".join(sources),
        ],
        capture_output=True,
        text=True,
    )
    calibration.unlink(missing_ok=True)
    if done.returncode != 0:
        problem = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"int8_trunk: making the trunk under {folder} failed: {problem}")
    return Path(done.stdout.strip().splitlines()[-1])
