"""The FedFMX network: backbone, bottleneck experts, linear router and a growing linear head.

The backbone is the small CNN below (`model.backbone: cnn`) or a frozen pretrained trunk with a
trained projection (`efficientnet_lite0`, `fedfmx.trunk.pretrained`).

Output feature (DESIGN §3): `z + Σ_{e∈S(x)} w_e(x)·h_e(z)`, with `S(x)` the AES subset and `w` the
gate probabilities renormalised over it. Routing is compute-and-mask (every expert runs on every
row, unselected ones get weight 0): with a handful of small experts that costs little and keeps
the graph static, so it exports to ONNX and TorchScript unchanged.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedfmx.closed_form.feature_maps import (
    RandomConvFeatures,
    RandomReluFeatures,
    TapFeatures,
    flat_input,
)
from fedfmx.closed_form.head import CLOSED_FORM_PREFIX
from fedfmx.config import FedFMXConfig, ModelConfig
from fedfmx.learner.routing import aes_mask
from fedfmx.trunk.pretrained import TRUNK_FEATURES, PretrainedBackbone
from fedfmx.trunk.taps import TAP_WIDTH


class Backbone(nn.Module):
    """Small CNN (conv-GroupNorm-ReLU-pool blocks, then a linear projection) sized for a Pi.

    GroupNorm rather than BatchNorm: its statistics are per sample, so non-IID devices do not
    drag shared running means apart, and nothing changes between training and inference.
    """

    def __init__(self, channels: list[int], feature_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 1
        for width in channels:
            layers += [
                nn.Conv2d(previous, width, 3, padding=1),
                nn.GroupNorm(min(8, width), width),
                nn.ReLU(),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            previous = width
        self.conv = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.proj = nn.Linear(previous * 4, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.flatten(self.pool(self.conv(x)), 1))


class Expert(nn.Module):
    """Bottleneck adapter `h_e(z) = W2·relu(W1·z + b1) + b2`."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        with torch.no_grad():  # start close to the identity block so old features survive
            self.fc2.weight.mul_(0.1)
            self.fc2.bias.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(z)))


class LinearHead(nn.Module):
    """One row per class seen so far, no bias: `logits = W·z`; it grows a row per new class.

    A bias-free linear head keeps each class fully described by its row, which is what the
    per-class merge averages. (A cosine head failed to train the from-scratch backbone in the
    few steps a device takes per round: the features of an untrained CNN barely differ in
    direction.)
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * dim**-0.5)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight.t()


@dataclass
class Routing:
    """What the MoE block decided for a batch (the Mixtral-style second output)."""

    logits: torch.Tensor
    """Router logits [B, E] (before any FRES bias): input of the z-loss."""
    probs: torch.Tensor
    """Gate probabilities [B, E] used for selection and weighting."""
    mask: torch.Tensor
    """Selected subset S(x) [B, E] as 0/1 floats."""
    weights: torch.Tensor
    """Gate probabilities renormalised over S(x) [B, E]; zero outside it."""

    def usage(self) -> torch.Tensor:
        """Rows routed to each expert [E]."""
        return self.mask.sum(dim=0)


class FedFMXModel(nn.Module):
    """Backbone → MoE of adapters → linear head over the classes registered so far.

    With `model.head == "closed_form"` the head reads fixed features instead
    (`closed_form_features`): the raw input, or a frozen trunk's pooled features, through the
    random ReLU projection of `fedfmx.closed_form.feature_maps`; its rows are solved by the
    aggregator.
    """

    def __init__(self, model: ModelConfig, routing: FedFMXConfig, num_classes: int) -> None:
        super().__init__()
        pretrained = model.backbone == "efficientnet_lite0"
        self.backbone: Backbone | PretrainedBackbone = (
            PretrainedBackbone(model.feature_dim, model.trunk_input_size)
            if pretrained
            else Backbone(model.backbone_channels, model.feature_dim)
        )
        self.experts = nn.ModuleList(
            Expert(model.feature_dim, model.expert_hidden) for _ in range(model.num_experts)
        )
        self.router = nn.Linear(model.feature_dim, model.num_experts)
        self.random_features: RandomReluFeatures | None = None
        self.feature_experts = nn.ModuleList()
        """Closed-form FedFMX: the expert banks whose features join `φ_0` (none otherwise)."""
        head_dim = model.feature_dim
        if model.head == "closed_form":
            head_dim = model.random_features or _input_width(model)
            if model.random_features:
                self.random_features = RandomReluFeatures(model.random_features, _draw_seed())
        self.uses_taps = model.head == "closed_form_experts" and pretrained
        """Closed-form FedFMX on the trunk: `φ_0` and the experts read the tap vector."""
        if self.uses_taps:
            shared = TapFeatures("pool", model.trunk_shared_features, _draw_seed())
            taps = [TapFeatures(t, model.tap_features, _draw_seed()) for t in model.expert_taps]
            self.feature_experts = nn.ModuleList([shared, *taps])
            head_dim = shared.width + sum(tap.width for tap in taps)
        elif model.head == "closed_form_experts":
            self.random_features = RandomReluFeatures(model.shared_features, _draw_seed())
            banks = [
                RandomConvFeatures(k, model.expert_filters, model.expert_grid, _draw_seed())
                for k in model.expert_kernels
            ]
            self.feature_experts = nn.ModuleList(banks)
            head_dim = model.shared_features + sum(bank.width for bank in banks)
        self.closed_form = model.head != "sgd"
        self.head = LinearHead(num_classes, head_dim)
        self.aes = routing
        self.head_generator = torch.Generator()
        """Draws the rows `grow_head` adds (`build_model` seeds it)."""

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def route(
        self, z: torch.Tensor, bias: torch.Tensor | None = None, dense: bool = False
    ) -> Routing:
        """Gate, select with AES (or all experts when `dense`), and renormalise over the subset."""
        logits = self.router(z)
        probs = torch.softmax(logits if bias is None else logits + bias, dim=1)
        if dense:
            mask = torch.ones_like(probs)
        else:
            mask = aes_mask(
                probs, self.aes.aes_tau, self.aes.aes_cost, self.aes.k_min, self.aes.k_max
            )
        weighted = probs * mask
        weights = weighted / weighted.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return Routing(logits=logits, probs=probs, mask=mask, weights=weights)

    def mix(self, z: torch.Tensor, routing: Routing) -> torch.Tensor:
        """`z + Σ_e w_e·h_e(z)`: every expert runs, unselected ones are weighted by zero."""
        outputs = torch.stack([expert(z) for expert in self.experts], dim=1)  # [B, E, d]
        return z + (routing.weights.unsqueeze(-1) * outputs).sum(dim=1)

    def closed_form_features(self, x: torch.Tensor) -> torch.Tensor:
        """The closed-form head's input `φ(x)`: the frozen trunk's features (or the flattened
        input without a pretrained trunk), then the random projection if there is one, then
        (closed-form FedFMX) each expert bank's features of the input: `[φ_0; φ_1; …; φ_E]`.

        Closed-form FedFMX on the trunk reads the tap vector (`fedfmx.trunk.taps`; images, or
        cached tap vectors): `φ_0` projects its pooled tap, each expert one other tap. Rows
        given as vectors may be pooled features or tap vectors (the pool is their prefix)."""
        if self.uses_taps:
            assert isinstance(self.backbone, PretrainedBackbone)
            taps = x if x.dim() == 2 else self.backbone.trunk_taps(x)
            if taps.shape[1] != TAP_WIDTH:
                raise ValueError(
                    f"closed-form FedFMX on the trunk needs tap vectors ({TAP_WIDTH} wide), "
                    f"got rows of {taps.shape[1]}"
                )
            return torch.cat([expert(taps) for expert in self.feature_experts], dim=1)
        if isinstance(self.backbone, PretrainedBackbone):
            source = x[:, :TRUNK_FEATURES] if x.dim() == 2 else self.backbone.trunk_features(x)
            u = source
        else:
            source, u = x, flat_input(x)
        shared = u if self.random_features is None else self.random_features(u)
        if not len(self.feature_experts):
            return shared
        return torch.cat([shared, *(expert(source) for expert in self.feature_experts)], dim=1)

    def forward_routed(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, dense: bool = False
    ) -> tuple[torch.Tensor, Routing]:
        if self.closed_form:
            logits = self.head(self.closed_form_features(x))
            idle = torch.zeros(len(x), self.num_experts)
            return logits, Routing(logits=idle, probs=idle, mask=idle, weights=idle)
        z = self.backbone(x)
        routing = self.route(z, bias, dense)
        return self.head(self.mix(z, routing)), routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_routed(x)[0]

    def grow_head(self, num_classes: int) -> None:
        """Append freshly initialised rows until the head has `num_classes` rows."""
        missing = num_classes - self.head.weight.shape[0]
        if missing <= 0:
            return
        dim = self.head.weight.shape[1]
        extra = torch.randn(missing, dim, generator=self.head_generator) * dim**-0.5
        self.head.weight = nn.Parameter(torch.cat([self.head.weight.detach(), extra]))


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters as float32 numpy arrays: the form the aggregator and codec use."""
    return {
        name: tensor.detach().cpu().numpy().astype(np.float32)
        for name, tensor in model.state_dict().items()
    }


def load_numpy_state(model: FedFMXModel, state: dict[str, np.ndarray]) -> None:
    """Load a numpy state, growing the head to the state's number of classes first (the
    closed-form statistics beside the weights are not the network's, and stay out)."""
    model.grow_head(state["head.weight"].shape[0])
    model.load_state_dict(
        {
            name: torch.from_numpy(np.asarray(value, dtype=np.float32))
            for name, value in state.items()
            if not name.startswith(CLOSED_FORM_PREFIX)
        }
    )


def _draw_seed() -> int:
    """A seed for a fixed feature map, from torch's generator (`build_model` seeds it)."""
    return int(torch.randint(2**31 - 1, (1,)).item())


def _input_width(model: ModelConfig) -> int:
    """Width of the closed-form head's input without a random projection."""
    if model.backbone != "efficientnet_lite0":
        raise ValueError("a closed-form head on raw pixels needs model.random_features > 0")
    return TRUNK_FEATURES


_BUILDING = threading.Lock()


def build_model(
    model: ModelConfig, routing: FedFMXConfig, num_classes: int, seed: int
) -> FedFMXModel:
    """A freshly initialised model; the seed makes every party build the same initial weights.

    torch's layers initialise from its process-wide generator, so building holds a lock, and
    the model's head generator takes over where the seed's stream left off: the rows grown
    later are the same whether or not other learners in the process (threads) use torch
    meanwhile.
    """
    with _BUILDING:
        torch.manual_seed(seed)
        network = FedFMXModel(model, routing, num_classes)
        network.head_generator.set_state(torch.get_rng_state())
    return network
