"""The frozen trunk as ONNX with its taps as extra outputs: closed-form FedFMX without torch.

`fedfmx_cf` on the trunk reads, beside the pooled features, stage outputs of the trunk
(`fedfmx.trunk.taps`), which the pooled-only trunk (`export.trunk.export_trunk`) does not give.
This graph is the same single pass with those maps as extra outputs, named by their source
(`block<i>`, `head`), after the pooled `features`; the pooling to each tap's grid, the unit norm
and the projections are numpy on the device (`export.feature_maps`). It is quantized by the
same int8 recipe (`export.trunk.quantize_trunk`).

Each exposed map reaches its graph output through an `Identity` node. The maps are residual
streams, which the recipe's equalisation rescales channel by channel (`export.equalisation`):
exact for the network's own output, whose convolutions undo the scale, but a graph output
would read the rescaled stream. A stream with a reader that is not a convolution is left
alone there, so the exposed maps keep the float network's values (a test checks it).
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

from export.checkpoint import InputSpec
from export.onnx_model import trace_onnx
from export.trunk import export_trunk, save_prepared
from fedfmx.trunk.spec import FEATURES_NAME

STREAM_SUFFIX = ".stream"
"""The name an exposed map keeps inside the graph; the output itself is its `Identity`."""


def export_tap_trunk(spec: InputSpec, input_size: int, sources: tuple[str, ...], out: Path) -> Path:
    """The fp32 trunk `unit images [N, C, H, W] -> (features [N, 1280], maps of sources…)` as
    ONNX (torch), prepared for quantization like `export.trunk.export_trunk`'s, which it is
    when `sources` is empty."""
    if not sources:
        return export_trunk(spec, input_size, out)
    import torch

    from fedfmx.trunk.pretrained import efficientnet_lite0_trunk, imagenet_input
    from fedfmx.trunk.taps import trunk_outputs

    class TrunkTaps(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = efficientnet_lite0_trunk(input_size)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            outputs = trunk_outputs(self.trunk, imagenet_input(x, input_size))
            return (outputs["head"].mean(dim=(2, 3)), *(outputs[s] for s in sources))

    example = torch.zeros(2, spec.channels, spec.height, spec.width)
    proto = trace_onnx(TrunkTaps().eval(), example, [FEATURES_NAME, *sources])
    save_prepared(proto, out)
    model = onnx.load_model(str(out))
    onnx.save_model(expose_through_identity(model, list(sources)), str(out))
    return out


def expose_through_identity(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """`model` with each graph output in `outputs` renamed `<name>.stream` inside the graph and
    given back by an `Identity` of it (module docstring: why)."""
    renamed = {name: name + STREAM_SUFFIX for name in outputs}
    for node in model.graph.node:
        node.output[:] = [renamed.get(name, name) for name in node.output]
        node.input[:] = [renamed.get(name, name) for name in node.input]
    model.graph.node.extend(
        helper.make_node("Identity", [inner], [name], name=f"expose_{name}")
        for name, inner in renamed.items()
    )
    return model
