"""ONNX export with the dynamo-based exporter torch 2.13 recommends, and ONNX metadata.

The graph is the whole `FedFMXModel.forward`: backbone, router, AES (sort + scatter, static
shapes) and the head, with a dynamic batch dimension and everything else fixed by the input
spec. Opset 18: the newest that every ONNX Runtime quantization tool and the aarch64 wheels
Raspberry Pi OS gets handle without caveats. One self-contained file: the model is well under
the 2 GB protobuf limit, so nothing goes to an external data file.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from export.metadata import METADATA_KEY, ExportMetadata

if TYPE_CHECKING:  # torch only to export: a serving device quantizes and reads files only
    import torch

    from fedfmx.learner.model import FedFMXModel

OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def export_onnx(
    model: FedFMXModel, metadata: ExportMetadata, out: Path, opset: int = OPSET
) -> Path:
    """Trace `model` with `torch.onnx.export(dynamo=True)` and write one ONNX file to `out`."""
    import torch

    spec = metadata.input
    example = torch.zeros(2, spec.channels, spec.height, spec.width)
    proto = trace_onnx(model.eval(), example, OUTPUT_NAME, opset=opset)
    _strip_provenance(proto.graph)
    write_onnx_metadata(proto, metadata)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(out))
    return out


def trace_onnx(
    module: torch.nn.Module,
    example: torch.Tensor,
    output_name: str | list[str],
    opset: int = OPSET,
    optimize: bool = True,
) -> onnx.ModelProto:
    """`module` traced by the dynamo exporter with a dynamic batch dimension, input
    `INPUT_NAME` (`optimize=False` keeps parameters as initialisers under their names); a
    module returning a tuple names its outputs with a list."""
    import torch

    with _quiet_exporter():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            optimize=optimize,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            input_names=[INPUT_NAME],
            output_names=[output_name] if isinstance(output_name, str) else output_name,
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    if program is None:  # only the legacy exporter returns None
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
    return program.model_proto


def write_onnx_metadata(proto: onnx.ModelProto, metadata: ExportMetadata) -> None:
    """Set (or replace) the FedFMX entry of `metadata_props`, leaving other entries alone."""
    props = {entry.key: entry.value for entry in proto.metadata_props}
    props[METADATA_KEY] = metadata.model_dump_json()
    onnx.helper.set_model_props(proto, props)


def _strip_provenance(graph: onnx.GraphProto) -> None:
    """Drop the exporter's per-node debug annotations (source module, FX node text): a sixth
    of the fp32 file and half of an int8 one, and no runtime reads them."""
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's deprecation chatter and torchvision-missing notices for one call."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)
