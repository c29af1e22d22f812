"""Fixed feature maps for the closed-form head: nothing here is trained or sent.

A closed-form head is exact only on features that never change once their statistics are summed
(`fedfmx.closed_form.head`), so the maps are drawn once from the fleet's seed and every party (each
device, the aggregator's evaluation, an exported model) rebuilds the same ones. They are
non-persistent buffers: they never travel, are never merged and never enter a checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn


class RandomReluFeatures(nn.Module):
    """RanPAC-style random projection: `φ(u) = ReLU(R·u / √n)`, `R ~ N(0, 1)^{D×n}` fixed.

    `n` (the input width) is only known at the first call (raw pixels of any size, or trunk
    features), so `R` is drawn then, from a generator seeded at construction: the same `R` for
    the same seed and width, whichever process draws it.
    """

    def __init__(self, width: int, seed: int) -> None:
        super().__init__()
        self.width = width
        self.seed = seed
        self.projection: torch.Tensor
        self.register_buffer("projection", torch.empty(0), persistent=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if self.projection.shape != (u.shape[1], self.width):
            generator = torch.Generator().manual_seed(self.seed)
            drawn = torch.randn(u.shape[1], self.width, generator=generator) / u.shape[1] ** 0.5
            self.projection = drawn
        return torch.relu(u @ self.projection)


def flat_input(x: torch.Tensor) -> torch.Tensor:
    """Rows of the input as vectors: images [B, C, H, W] -> [B, C·H·W]; vectors unchanged."""
    return x.flatten(1) if x.dim() > 2 else x


class RandomConvFeatures(nn.Module):
    """One closed-form FedFMX expert: a bank of fixed random filters over a receptive field,

        `φ_e(x) = pool_{g×g}(ReLU(K_e ∗ x))`,   `K_e`: `F` filters of `k×k`, zero mean, unit norm,

    flattened to `F·g²` values. A global random projection sees pixels independently of where
    they are; each bank sees local structure at its own scale (its kernel size), which is what
    the experts add to the shared features. Rows that are vectors already (a pretrained trunk's
    features) have no spatial layout: there the expert is a random ReLU projection of the same
    width, with its own seed.
    """

    def __init__(self, kernel: int, filters: int, grid: int, seed: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.grid = grid
        generator = torch.Generator().manual_seed(seed)
        bank = torch.randn(filters, 1, kernel, kernel, generator=generator)
        bank = bank - bank.mean(dim=(2, 3), keepdim=True)
        self.bank: torch.Tensor
        self.register_buffer(
            "bank", bank / bank.flatten(1).norm(dim=1).view(-1, 1, 1, 1), persistent=False
        )
        self.vector = RandomReluFeatures(filters * grid * grid, seed)

    @property
    def width(self) -> int:
        return self.vector.width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self.vector(x)
        channels = x.shape[1]
        bank = self.bank.expand(-1, channels, -1, -1) / channels**0.5
        maps = torch.relu(nn.functional.conv2d(x, bank, padding=self.kernel // 2))
        return nn.functional.adaptive_avg_pool2d(maps, self.grid).flatten(1)


class TapFeatures(nn.Module):
    """One closed-form FedFMX expert on a frozen trunk: a random ReLU projection of one tap,

        `φ_t(x) = ReLU(R_t · t(x) / ‖t(x)‖)`,   `R_t ~ N(0, 1)^{D×n_t}` fixed,

    with `t(x)` the tap's slice of the trunk's tap vector (`fedfmx.trunk.taps`). Each tap is
    scaled to unit norm per sample first, so every block enters the one ridge solve at the same
    scale (pre-activations ~ N(0, 1)) whatever its stage's magnitude: one `λ` then regularises
    all blocks alike. A per-sample scaling is a fixed function of the image, so the head stays
    exact.
    """

    def __init__(self, tap: str, width: int, seed: int) -> None:
        super().__init__()
        from fedfmx.trunk.taps import tap_slice

        self.tap = tap
        self.columns = tap_slice(tap)
        self.vector = RandomReluFeatures(width, seed)

    @property
    def width(self) -> int:
        return self.vector.width

    def forward(self, taps: torch.Tensor) -> torch.Tensor:
        u = taps[:, self.columns]
        n = u.shape[1]
        scaled = u * (n**0.5 / u.norm(dim=1, keepdim=True).clamp_min(1e-12))
        return self.vector(scaled)
