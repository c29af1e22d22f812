"""A fleet's model as an ONNX *template*: exported once with torch, filled with each version's
weights without it (issue 16: a serving-only device imports no torch).

The graph is traced unoptimised (`optimize=False`), so every parameter stays an initialiser
under its `state_dict` name; filling a version is replacing those initialisers by name, which is
exact (the same float32 numbers in the same graph). The head's row count is the only shape that
changes between versions, so the logits' class dimension is left symbolic.

With a frozen pretrained trunk the template is the trained part only (trunk features in, logits
out): the trunk is its own int8 file (`export.trunk`) that never changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from export.checkpoint import Checkpoint
from export.metadata import ExportMetadata
from export.onnx_model import OPSET, OUTPUT_NAME, trace_onnx, write_onnx_metadata
from fedfmx.errors import ConfigError, DataError, ProtocolError
from fedfmx.federation.aggregation import HEAD_WEIGHT, Arrays
from fedfmx.trunk.spec import TRUNK_FEATURES

PARAMETERS_KEY = "fedfmx.template_parameters"
"""ONNX metadata entry: JSON object, parameter name -> shape, of the traced model."""


def export_template(checkpoint: Checkpoint, out: Path) -> Path:
    """Trace `checkpoint`'s model (torch) into a template at `out`."""
    import torch

    model = checkpoint.build()
    if model.uses_taps:
        raise ConfigError(
            "fedfmx_cf on the trunk reads its intermediate taps (fedfmx.trunk.taps), which the "
            "serving trunk does not output yet: serve it with torch"
        )
    spec = checkpoint.input
    pretrained = checkpoint.fleet.model.backbone == "efficientnet_lite0"
    example = (
        torch.zeros(2, TRUNK_FEATURES)
        if pretrained
        else torch.zeros(2, spec.channels, spec.height, spec.width)
    )
    # a closed-form head draws its projections at the first call: then traced as constants
    with torch.no_grad():
        model(example)
    proto = trace_onnx(model, example, OUTPUT_NAME, optimize=False)
    shapes = {name: list(value.shape) for name, value in model.state_dict().items()}
    props = {PARAMETERS_KEY: json.dumps(shapes)}
    onnx.helper.set_model_props(proto, props)
    write_onnx_metadata(proto, ExportMetadata.of_checkpoint(checkpoint, "fp32", OPSET))
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(out))
    return out


def template_parameters(template: onnx.ModelProto, source: str) -> dict[str, list[int]]:
    raw = {entry.key: entry.value for entry in template.metadata_props}.get(PARAMETERS_KEY)
    if raw is None:
        raise DataError(
            f"{source}: not a FedFMX template; write one with `fedfmx-edge export-serving`"
        )
    shapes: dict[str, list[int]] = json.loads(raw)
    return shapes


def fill_template(
    template: onnx.ModelProto, weights: Arrays, metadata: ExportMetadata, source: str
) -> onnx.ModelProto:
    """A copy of `template` computing the model with `weights` (ProtocolError if they do not
    fit it: a missing or extra parameter, or any shape but the head's row count)."""
    expected = template_parameters(template, source)
    given = {name: weights[name] for name in expected if name in weights}
    missing = sorted(set(expected) - set(given))
    if missing:
        raise ProtocolError(f"model lacks template parameters {missing[:3]}")
    for name, value in given.items():
        shape = list(value.shape)
        if name == HEAD_WEIGHT:
            shape[0] = expected[name][0]
        if shape != expected[name]:
            raise ProtocolError(f"{name} has shape {list(value.shape)}, template {expected[name]}")
    filled = onnx.ModelProto()
    filled.CopyFrom(template)
    for init in filled.graph.initializer:
        if init.name in given:
            value = np.ascontiguousarray(given[init.name], dtype=np.float32)
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    del filled.graph.value_info[:]  # shapes traced with the template's class count
    filled.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "classes"
    write_onnx_metadata(filled, metadata)
    return filled
