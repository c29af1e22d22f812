"""Where a device's learner gets its samples: the fleet partition, or its own sources' store.

`open_device_data` turns the device YAML's `data` section into what `DeviceLearner` reads (a
`SampleTable` and a `DeviceStream`) and, for a folder or camera, the `StreamFeed` that fills
the sample store and classifies unlabelled frames while the device runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_client.config import DeviceConfig, PartitionSource
from edge_client.feed import StreamFeed
from edge_client.predictions import StreamPredictor
from edge_client.sample_store import SampleStore
from edge_client.sources.base import SampleSource
from edge_client.store_stream import StoreStream
from edge_client.stream_config import CameraSourceConfig, FolderSourceConfig
from fedfmx.config import FleetConfig
from fedfmx.data.preprocessing import fleet_image_input
from fedfmx.data.stream import DeviceStream, SampleTable
from fedfmx.trunk.feature_cache import FeatureFn, trunk_feature_fn


@dataclass
class DeviceData:
    samples: SampleTable
    stream: DeviceStream
    feed: StreamFeed | None
    """None for a fleet partition (nothing arrives while the device runs)."""


def device_sources(source: FolderSourceConfig | CameraSourceConfig) -> list[SampleSource]:
    from edge_client.sources.folder import FolderSource  # watchdog: only for folders

    if isinstance(source, FolderSourceConfig):
        return [FolderSource(source)]
    from edge_client.sources.camera import CameraSource

    sources: list[SampleSource] = [CameraSource(source)]
    if source.labels_folder is not None:
        sources.append(FolderSource(source.labels_folder))
    return sources


def _trunk(config: DeviceConfig, fleet: FleetConfig) -> FeatureFn | None:
    """The frozen trunk, for a store that keeps features only (pretrained backbone, no raw)."""
    if config.store.keep_raw_images or fleet.model.backbone != "efficientnet_lite0":
        return None
    from fedfmx.trunk.pretrained import PretrainedBackbone

    return trunk_feature_fn(PretrainedBackbone(1, fleet.model.trunk_input_size))


def open_device_data(config: DeviceConfig, fleet: FleetConfig, seed: int) -> DeviceData:
    source = config.data
    if isinstance(source, PartitionSource):
        from edge_client.sources.partition import open_partition

        samples, stream = open_partition(source, fleet)
        return DeviceData(samples, stream, None)
    spec = fleet_image_input(fleet)
    store = SampleStore(
        config.state_dir / "store", config.store, spec, fleet.classes, seed, _trunk(config, fleet)
    )
    predictor = None
    if config.serves:
        predictor = StreamPredictor(config.device_id, spec, config.predictions, config.state_dir)
    store_stream = StoreStream(store)
    feed = StreamFeed(device_sources(source), store, spec, predictor)
    return DeviceData(store_stream, store_stream, feed)
