"""Fisher estimation and FRES against hand-computed values."""

import math

import torch
from torch.nn import functional as F

from fedfmx.config import FedFMXConfig, ModelConfig
from fedfmx.learner.fisher import (
    accumulate_fisher,
    diagonal_fisher,
    expert_parameter_names,
    fres_scores,
    new_class_gradients,
    select_trained_experts,
)
from fedfmx.learner.model import build_model


def test_fres_scores_hand_computed() -> None:
    gradients = {0: [torch.tensor([1.0, 2.0])], 1: [torch.tensor([3.0])]}
    fisher = {0: [torch.tensor([0.5, 0.0])], 1: [torch.tensor([2.0])]}
    scores = fres_scores(gradients, fisher, eta=0.1, lam=1.0)
    # P_0 = 0.1·(1+4) = 0.5; S_0 = (0.01/2)·(0.5·1) = 0.0025
    # P_1 = 0.1·9 = 0.9;     S_1 = (0.01/2)·(2·9) = 0.09
    assert torch.allclose(scores.plasticity, torch.tensor([0.5, 0.9]))
    assert torch.allclose(scores.stability, torch.tensor([0.0025, 0.09]))
    assert torch.allclose(scores.utility, torch.tensor([0.4975, 0.81]))
    heavy = fres_scores(gradients, fisher, eta=0.1, lam=20.0)
    assert heavy.utility[1] < 0 < heavy.utility[0]  # a high Fisher cost vetoes expert 1


def test_select_trained_experts_takes_best_positive_within_budget() -> None:
    utility = torch.tensor([0.5, -1.0, 0.8, 0.2])
    assert select_trained_experts(utility, budget=2) == [0, 2]
    assert select_trained_experts(utility, budget=8) == [0, 2, 3]
    assert select_trained_experts(torch.tensor([-0.1, -0.2]), budget=2) == []


def test_accumulate_fisher_is_online_ewc() -> None:
    old = {"a": torch.tensor([2.0]), "c": torch.tensor([4.0])}
    new = {"a": torch.tensor([1.0]), "b": torch.tensor([3.0])}
    merged = accumulate_fisher(old, new, decay=0.5)
    assert merged["a"].item() == 2.0  # 0.5·2 + 1
    assert merged["b"].item() == 3.0
    assert merged["c"].item() == 2.0  # 0.5·4 + 0


def _tiny_model() -> torch.nn.Module:
    model = build_model(
        ModelConfig(backbone_channels=[4], feature_dim=8, num_experts=2, expert_hidden=4),
        FedFMXConfig(k_max=2),
        3,
        seed=1,
    )
    return model


def test_diagonal_fisher_matches_per_sample_loop() -> None:
    model = _tiny_model()
    x = torch.rand(5, 1, 8, 8)
    names = [n for n, _ in model.named_parameters() if n.startswith(("experts.1.", "router."))]
    fisher = diagonal_fisher(model, x, names, torch.Generator().manual_seed(7), batch_size=2)
    # the same labels, drawn the same way, gradients one sample at a time
    generator = torch.Generator().manual_seed(7)
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n in names}
    params = dict(model.named_parameters())
    for start in range(0, 5, 2):
        batch = x[start : start + 2]
        with torch.no_grad():
            labels = torch.multinomial(
                torch.softmax(model(batch), dim=1), 1, generator=generator
            ).squeeze(1)
        for sample, label in zip(batch, labels, strict=True):
            model.zero_grad()
            F.log_softmax(model(sample.unsqueeze(0)), dim=1)[0, label].backward()
            for n in names:
                grad = params[n].grad
                assert grad is not None
                expected[n] += grad.pow(2)
    for n in names:
        assert torch.allclose(fisher[n], expected[n] / 5, atol=1e-6), n


def test_new_class_gradients_cover_every_expert() -> None:
    model = _tiny_model()
    names = expert_parameter_names(model)
    grads = new_class_gradients(
        model, torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2]), names
    )
    assert sorted(grads) == [0, 1]
    for e in grads:
        assert len(grads[e]) == len(names[e])
        assert math.isfinite(sum(float(g.abs().sum()) for g in grads[e]))
        assert sum(float(g.abs().sum()) for g in grads[e]) > 0  # dense routing: every expert learns
