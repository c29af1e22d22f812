"""The MoE model: routing weights, the mixed feature, head growth."""

import numpy as np
import torch

from fedfmx.config import FedFMXConfig, ModelConfig
from fedfmx.learner.model import build_model, load_numpy_state, state_to_numpy

CONFIG = ModelConfig(backbone_channels=[4, 8], feature_dim=8, num_experts=4, expert_hidden=4)


def test_forward_shapes_and_routing_weights() -> None:
    model = build_model(CONFIG, FedFMXConfig(k_max=2), num_classes=3, seed=0)
    logits, routing = model.forward_routed(torch.rand(5, 1, 28, 28))
    assert logits.shape == (5, 3)
    assert torch.allclose(routing.weights.sum(dim=1), torch.ones(5))
    assert bool(((routing.weights > 0) <= (routing.mask > 0)).all())  # weight only inside S(x)
    assert routing.mask.sum(dim=1).max() <= 2


def test_mixed_feature_is_z_plus_weighted_selected_experts() -> None:
    model = build_model(CONFIG, FedFMXConfig(k_max=2), num_classes=3, seed=0)
    z = torch.rand(2, 8)
    routing = model.route(z)
    expected = z.clone()
    for row in range(2):
        for e in range(4):
            if routing.mask[row, e] > 0:
                expected[row] += routing.weights[row, e] * model.experts[e](z[row : row + 1])[0]
    assert torch.allclose(model.mix(z, routing), expected, atol=1e-6)


def test_fres_bias_changes_selection() -> None:
    model = build_model(CONFIG, FedFMXConfig(k_min=1, k_max=1), num_classes=3, seed=0)
    z = torch.rand(6, 8)
    bias = torch.tensor([-50.0, -50.0, -50.0, 50.0])
    assert model.route(z, bias).mask[:, 3].tolist() == [1.0] * 6


def test_grow_head_keeps_old_rows_and_numpy_round_trip() -> None:
    model = build_model(CONFIG, FedFMXConfig(k_max=2), num_classes=2, seed=0)
    old = model.head.weight.detach().clone()
    model.grow_head(5)
    assert model.head.weight.shape == (5, 8)
    assert torch.equal(model.head.weight[:2], old)
    state = state_to_numpy(model)
    fresh = build_model(CONFIG, FedFMXConfig(k_max=2), num_classes=0, seed=3)
    load_numpy_state(fresh, state)
    assert all(np.array_equal(state[k], v) for k, v in state_to_numpy(fresh).items())


def test_same_seed_same_initial_weights() -> None:
    a = state_to_numpy(build_model(CONFIG, FedFMXConfig(k_max=2), 0, seed=4))
    b = state_to_numpy(build_model(CONFIG, FedFMXConfig(k_max=2), 0, seed=4))
    assert all(np.array_equal(a[k], b[k]) for k in a)
