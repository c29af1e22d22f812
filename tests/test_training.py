"""The local loop's composable terms, and which parameters a round trains."""

import math

import torch
from torch.nn import functional as F

from fedfmx.config import FedFMXConfig, ModelConfig
from fedfmx.learner.model import build_model
from fedfmx.learner.training import (
    Batch,
    Forward,
    LocalData,
    batches,
    distillation_term,
    ewc_penalty,
    gather_rows,
    proximal_term,
    rar_terms,
    steps_per_round,
    train_local,
)

CONFIG = ModelConfig(backbone_channels=[4], feature_dim=8, num_experts=2, expert_hidden=4)


def test_ewc_penalty_hand_value() -> None:
    model = build_model(CONFIG, FedFMXConfig(k_max=2), 2, seed=0)
    name = "router.bias"
    anchor = {name: model.router.bias.detach() - 1.0}  # θ − θ* = 1 on both entries
    fisher = {name: torch.tensor([2.0, 4.0])}
    # (μ/2)·Σ F·(θ−θ*)² = (10/2)·(2 + 4) = 30
    value = ewc_penalty(fisher, anchor, weight=10.0)(model, _forward(model))
    assert math.isclose(float(value.detach()), 30.0, rel_tol=1e-6)


def _forward(model: torch.nn.Module) -> Forward:
    x = torch.rand(3, 1, 8, 8)
    logits, routing = model.forward_routed(x)
    return Forward(
        Batch(x, torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.bool)), logits, routing
    )


def test_rar_term_combines_balance_and_z_loss() -> None:
    model = build_model(CONFIG, FedFMXConfig(k_max=2), 2, seed=0)
    forward = _forward(model)
    usage = torch.tensor([0.5, 0.5])
    probs, logits = forward.routing.probs, forward.routing.logits
    expected = (
        0.1 * 2 * (usage * probs.mean(0)).sum() + 0.01 * torch.logsumexp(logits, 1).pow(2).mean()
    )
    assert torch.allclose(rar_terms(usage, 0.1, 0.01)(model, forward), expected)


def test_batches_pair_new_rows_with_equal_replay() -> None:
    data = LocalData(
        torch.rand(10, 1, 4, 4),
        torch.zeros(10, dtype=torch.long),
        torch.rand(3, 1, 4, 4),
        torch.ones(3, dtype=torch.long),
    )
    epoch = list(batches(data, batch_size=4, generator=torch.Generator().manual_seed(0)))
    assert [len(b.y) for b in epoch] == [8, 8, 4]
    assert all(int(b.is_new.sum()) * 2 == len(b.y) for b in epoch)
    assert all(
        bool((b.y[b.is_new] == 0).all()) and bool((b.y[~b.is_new] == 1).all()) for b in epoch
    )


def test_gather_rows_equals_indexing_the_concatenation() -> None:
    """The device's Fisher sample: same rows, same order, without building the concatenation."""
    parts = [torch.rand(7, 3), torch.rand(5, 3)]
    index = torch.randperm(12, generator=torch.Generator().manual_seed(0))[:9]
    assert torch.equal(gather_rows(parts, index), torch.cat(parts)[index])
    no_exemplars = torch.empty(0)
    assert torch.equal(
        gather_rows([parts[0], no_exemplars], index[index < 7]), parts[0][index[index < 7]]
    )


def test_train_local_changes_only_trainable_parameters() -> None:
    model = build_model(CONFIG, FedFMXConfig(k_max=2), 2, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = LocalData(
        torch.rand(16, 1, 8, 8),
        torch.randint(0, 2, (16,)),
        torch.empty(0, 1, 8, 8),
        torch.empty(0, dtype=torch.long),
    )
    trainable = ["experts.1.fc1.weight", "head.weight"]
    result = train_local(
        model,
        data,
        trainable,
        [],
        epochs=2,
        batch_size=8,
        lr=0.1,
        generator=torch.Generator().manual_seed(0),
    )
    assert result.steps == steps_per_round(16, 8, 2) == 4
    for name, param in model.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == (name in trainable), name


def test_proximal_term_hand_value() -> None:
    model = build_model(CONFIG, FedFMXConfig(k_max=2), 2, seed=0)
    start = {"router.bias": model.router.bias.detach() + 2.0}  # θ − θ_g = −2 on 2 entries
    # (μ/2)·‖θ − θ_g‖² = (0.5/2)·(4 + 4) = 2
    value = proximal_term(start, mu=0.5)(model, _forward(model))
    assert math.isclose(float(value.detach()), 2.0, rel_tol=1e-6)


def test_distillation_is_zero_against_itself_and_matches_kl_by_hand() -> None:
    student = build_model(CONFIG, FedFMXConfig(k_max=2), 3, seed=0)
    teacher = build_model(CONFIG, FedFMXConfig(k_max=2), 2, seed=0)
    teacher.load_state_dict(
        {k: v[:2] if k == "head.weight" else v for k, v in student.state_dict().items()}
    )
    forward = _forward(student)
    assert float(distillation_term(teacher, 1.0, 2.0)(student, forward).detach()) < 1e-6
    # a teacher that is sure of class 0 vs a student that is not
    with torch.no_grad():
        teacher.head.weight.zero_()
        teacher.head.weight[0] += 1e3 * F.normalize(torch.ones(8), dim=0)
    t = 2.0
    target = torch.softmax(teacher(forward.batch.x) / t, dim=1)
    log_student = torch.log_softmax(forward.logits[:, :2] / t, dim=1)
    expected = t**2 * (target * (torch.log(target.clamp_min(1e-12)) - log_student)).sum(1).mean()
    value = distillation_term(teacher, 1.0, t)(student, forward)
    assert torch.allclose(value, expected, atol=1e-5)
    assert float(value.detach()) > 0.01
