"""The closed-form head's fixed feature maps: seeded, never sent, and of the stated form."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fedfmx.closed_form.feature_maps import RandomConvFeatures, RandomReluFeatures
from fedfmx.config import FleetConfig, load_fleet, parse_fleet
from fedfmx.device.learner import DeviceLearner
from fedfmx.errors import ConfigError
from fedfmx.evaluation.benchmark import time_device_rounds
from fedfmx.federation.simulation import load_fleet_dataset, own_partition
from fedfmx.learner.model import build_model

CI_FLEET = Path(__file__).parent.parent / "device_configs" / "fleets" / "ci-digits.yaml"


def ci_fleet(method: str) -> FleetConfig:
    document = load_fleet(CI_FLEET).model_dump()
    document["method"] = method
    document["model"] |= {"random_features": 64, "shared_features": 32, "expert_filters": 4}
    return FleetConfig.model_validate(document)


def test_random_relu_features_follow_their_formula() -> None:
    u = torch.rand(5, 7)
    features = RandomReluFeatures(width=3, seed=11)(u)
    drawn = torch.randn(7, 3, generator=torch.Generator().manual_seed(11)) / 7**0.5
    torch.testing.assert_close(features, torch.relu(u @ drawn))


def test_expert_banks_are_zero_mean_unit_norm_and_blind_to_flat_regions() -> None:
    expert = RandomConvFeatures(kernel=3, filters=6, grid=2, seed=3)
    bank = expert.bank.flatten(1)
    torch.testing.assert_close(bank.sum(dim=1), torch.zeros(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(6))
    # a zero-mean filter answers 0 inside a constant image: only the zero-padded border responds
    flat = torch.ones(1, 1, 10, 10)
    maps = torch.relu(torch.nn.functional.conv2d(flat, expert.bank, padding=1))
    assert float(maps[..., 1:-1, 1:-1].abs().max()) < 1e-6
    assert expert(flat).shape == (1, 6 * 2 * 2) == (1, expert.width)


def test_every_party_builds_the_same_features_and_none_of_them_travel() -> None:
    fleet = ci_fleet("fedfmx_cf")
    x = torch.rand(4, 1, 8, 8)
    first = build_model(fleet.network, fleet.routing, 0, fleet.seed)
    second = build_model(fleet.network, fleet.routing, 0, fleet.seed)
    torch.testing.assert_close(first.closed_form_features(x), second.closed_form_features(x))
    assert first.closed_form_features(x).shape == (4, 32 + 3 * 4 * 16)
    assert first.head.weight.shape == (0, 32 + 3 * 4 * 16)
    names = set(first.state_dict())
    assert not any("projection" in n or "bank" in n for n in names)
    ablated = build_model(ci_fleet("fedfmx_cf_no_experts").network, fleet.routing, 0, fleet.seed)
    assert ablated.closed_form_features(x).shape == (4, 32)


def test_closed_form_devices_keep_no_exemplar() -> None:
    fleet = ci_fleet("fedfmx_cf")
    samples, stream = own_partition(fleet, load_fleet_dataset(fleet), 0)
    device = DeviceLearner("device-000", fleet, samples, stream, seed=0)
    rounds = time_device_rounds(device, fleet, 6)  # into the third task
    assert any(r["uplink_bytes"] for r in rounds)
    assert len(device.exemplars.arrays()[0]) == 0
    assert len(device.state.contributed) == len(np.unique(device.state.contributed))


def test_ridge_on_pixels_without_random_features_is_a_config_error() -> None:
    document = load_fleet(CI_FLEET).model_dump()
    document["method"] = "ridge"
    document["model"]["random_features"] = 0
    with pytest.raises(ConfigError, match="random_features > 0"):
        parse_fleet(document)
