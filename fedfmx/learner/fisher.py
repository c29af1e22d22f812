"""Fisher information and FRES (Fisher-Routed Expert Scoring), computed on the device.

Parameters are addressed by their state-dict names (`experts.3.fc1.weight`), so a Fisher, a
gradient and an update are all plain `{name: tensor}` maps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from fedfmx.learner.model import FedFMXModel

TensorMap = dict[str, torch.Tensor]


def expert_parameter_names(model: FedFMXModel) -> dict[int, list[str]]:
    """Parameter names of each expert, by expert id."""
    return {
        e: [f"experts.{e}.{name}" for name, _ in expert.named_parameters()]
        for e, expert in enumerate(model.experts)
    }


def diagonal_fisher(
    model: FedFMXModel,
    x: torch.Tensor,
    names: Sequence[str],
    generator: torch.Generator,
    batch_size: int = 64,
) -> TensorMap:
    """Diagonal Fisher `F_i = (1/N)·Σ_n (∂ log p(ŷ_n|x_n) / ∂θ_i)²`, `ŷ_n ~ p(·|x_n)`.

    Labels are drawn from the model's own predictive distribution, so the Fisher measures what
    the model currently knows (its old knowledge) without needing old labels. Per-sample
    gradients come from `vmap(grad(...))`; only `names` are differentiated.
    """
    params = dict(model.named_parameters())
    frozen = {name: p.detach() for name, p in params.items() if name not in names}
    buffers = dict(model.named_buffers())

    def log_likelihood(
        chosen: TensorMap, sample: torch.Tensor, label: torch.Tensor
    ) -> torch.Tensor:
        logits = functional_call(model, {**frozen, **chosen, **buffers}, (sample.unsqueeze(0),))
        return F.log_softmax(logits, dim=1)[0].gather(0, label.unsqueeze(0)).squeeze(0)

    per_sample_grad = vmap(grad(log_likelihood), in_dims=(None, 0, 0))
    chosen = {name: params[name].detach() for name in names}
    fisher = {name: torch.zeros_like(value) for name, value in chosen.items()}
    model.eval()
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        with torch.no_grad():
            probs = torch.softmax(model(batch), dim=1)
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        grads = per_sample_grad(chosen, batch, labels)
        for name in names:
            fisher[name] += grads[name].pow(2).sum(dim=0)
    return {name: value / max(len(x), 1) for name, value in fisher.items()}


def fisher_summary(fisher: torch.Tensor) -> torch.Tensor:
    """What travels for the merge: the mean Fisher of each output row (`[rows, 1]`) of a matrix,
    the full diagonal of a vector (shape: `fedfmx.federation.aggregation.fisher_summary_shape`).

    Rows are the natural unit of an expert's weights, and this keeps the Fisher a small
    fraction of the update instead of doubling it.
    """
    return fisher.mean(dim=1, keepdim=True) if fisher.dim() == 2 else fisher


def accumulate_fisher(
    old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor], decay: float
) -> TensorMap:
    """Online EWC: `F ← γ·F_old + F_new` (names missing on one side count as zero)."""
    merged = {name: value.clone() for name, value in new.items()}
    for name, value in old.items():
        merged[name] = decay * value + merged[name] if name in merged else decay * value
    return merged


@dataclass(frozen=True)
class FresScores:
    """Per-expert FRES terms, each of shape [E]."""

    plasticity: torch.Tensor
    stability: torch.Tensor
    utility: torch.Tensor


def fres_scores(
    gradients: Mapping[int, Sequence[torch.Tensor]],
    fisher: Mapping[int, Sequence[torch.Tensor]],
    eta: float,
    lam: float,
) -> FresScores:
    """FRES per expert `e`, from its new-class gradient `g_e` and old-knowledge Fisher `F_e`:

    - plasticity gain `P_e = η·‖g_e‖²` (first-order loss decrease of a step `−η·g_e`);
    - stability cost `S_e = (η²/2)·Σ_i F_{e,i}·g_{e,i}²` (the quadratic EWC damage of that step);
    - utility `u_e = P_e − λ·S_e`.
    """
    experts = sorted(gradients)
    plasticity = torch.stack(
        [eta * sum((g.pow(2).sum() for g in gradients[e]), torch.tensor(0.0)) for e in experts]
    )
    stability = torch.stack(
        [
            0.5
            * eta**2
            * sum(
                ((f * g.pow(2)).sum() for f, g in zip(fisher[e], gradients[e], strict=True)),
                torch.tensor(0.0),
            )
            for e in experts
        ]
    )
    return FresScores(
        plasticity=plasticity, stability=stability, utility=plasticity - lam * stability
    )


def select_trained_experts(utility: torch.Tensor, budget: int) -> list[int]:
    """Experts worth training this round: positive utility, best first, at most `budget`."""
    order = torch.argsort(utility, descending=True).tolist()
    return sorted(e for e in order[:budget] if utility[e] > 0)


def new_class_gradients(
    model: FedFMXModel, x: torch.Tensor, y: torch.Tensor, names: Mapping[int, Sequence[str]]
) -> dict[int, list[torch.Tensor]]:
    """Gradient of the mean cross-entropy on new-class rows w.r.t. each expert's parameters.

    Routing is dense here (every expert weighted by its gate probability) so that every expert
    gets a gradient: FRES asks what each expert *would* gain, not what the current subset does.
    """
    model.zero_grad(set_to_none=True)
    logits, _ = model.forward_routed(x, dense=True)
    loss = F.cross_entropy(logits, y)
    params = dict(model.named_parameters())
    flat = [params[name] for e in sorted(names) for name in names[e]]
    grads = torch.autograd.grad(loss, flat, allow_unused=True)
    result: dict[int, list[torch.Tensor]] = {}
    position = 0
    for e in sorted(names):
        count = len(names[e])
        result[e] = [
            torch.zeros_like(p) if g is None else g.detach()
            for p, g in zip(
                flat[position : position + count], grads[position : position + count], strict=True
            )
        ]
        position += count
    return result
