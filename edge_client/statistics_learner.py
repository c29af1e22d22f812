"""A closed-form device's learner without torch (issue 16): ONNX Runtime and numpy only.

The closed-form methods (`ridge`, `fedfmx_cf`) train nothing: a device computes `φ` of its new
rows and sends their sums (`fedfmx.device.round.statistics_update`, the same update, row
bookkeeping and wire format as the torch `DeviceLearner`). Here the frozen trunk runs in ONNX
Runtime (the device's int8 trunk with `int8_trunk: true`, else the fp32 file `export-serving`
wrote) and the fixed maps in numpy (`export.feature_maps`), so the process never imports
torch (~220 MB less resident on a Pi). `fedfmx-edge join` picks it for a closed-form fleet
whose feature maps file exists (`open_statistics_learner`); otherwise it says why in one line
and the torch learner runs. Such a device also serves without torch
(`edge_client.closed_form_serving`: the current head over the same features).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np

from edge_client.config import DeviceConfig, PartitionSource
from edge_client.device_data import DeviceData
from export.feature_maps import (
    FEATURE_MAPS_FILE,
    FixedMaps,
    closed_form_features,
    load_feature_maps,
)
from fedfmx.config import FleetConfig
from fedfmx.data.stream import DeviceStream, SampleTable
from fedfmx.device.round import (
    DeviceState,
    LocalRows,
    StatisticsRound,
    check_model_tensors,
    statistics_update,
)
from fedfmx.errors import ConfigError
from fedfmx.federation.aggregation import Arrays
from fedfmx.learner.exemplars import ExemplarBuffer
from fedfmx.trunk.taps import tap_sources
from fedfmx.wire.messages import ModelHeader, RoundAnnouncement

log = logging.getLogger(__name__)


class OnnxTrunk(Protocol):
    """What the learner needs of a trunk: images [N, C, H, W] -> the rows its maps read
    (`TrunkRuntime`: pooled features, or the fleet's tap vectors)."""

    def features(self, images: np.ndarray) -> np.ndarray: ...


class StatisticsLearner:
    """A closed-form device's rounds: `φ` = the fixed maps of the trunk's features (or of the
    images, without a trunk), summed over the rows the fleet's model does not hold yet."""

    generator = None
    """No random draws (the torch learner's generator is saved with its state)."""

    def __init__(
        self,
        device_id: str,
        fleet: FleetConfig,
        samples: SampleTable,
        stream: DeviceStream,
        maps: FixedMaps,
        trunk: OnnxTrunk | None,
    ) -> None:
        if maps.pretrained and trunk is None:
            raise ConfigError("a closed-form fleet on a frozen trunk needs the trunk's ONNX file")
        self.device_id = device_id
        self.fleet = fleet
        self.samples = samples
        self.stream = stream
        self.maps = maps
        self.trunk = trunk
        self.state = DeviceState()
        self.exemplars = ExemplarBuffer(0, None, 0)
        """Always empty: a closed-form head replays nothing (kept for the saved state)."""

    def features(self, rows: np.ndarray) -> np.ndarray:
        """`φ` of stored rows: images through the trunk first (its pooled features, or the
        tap vectors the maps read; rows that already are trunk features, from a features-only
        sample store, pass as they are)."""
        if self.trunk is not None and rows.ndim == 4:
            rows = self.trunk.features(rows)
        return closed_form_features(self.maps, rows)

    def check_model(self, model: ModelHeader, weights: Arrays) -> None:
        check_model_tensors(model, weights, self.maps.parameters, self.fleet, self.device_id)

    def handle_round(
        self, announcement: RoundAnnouncement, model: ModelHeader, weights: Arrays
    ) -> bytes | None:
        """The statistics of the rows received by this round and not yet in the fleet's sums
        (None before the device's first task, or with no such row)."""
        position = self.stream.position(announcement.round)
        if position.task is None:
            return None
        self.state.task = position.task
        self.state.held = self.stream.available(announcement.round)
        round_ = StatisticsRound(self.device_id, announcement, model, weights, self.fleet)
        return statistics_update(round_, self.state, self.samples, self.features)

    def local_rows(self) -> LocalRows:
        """The current task's rows (a closed-form device keeps no exemplar)."""
        return LocalRows(*self.samples.rows(self.state.held))


def serving_files(config: DeviceConfig) -> Path:
    """The folder `fedfmx-edge export-serving` wrote for this device."""
    return config.serving_files or config.state_dir / "serving"


def torch_free_problem(config: DeviceConfig, fleet: FleetConfig) -> str | None:
    """Why this device cannot train without torch, or None when it can."""
    if not fleet.closed_form:
        return f"method {fleet.method} trains a network"
    pretrained = fleet.model.backbone == "efficientnet_lite0"
    own_source = not isinstance(config.data, PartitionSource)
    if pretrained and own_source and not config.store.keep_raw_images:
        return "a features-only sample store computes its features with the torch trunk"
    path = serving_files(config) / FEATURE_MAPS_FILE
    if not path.is_file():
        return f"no {path} (write it with `fedfmx-edge export-serving`)"
    return None


def open_statistics_learner(
    config: DeviceConfig, fleet: FleetConfig, data: DeviceData
) -> StatisticsLearner:
    """The device's torch-free learner (`torch_free_problem` said it can have one)."""
    folder = serving_files(config)
    maps = load_feature_maps(folder / FEATURE_MAPS_FILE)
    trunk: OnnxTrunk | None = None
    if maps.pretrained:
        size = fleet.model.trunk_input_size
        if config.int8_trunk:
            from edge_client.device_trunk import open_device_trunk

            trunk = open_device_trunk(config, fleet, data, fp32_folder=folder, taps=maps.taps)
        else:
            from export.trunk_runtime import TrunkRuntime, fp32_trunk_path

            path = fp32_trunk_path(folder, size, tap_sources(maps.taps))
            trunk = TrunkRuntime.load(path, size, fleet.training.threads, maps.taps)
    log.info("closed-form device without torch: features through ONNX Runtime and numpy")
    return StatisticsLearner(config.device_id, fleet, data.samples, data.stream, maps, trunk)
