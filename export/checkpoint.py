"""Checkpoints: one safetensors file holding a trained global model and what it needs to run.

Tensors are the model's float32 weights (`fedfmx.learner.model.state_to_numpy` names); the
safetensors metadata header (string to string) carries the fleet configuration, the model header
(version, class names in global-id order) and the input specification as JSON. No pickle anywhere,
so a checkpoint from an untrusted source can be inspected and loaded without running its code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from export.errors import MAX_MODEL_FILE_BYTES, first_line, refuse_oversize
from fedfmx.config import FleetConfig, ImageInputConfig
from fedfmx.data.datasets import ImageDataset
from fedfmx.data.preprocessing import fleet_image_input
from fedfmx.errors import DataError
from fedfmx.wire.messages import ModelHeader

if TYPE_CHECKING:  # torch only to build or read a model: a serving device reads specs only
    from fedfmx.learner.model import FedFMXModel

CHECKPOINT_FORMAT = "fedfmx-checkpoint/1"
PIXEL_MAX = {"fashion_mnist": 255.0, "digits": 16.0}
"""Raw value of a white pixel in each data set's files (the readers divide by it)."""


class InputSpec(BaseModel):
    """What the exported graph expects: float32 `[N, channels, height, width]`, raw / pixel_max.

    `pixel_max` is the value of a white pixel in the integer files the device reads (255 for
    8-bit images, 16 for UCI digits), so predict can normalise an IDX file exactly as training
    did; 8-bit PNGs are always divided by 255.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: int = Field(default=1, ge=1)
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    pixel_max: float = Field(default=255.0, gt=0)
    fit: Literal["stretch", "center_crop"] = "stretch"
    """How a PNG/JPEG of another size is fitted (`fedfmx.data.preprocessing.fit_pixels`)."""

    @classmethod
    def of_dataset(cls, dataset: ImageDataset) -> InputSpec:
        _, channels, height, width = dataset.train_x.shape
        return cls(
            channels=channels,
            height=height,
            width=width,
            pixel_max=PIXEL_MAX.get(dataset.name, 255.0),
        )

    @classmethod
    def of_fleet(cls, fleet: FleetConfig) -> InputSpec:
        """The fleet's input spec (`data.image`, or its data set's shape), no data read."""
        image = fleet_image_input(fleet)
        return cls(
            channels=image.channels,
            height=image.height,
            width=image.width,
            pixel_max=PIXEL_MAX.get(fleet.data.dataset, 255.0),
            fit=image.fit,
        )

    @property
    def image(self) -> ImageInputConfig:
        """The preprocessing's view of this spec."""
        return ImageInputConfig(
            channels=1 if self.channels == 1 else 3,
            height=self.height,
            width=self.width,
            fit=self.fit,
        )


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A global model version as a file: weights, fleet config, class registry, input spec."""

    fleet: FleetConfig
    header: ModelHeader
    input: InputSpec
    weights: dict[str, np.ndarray]

    def build(self) -> FedFMXModel:
        """The torch model in eval mode, routed exactly as the fleet trains it."""
        from fedfmx.learner.model import build_model, load_numpy_state

        model = build_model(
            self.fleet.network, self.fleet.routing, len(self.header.class_names), self.fleet.seed
        )
        load_numpy_state(model, self.weights)
        return model.eval()

    @classmethod
    def of_model(
        cls, model: FedFMXModel, fleet: FleetConfig, header: ModelHeader, spec: InputSpec
    ) -> Checkpoint:
        from fedfmx.learner.model import state_to_numpy

        return cls(fleet=fleet, header=header, input=spec, weights=state_to_numpy(model))


def save_checkpoint(checkpoint: Checkpoint, path: Path) -> None:
    """Write atomically (temp file, then rename), so a crash never leaves half a checkpoint."""
    rows = checkpoint.weights["head.weight"].shape[0]
    if rows != len(checkpoint.header.class_names):
        raise DataError(
            f"head has {rows} rows but the header names {len(checkpoint.header.class_names)} "
            "classes; pass the header of the same model version"
        )
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "fleet_config": checkpoint.fleet.model_dump_json(),
        "model_header": checkpoint.header.model_dump_json(),
        "input": checkpoint.input.model_dump_json(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(
        {name: np.ascontiguousarray(value) for name, value in checkpoint.weights.items()},
        str(partial),
        metadata=metadata,
    )
    partial.replace(path)


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and validate a checkpoint; anything wrong is one `DataError` naming the file."""
    refuse_oversize(path, MAX_MODEL_FILE_BYTES, "a checkpoint")
    try:
        with safe_open(str(path), framework="np") as reader:
            metadata = reader.metadata() or {}
            weights = {name: reader.get_tensor(name) for name in reader.keys()}  # noqa: SIM118
    except FileNotFoundError:
        raise DataError(f"{path}: no such checkpoint") from None
    except (SafetensorError, OSError) as error:
        raise DataError(f"{path}: not a readable safetensors checkpoint ({error})") from None
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: not a FedFMX checkpoint (format {metadata.get('format')!r})")
    try:
        checkpoint = Checkpoint(
            fleet=FleetConfig.model_validate_json(metadata["fleet_config"]),
            header=ModelHeader.model_validate_json(metadata["model_header"]),
            input=InputSpec.model_validate_json(metadata["input"]),
            weights=weights,
        )
    except (KeyError, ValidationError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: checkpoint metadata is invalid ({first_line(error)})") from None
    try:
        checkpoint.build()
    except (KeyError, RuntimeError) as error:
        problem = first_line(error)
        raise DataError(f"{path}: weights do not fit the fleet's model ({problem})") from None
    return checkpoint
