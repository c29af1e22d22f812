"""AES selection and RAR terms against hand-computed values."""

import math

import torch

from fedfmx.learner.routing import (
    aes_mask,
    fres_route_loss,
    fres_route_target,
    load_balance_loss,
    router_z_loss,
)


def test_aes_adds_experts_while_marginal_utility_exceeds_tau() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    # p − cost = 0.45, 0.25, 0.10, 0.00 in rank order; τ = 0.05 keeps the first three.
    mask = aes_mask(probs, tau=0.05, cost=0.05, k_min=1, k_max=4)
    assert mask.tolist() == [[0.0, 1.0, 1.0, 1.0]]


def test_aes_respects_k_max_and_k_min() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.97, 0.01, 0.01, 0.01]])
    capped = aes_mask(probs, tau=0.05, cost=0.05, k_min=1, k_max=2)
    assert capped.tolist() == [[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]
    floored = aes_mask(probs, tau=0.9, cost=0.05, k_min=2, k_max=4)
    assert floored.sum(dim=1).tolist() == [2.0, 2.0]
    assert floored[0].tolist() == [0.0, 1.0, 0.0, 1.0]


def test_subset_size_varies_per_sample() -> None:
    probs = torch.tensor([[0.4, 0.4, 0.1, 0.1], [0.9, 0.04, 0.03, 0.03]])
    sizes = aes_mask(probs, tau=0.1, cost=0.05, k_min=1, k_max=4).sum(dim=1).tolist()
    assert sizes == [2.0, 1.0]


def test_load_balance_is_one_when_uniform_and_grows_with_imbalance() -> None:
    uniform = torch.full((3, 4), 0.25)
    assert math.isclose(
        float(load_balance_loss(uniform, torch.full((4,), 0.25))), 1.0, rel_tol=1e-6
    )
    # p̄ = [0.5, 0.5], f = [0.8, 0.2]: 2·(0.4 + 0.1) = 1.0
    split = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert math.isclose(
        float(load_balance_loss(split, torch.tensor([0.8, 0.2]))), 1.0, rel_tol=1e-6
    )
    # everything on expert 0, which the fleet also overuses: 2·1·1 = 2
    collapsed = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert math.isclose(
        float(load_balance_loss(collapsed, torch.tensor([1.0, 0.0]))), 2.0, rel_tol=1e-6
    )


def test_router_z_loss_hand_value() -> None:
    # logsumexp([0, 0]) = log 2; squared = 0.48045
    assert math.isclose(float(router_z_loss(torch.zeros(1, 2))), math.log(2) ** 2, rel_tol=1e-6)


def test_fres_route_target_normalises_utilities() -> None:
    target = fres_route_target(torch.tensor([2.0, -2.0, 0.0]), temperature=1.0)
    expected = torch.softmax(torch.tensor([1.0, -1.0, 0.0]), dim=0)
    assert torch.allclose(target, expected)
    assert torch.allclose(fres_route_target(torch.zeros(3), 1.0), torch.full((3,), 1 / 3))


def test_fres_route_loss_is_cross_entropy_to_target() -> None:
    probs = torch.tensor([[0.5, 0.5]])
    utility = torch.tensor([1.0, 1.0])  # uniform target: loss = −log 0.5
    assert math.isclose(float(fres_route_loss(probs, utility, 1.0)), math.log(2), rel_tol=1e-6)
