"""Expert taps: what the frozen EfficientNet-Lite0 trunk computes but its global pool discards.

The pooled 1,280-d vector is all a plain ridge head on the trunk sees. Closed-form FedFMX gives
its experts other views of the *same* frozen pass: a tap is one named trunk output (a stage's
output map, or the final 1,280-channel map before pooling) average-pooled to a `g×g` grid and
flattened, `t(x) = vec(pool_{g×g}(A_s(x)))` with `A_s` the map of output `s`. Nothing is
trained, so the taps are fixed functions of the image: the summed statistics stay exact for any
split and task order (`fedfmx.closed_form.head`).

Every candidate tap is computed in one trunk pass and laid out in one vector in `TAPS` order,
`[pool; head@2; block15@2; …]`, whose first `TRUNK_FEATURES` columns are the global pool: a
consumer that wants the pooled features only (ridge, the SGD methods) reads that prefix, so one
cache entry serves every method.

Named trunk outputs a non-torch device (ONNX Runtime) must expose to compute the taps: `head`
(the map after `_conv_head`, `_bn1` and ReLU6, [B, 1280, h, w]) and the outputs of the blocks
named in `TAPS` (`_blocks.<i>`, after block i). Pooling is plain `adaptive_avg_pool2d` (for a
grid that divides the map: the mean of each cell), easy to repeat in numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedfmx.trunk.spec import TRUNK_FEATURES

if TYPE_CHECKING:
    import torch
    from efficientnet_lite_pytorch import EfficientNet


@dataclass(frozen=True)
class Tap:
    """One expert's view of the trunk: output `source` pooled to `grid × grid`."""

    name: str
    source: str
    """`head` or `block<i>` (the output of `_blocks[i]`)."""
    channels: int
    grid: int

    @property
    def width(self) -> int:
        return self.channels * self.grid * self.grid


TAPS: tuple[Tap, ...] = (
    Tap("pool", "head", TRUNK_FEATURES, 1),
    Tap("head2x2", "head", TRUNK_FEATURES, 2),
    Tap("block15_2x2", "block15", 320, 2),
    Tap("block14_2x2", "block14", 192, 2),
    Tap("block10_2x2", "block10", 112, 2),
    Tap("block7_4x4", "block7", 80, 4),
    Tap("block4_4x4", "block4", 40, 4),
    Tap("block2_4x4", "block2", 24, 4),
)
"""Every candidate tap, in the order of the cached vector; stage ends of Lite0 (blocks 2, 4,
7, 10, 14, 15 close the stages at strides 4, 8, 16, 16, 32, 32). `pool` must stay first."""
TAP_WIDTH = sum(tap.width for tap in TAPS)
"""Width of the cached tap vector (11,200 floats, 44 KB a sample in float32)."""
TAPS_BY_NAME = {tap.name: tap for tap in TAPS}


def tap_slice(name: str) -> slice:
    """Where tap `name` lies in the tap vector."""
    start = 0
    for tap in TAPS:
        if tap.name == name:
            return slice(start, start + tap.width)
        start += tap.width
    raise KeyError(f"unknown trunk tap {name!r}; known: {', '.join(TAPS_BY_NAME)}")


def tap_sources(taps: Sequence[str]) -> tuple[str, ...]:
    """The trunk maps `taps` read besides the global pool (which is the trunk's pooled
    output), in trunk order: what an ONNX trunk must output for them (`export.tap_trunk`)."""
    order = {tap.source: i for i, tap in enumerate(reversed(TAPS))}
    wanted = {TAPS_BY_NAME[name].source for name in taps if name != "pool"}
    return tuple(sorted(wanted, key=order.__getitem__))


def taps_id(backbone_id: str) -> str:
    """The feature cache's id for tap vectors: never confused with pooled-only entries."""
    return f"{backbone_id}-taps-v1"


def trunk_outputs(trunk: EfficientNet, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """The trunk's named outputs for normalised inputs: `block<i>` for the blocks `TAPS` reads,
    and `head`; the same pass as `EfficientNet.extract_features` (no drop-connect in eval)."""
    wanted = {tap.source for tap in TAPS}
    outputs: dict[str, torch.Tensor] = {}
    x = trunk._swish(trunk._bn0(trunk._conv_stem(inputs)))
    for index, block in enumerate(trunk._blocks):
        x = block(x)
        if f"block{index}" in wanted:
            outputs[f"block{index}"] = x
    outputs["head"] = trunk._swish(trunk._bn1(trunk._conv_head(x)))
    return outputs


def tap_vector(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Named outputs -> the tap vector [B, TAP_WIDTH], every tap of `TAPS` in order."""
    import torch
    from torch.nn import functional as F

    parts = [F.adaptive_avg_pool2d(outputs[tap.source], tap.grid).flatten(1) for tap in TAPS]
    return torch.cat(parts, dim=1)
