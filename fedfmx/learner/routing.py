"""AES subset selection and the routing regularisers (RAR), as pure tensor functions.

Symbols follow DESIGN §4: `p` gate probabilities [B, E], `f` expert usage fractions [E].
"""

from __future__ import annotations

import torch


def aes_mask(probs: torch.Tensor, tau: float, cost: float, k_min: int, k_max: int) -> torch.Tensor:
    """Adaptive Expert Selection: the subset S(x) per row, as a 0/1 mask [B, E].

    Utility of a subset: `U(S) = Σ_{e∈S} p_e − cost·|S|`. Experts are visited in decreasing
    `p_e`; the next one joins while its marginal contribution `p_e − cost` exceeds `τ`, and the
    subset size stays within [k_min, k_max]. Written with sort + scatter only (no data-dependent
    shapes) so that it exports to ONNX.
    """
    sorted_probs, order = probs.sort(dim=1, descending=True)
    rank = torch.arange(probs.shape[1], device=probs.device).unsqueeze(0)
    keep_sorted = (rank < k_min) | ((sorted_probs - cost > tau) & (rank < k_max))
    return torch.zeros_like(probs).scatter(1, order, keep_sorted.to(probs.dtype))


def load_balance_loss(probs: torch.Tensor, usage: torch.Tensor) -> torch.Tensor:
    """RAR load balance (Switch Transformer form): `E·Σ_e f_e·p̄_e`.

    `f` is the fleet-wide usage fraction the aggregator publishes (no gradient); `p̄_e` the
    device's mean gate probability. Minimal (= 1) when both are uniform; pushes the router away
    from experts the whole fleet already overuses, which balances load across clients too.
    """
    num_experts = probs.shape[1]
    return num_experts * torch.sum(usage.detach() * probs.mean(dim=0))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): `mean_x (log Σ_e exp(l_e(x)))²`, keeps router logits small."""
    return torch.logsumexp(logits, dim=1).pow(2).mean()


def fres_route_loss(probs: torch.Tensor, utility: torch.Tensor, temperature: float) -> torch.Tensor:
    """Aligns the router with FRES on new-class rows: `−mean_x Σ_e q_e·log p_e(x)`.

    `q = softmax(û / T)` with `û = u / max|u|` the normalised FRES utilities, so the global
    router learns to send new classes to the experts that can learn them cheaply, and keeps
    doing so at inference time when no FRES bias is applied.
    """
    target = fres_route_target(utility, temperature)
    return -(target.unsqueeze(0) * torch.log(probs.clamp_min(1e-12))).sum(dim=1).mean()


def fres_route_target(utility: torch.Tensor, temperature: float) -> torch.Tensor:
    """`q = softmax(û / T)`, `û = u / max|u|` (uniform when every utility is zero)."""
    scale = utility.abs().max().clamp_min(1e-12)
    return torch.softmax(utility / scale / temperature, dim=0)
