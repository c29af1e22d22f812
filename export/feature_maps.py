"""A closed-form fleet's fixed feature maps as a file, and `φ` computed from it in numpy.

The random projection and the expert banks of `fedfmx.closed_form.feature_maps` are drawn from
torch's generator and never travel in a model version (they are non-persistent buffers), so a device
without torch cannot redraw them. `fedfmx-edge export-serving` (where torch is) writes them once
per fleet into `feature-maps.safetensors`, under their buffer names, with the network's
parameter shapes (what `check_model_tensors` checks a version against) in its metadata. It
writes the file only if the numpy computation below reproduces the torch features on random
rows (max |Δ| ≤ `AGREEMENT` relative to their scale); a network whose features it cannot
reproduce gets no file, and its devices train with torch.

`closed_form_features` mirrors `FedFMXModel.closed_form_features`, for rows that are a trunk's
pooled features [N, 1280] (the trunk itself runs in ONNX Runtime) or raw images [N, C, H, W]:

    φ = [ReLU(u·R_0); φ_1; …; φ_E],   φ_e = pool_{g×g}(ReLU(K_e ∗ Σ_c x_c / √C))  (images)
                                      φ_e = ReLU(u·R_e)                            (vectors)

(`K_e` is the same filter over every channel, so the convolution of the channel sum is exact.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from fedfmx.config import FleetConfig
from fedfmx.errors import ConfigError, DataError
from fedfmx.trunk.spec import FEATURES_NAME, TRUNK_FEATURES
from fedfmx.trunk.taps import TAPS_BY_NAME

FEATURE_MAPS_FILE = "feature-maps.safetensors"
PROJECTION = "random_features.projection"
EXPERTS_PREFIX = "feature_experts."
AGREEMENT = 1e-4
"""Largest |φ_numpy − φ_torch| allowed at export, relative to max |φ_torch|."""
CHECK_ROWS = 8


@dataclass(frozen=True)
class ExpertBank:
    """One closed-form expert: its filters [F, 1, k, k] and pooling grid, or (trunk features)
    its vector projection [n, D] (a tap's expert has no filters: `bank` is empty)."""

    bank: np.ndarray
    grid: int
    projection: np.ndarray | None


@dataclass(frozen=True)
class FixedMaps:
    """What `closed_form_features` needs, read from a `FEATURE_MAPS_FILE`."""

    pretrained: bool
    """Rows are a frozen trunk's features (else raw images)."""
    projection: np.ndarray | None
    """`R_0` [n, D]; None: the head reads the rows themselves."""
    experts: tuple[ExpertBank, ...]
    parameters: dict[str, tuple[int, ...]]
    """The network's parameter shapes (a version's tensors are checked against them)."""
    taps: tuple[str, ...] = ()
    """Closed-form FedFMX on the trunk: the tap each expert reads (`fedfmx.trunk.taps`); the
    rows are then those taps' vectors side by side (`tap_rows`)."""

    @property
    def width(self) -> int:
        """`d`: the head's input width."""
        return int(self.parameters["head.weight"][1])


def closed_form_features(maps: FixedMaps, rows: np.ndarray) -> np.ndarray:
    """`φ` [N, d] float32 of `rows`: trunk features [N, 1280], images [N, C, H, W], or (maps
    with `taps`) the taps' vectors [N, Σ n_t]."""
    x = np.asarray(rows, dtype=np.float32)
    if maps.taps:
        return _tap_features(maps, x)
    u = x.reshape(len(x), -1)
    shared = u if maps.projection is None else np.maximum(u @ maps.projection, 0)
    parts = [shared]
    for expert in maps.experts:
        if x.ndim == 2:
            assert expert.projection is not None  # the file is checked when read
            parts.append(np.maximum(x @ expert.projection, 0))
        else:
            parts.append(_bank_features(expert, x))
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


def _tap_features(maps: FixedMaps, rows: np.ndarray) -> np.ndarray:
    """`[φ_t]` over the maps' taps, `φ_t = ReLU(R_t · t / ‖t‖ · √n_t)` with the √n_t of
    `RandomReluFeatures`' `R/√n` folded back (`fedfmx.closed_form.feature_maps.TapFeatures`)."""
    widths = [TAPS_BY_NAME[name].width for name in maps.taps]
    if sum(widths) != rows.shape[1]:
        raise ValueError(f"tap rows are {rows.shape[1]} wide, the maps' taps {sum(widths)}")
    parts, start = [], 0
    for n, expert in zip(widths, maps.experts, strict=True):
        assert expert.projection is not None  # the file is checked when read
        u = rows[:, start : start + n]
        start += n
        norm = np.maximum(np.linalg.norm(u, axis=1, keepdims=True), np.float32(1e-12))
        parts.append(np.maximum((u * (np.float32(n**0.5) / norm)) @ expert.projection, 0))
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


def _bank_features(expert: ExpertBank, x: np.ndarray) -> np.ndarray:
    """`pool_{g×g}(ReLU(K ∗ Σ_c x_c / √C))` flattened [N, F·g²], as torch's conv2d (zero
    padding k//2, cross-correlation) and adaptive_avg_pool2d (bins ⌊iH/g⌋…⌈(i+1)H/g⌉)."""
    filters = expert.bank[:, 0]
    kernel = filters.shape[-1]
    pad = kernel // 2
    summed = x.sum(axis=1) / np.float32(x.shape[1] ** 0.5)
    padded = np.pad(summed, ((0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kernel, kernel), axis=(1, 2))
    maps = np.maximum(np.einsum("nhwij,fij->nfhw", windows, filters, optimize=True), 0)
    return adaptive_avg_pool(maps, expert.grid).reshape(len(x), -1)


def adaptive_avg_pool(maps: np.ndarray, grid: int) -> np.ndarray:
    """`maps` [N, C, H, W] -> [N, C, g, g], the mean of each cell, as torch's
    adaptive_avg_pool2d (cell i spans ⌊iH/g⌋…⌈(i+1)H/g⌉)."""
    height, width = maps.shape[2:]
    pooled = np.empty((*maps.shape[:2], grid, grid), np.float32)
    for i in range(grid):
        top, bottom = (i * height) // grid, -((-(i + 1) * height) // grid)
        for j in range(grid):
            left, right = (j * width) // grid, -((-(j + 1) * width) // grid)
            pooled[:, :, i, j] = maps[:, :, top:bottom, left:right].mean(axis=(2, 3))
    return pooled


def tap_rows(outputs: Mapping[str, np.ndarray], taps: Sequence[str]) -> np.ndarray:
    """The vectors of `taps` side by side [N, Σ n_t], from a tap trunk's named outputs
    (`export.tap_trunk`): `t = vec(pool_{g×g}(A_s))` as `fedfmx.trunk.taps.tap_vector`
    computes it, the pool tap being the trunk's pooled output itself."""
    parts = []
    for name in taps:
        tap = TAPS_BY_NAME[name]
        if name == "pool":
            parts.append(np.asarray(outputs[FEATURES_NAME], np.float32))
        else:
            maps = np.asarray(outputs[tap.source], np.float32)
            parts.append(adaptive_avg_pool(maps, tap.grid).reshape(len(maps), -1))
    return np.concatenate(parts, axis=1)


def load_feature_maps(path: Path) -> FixedMaps:
    """The fixed maps `export-serving` wrote (`FEATURE_MAPS_FILE`); ConfigError (one line)
    when there are none, or when the file holds maps this module cannot compute."""
    if not path.is_file():
        raise ConfigError(
            f"{path}: no closed-form feature maps; write them with `fedfmx-edge export-serving`"
        )
    try:
        arrays = load_file(path)
        with safe_open(path, "np") as stored:
            metadata = stored.metadata() or {}
        layout = json.loads(metadata["layout"])
        parameters = {name: tuple(shape) for name, shape in layout["parameters"].items()}
        grids = [int(g) for g in layout["grids"]]
        taps = tuple(str(t) for t in layout.get("taps", []))
        pretrained = bool(layout["pretrained"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path}: unreadable feature maps ({error})") from None
    unknown = [t for t in taps if t not in TAPS_BY_NAME]
    if unknown or (taps and (grids or not pretrained)):
        raise ConfigError(f"{path}: trunk taps {unknown or list(taps)} this module cannot read")
    experts = []
    for index in range(len(taps) or len(grids)):
        prefix = f"{EXPERTS_PREFIX}{index}."
        bank = arrays.pop(prefix + "bank", None)
        vector = arrays.pop(prefix + "vector.projection", None)
        if (bank is None and not taps) or (pretrained and vector is None):
            raise ConfigError(f"{path}: expert {index} lacks its bank or projection")
        if taps and vector is not None and len(vector) != TAPS_BY_NAME[taps[index]].width:
            raise ConfigError(f"{path}: expert {index}'s projection does not fit its tap")
        grid = 0 if taps else grids[index]
        experts.append(ExpertBank(np.zeros(0) if bank is None else bank, grid, vector))
    projection = arrays.pop(PROJECTION, None)
    if arrays:
        raise ConfigError(f"{path}: feature maps {sorted(arrays)[:3]} need torch to compute")
    return FixedMaps(pretrained, projection, tuple(experts), parameters, taps)


def export_feature_maps(fleet: FleetConfig, out: Path, trunk: Path | None = None) -> Path | None:
    """Write `fleet`'s fixed maps to `out` (torch), or None when numpy cannot reproduce its
    features (module docstring): its devices then train with torch.

    A fleet whose experts read trunk taps is checked end to end, on images: numpy `φ` of the
    fp32 tap trunk's outputs (`trunk`, `export.tap_trunk`) against the torch network's `φ`."""
    import torch

    from export.checkpoint import InputSpec
    from fedfmx.learner.model import build_model

    network = build_model(fleet.network, fleet.routing, 1, fleet.seed)
    pretrained = fleet.model.backbone == "efficientnet_lite0"
    spec = InputSpec.of_fleet(fleet)
    shape: tuple[int, ...] = (CHECK_ROWS, TRUNK_FEATURES)
    if not pretrained or network.uses_taps:
        shape = (CHECK_ROWS, spec.channels, spec.height, spec.width)
    rows = torch.rand(shape, generator=torch.Generator().manual_seed(fleet.seed))
    with torch.no_grad():  # drawing the lazily sized projections, and the reference φ
        reference = network.closed_form_features(rows).numpy()
    arrays = {
        name: np.ascontiguousarray(buffer.numpy())
        for name, buffer in network.named_buffers()
        if buffer.numel() and (name == PROJECTION or name.startswith(EXPERTS_PREFIX))
    }
    experts = list(network.feature_experts)
    layout = {
        "pretrained": pretrained,
        "grids": [] if network.uses_taps else [expert.grid for expert in experts],
        "taps": [str(expert.tap) for expert in experts] if network.uses_taps else [],
        "parameters": {n: list(v.shape) for n, v in network.state_dict().items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".tmp")
    save_file(arrays, partial, metadata={"layout": json.dumps(layout)})
    try:
        maps = load_feature_maps(partial)
        computed = closed_form_features(maps, _check_rows(maps, rows.numpy(), fleet, trunk))
    except (ConfigError, DataError, ValueError):
        partial.unlink()
        return None
    scale = float(np.abs(reference).max()) or 1.0
    if computed.shape != reference.shape or np.abs(computed - reference).max() > AGREEMENT * scale:
        partial.unlink()
        return None
    partial.replace(out)
    return out


def _check_rows(
    maps: FixedMaps, rows: np.ndarray, fleet: FleetConfig, trunk: Path | None
) -> np.ndarray:
    """What a device feeds `closed_form_features` for the check's `rows`: the images' tap
    vectors through the fp32 tap `trunk` (ConfigError without one), else the rows."""
    if not maps.taps:
        return rows
    if trunk is None:
        raise ConfigError("closed-form FedFMX on trunk taps is checked through its tap trunk")
    from export.trunk_runtime import TrunkRuntime

    return TrunkRuntime.load(trunk, fleet.model.trunk_input_size, taps=maps.taps).features(rows)
