"""What an exported file says about itself, so a device needs nothing but the file to serve it.

One JSON document (`ExportMetadata`) under the key `fedfmx` in ONNX `metadata_props` and as the
TorchScript extra file `fedfmx.json`: model version, class names in global-id order (row `i` of
the logits is class `class_names[i]`), the input specification, the FedFMX routing settings the
graph was traced with, and the precision of the weights.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from export.checkpoint import Checkpoint, InputSpec
from fedfmx.config import FedFMXConfig, ModelConfig
from fedfmx.errors import DataError

METADATA_KEY = "fedfmx"
TORCHSCRIPT_METADATA_FILE = "fedfmx.json"

Precision = Literal["fp32", "int8-static", "int8-dynamic"]


class ExportMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = 1
    fleet: str
    model_version: int
    class_names: list[str]
    """Index = global class id = logit column."""
    input: InputSpec
    method: str
    model: ModelConfig
    routing: FedFMXConfig
    """AES settings baked into the graph (k_min, k_max, τ, cost)."""
    precision: Precision
    opset: int | None = None
    """ONNX opset of the graph; None for TorchScript."""

    @classmethod
    def of_checkpoint(
        cls, checkpoint: Checkpoint, precision: Precision, opset: int | None
    ) -> ExportMetadata:
        fleet = checkpoint.fleet
        return cls(
            fleet=checkpoint.header.fleet,
            model_version=checkpoint.header.version,
            class_names=list(checkpoint.header.class_names),
            input=checkpoint.input,
            method=fleet.method,
            model=fleet.model,
            routing=fleet.routing,
            precision=precision,
            opset=opset,
        )

    @classmethod
    def parse(cls, raw: str | bytes | None, source: str) -> ExportMetadata:
        """Validate the stored JSON; a file exported by something else is a `DataError`."""
        if not raw:
            raise DataError(f"{source}: no FedFMX metadata; export it with `fedfmx-edge export`")
        try:
            return cls.model_validate_json(raw)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            problem = f"invalid FedFMX metadata at {where}: {first['msg']}"
            raise DataError(f"{source}: {problem}") from None
