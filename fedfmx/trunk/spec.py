"""What names the frozen pretrained trunk and its features, importable without torch.

A device that only serves (ONNX Runtime, no torch) and the sample store of a device's own
sources need these facts but none of the trunk's code: `fedfmx.trunk.pretrained` builds the trunk
and re-exports them.
"""

from __future__ import annotations

TRUNK_FEATURES = 1280
"""Width of the trunk's pooled features."""
FEATURES_NAME = "features"
"""The pooled features' output name in an ONNX trunk (`export.trunk`, `export.tap_trunk`)."""
INPUT_SIZE = 64
"""Default trunk input side (`model.trunk_input_size`): small images are upsampled to it
(`../shared/datasets/README.md`: 64-96 px for 28-32 px); camera fleets use 128-224."""


def backbone_id(input_size: int = INPUT_SIZE) -> str:
    """Names the trunk *and* its preprocessing: features cached under one id never serve
    another (a trunk at 128 px never reads features computed at 64 px)."""
    return f"efficientnet_lite0-57934424-{input_size}px"


BACKBONE_ID = backbone_id()
