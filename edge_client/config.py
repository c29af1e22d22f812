"""The device YAML: which fleet, which broker and credentials, which data, which hardware profile.

Relative paths in the file are read relative to the file itself, so a provisioned directory
(YAML beside its certificates) can be moved as a whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Discriminator, Field, Tag

from edge_client.stream_config import (
    CameraSourceConfig,
    FolderSourceConfig,
    PredictionsConfig,
    StoreConfig,
)
from fedfmx.config import BrokerConfig, Section, read_yaml, validate_document


class PartitionSource(Section):
    """This device's share of a fleet data set, as the fleet's seeded plan deals it out.

    The device reads only its own partition's rows, in the order the plan makes them arrive:
    the stand-in for a camera's stream when a whole fleet is simulated on one machine.
    """

    source: Literal["fleet_partition"] = "fleet_partition"
    client_index: int = Field(ge=0)
    path: Path | None = None
    """Directory of the data set files; None uses the fleet's `data.path`."""
    slowdown: float = Field(default=1.0, ge=1.0)
    """A simulated device this many times slower than its host: after each local round it
    waits `(slowdown − 1)` times that round's training time before it sends (straggler
    benchmarks and tests; 1 on every real device)."""


def _source_kind(value: object) -> str:
    """`source:` picks the section's model; a section without one is a fleet partition."""
    if isinstance(value, dict):
        return str(value.get("source", "fleet_partition"))
    return str(getattr(value, "source", "fleet_partition"))


DataSource = Annotated[
    Annotated[PartitionSource, Tag("fleet_partition")]
    | Annotated[FolderSourceConfig, Tag("folder")]
    | Annotated[CameraSourceConfig, Tag("camera")],
    Discriminator(_source_kind),
]


class DeviceConfig(Section):
    device_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    fleet_file: Path | None = None
    """The fleet YAML (model, training and codec settings); None: the embedded demo fleet."""
    broker: BrokerConfig = BrokerConfig()
    profile: str = "generic-x86"
    """A profile name from `device_configs/` or a path to a profile YAML."""
    data: DataSource
    """`fleet_partition` (simulations), `folder` or `camera` (`edge_client.sources`)."""
    state_dir: Path
    """Where the device keeps its model, Fisher, exemplars and pending update across restarts."""
    fleet_public_key: Path | None = None
    """The aggregator's Ed25519 public key (PEM); None accepts unsigned models (hashes only)."""
    serve_predictions: bool | None = None
    """Export every new global version to ONNX (the profile's precision and provider) and
    serve it between rounds (`edge_client.inference`); None: on for a folder or camera
    source, off for a fleet partition."""
    store: StoreConfig = StoreConfig()
    """Bounds of the sample store a folder or camera source fills (under `state_dir`)."""
    predictions: PredictionsConfig = PredictionsConfig()
    """Where predictions on unlabelled frames go, and the to-label queue."""

    int8_trunk: bool = False
    """A frozen pretrained trunk runs int8 through ONNX Runtime (made once from this device's own
    images, `edge_client.device_trunk`): the features it trains on, faster and lighter than the
    torch trunk. Every device of a fleet should say the same (one feature extractor)."""
    role: Literal["train", "serve"] = "train"
    """`serve`: a device that only serves the fleet's newest model on its own frames, through
    ONNX Runtime without torch (`edge_client.serving_device`); it never trains or sends."""
    serving_files: Path | None = None
    """The folder `fedfmx-edge export-serving` wrote (the model template, the fp32 trunk of a
    pretrained backbone, a closed-form fleet's feature maps), read by a `role: serve` device
    and by a closed-form training device that runs without torch; None: `state_dir/serving`."""

    exit_after_last_round: bool = True
    """Stop once the fleet's last scheduled round is answered (simulations); False keeps the
    device waiting for more rounds."""

    @property
    def serves(self) -> bool:
        """`serve_predictions`, or its default: on for a device's own sources."""
        if self.serve_predictions is not None:
            return self.serve_predictions
        return self.data.source != "fleet_partition"


def _resolve(path: Path | None, base: Path) -> Path | None:
    """`path` read relative to `base` (absolute paths and None stay as they are)."""
    return path if path is None or path.is_absolute() else base / path


def load_device_config(path: Path) -> DeviceConfig:
    """Read and validate a device YAML; every relative path becomes relative to its directory."""
    config = validate_document(DeviceConfig, read_yaml(path, "device config"), str(path))
    base = path.resolve().parent
    broker = config.broker
    broker = broker.model_copy(
        update={
            name: _resolve(getattr(broker, name), base)
            for name in ("password_file", "ca_file", "cert_file", "key_file")
        }
    )
    profile = config.profile
    if profile.endswith((".yaml", ".yml")):
        profile = str(base / profile)
    return config.model_copy(
        update={
            "broker": broker,
            "profile": profile,
            "fleet_file": _resolve(config.fleet_file, base),
            "state_dir": _resolve(config.state_dir, base),
            "fleet_public_key": _resolve(config.fleet_public_key, base),
            "serving_files": _resolve(config.serving_files, base),
            "data": _resolve_source(config.data, base),
            "predictions": config.predictions.model_copy(
                update={"to_label_dir": _resolve(config.predictions.to_label_dir, base)}
            ),
        }
    )


def _resolve_source(
    source: PartitionSource | FolderSourceConfig | CameraSourceConfig, base: Path
) -> PartitionSource | FolderSourceConfig | CameraSourceConfig:
    if isinstance(source, PartitionSource):
        return source.model_copy(update={"path": _resolve(source.path, base)})
    if isinstance(source, FolderSourceConfig):
        return source.model_copy(update={"path": _resolve(source.path, base)})
    labels = source.labels_folder
    url = source.url
    if not ("://" in url or url.isdigit() or url.startswith("/") or url == "picamera2"):
        url = str(base / url)  # a video file next to the YAML
    update: dict[str, object] = {"url": url}
    if labels is not None:
        update["labels_folder"] = labels.model_copy(update={"path": _resolve(labels.path, base)})
    return source.model_copy(update=update)


def save_device_config(config: DeviceConfig, path: Path) -> Path:
    """Write a device YAML (absolute paths, as `provision` and `simulate` produce them)."""
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path
