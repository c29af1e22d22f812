"""The one local training loop; methods compose it from loss terms (Avalanche-style plugins).

A term is a callable `(model, batch) -> loss`; FedFMX adds the Fisher penalty, RAR and the FRES
routing term, baselines add theirs, and the loop itself never changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from fedfmx.learner.model import FedFMXModel, Routing
from fedfmx.learner.routing import fres_route_loss, load_balance_loss, router_z_loss


@dataclass
class Batch:
    """One training step's rows: new-task rows first, replayed exemplars after them."""

    x: torch.Tensor
    y: torch.Tensor
    is_new: torch.Tensor
    """Boolean [B]: rows of the task being learnt (not exemplars)."""


@dataclass
class Forward:
    """What a term may look at: the batch, the model's logits and its routing decision."""

    batch: Batch
    logits: torch.Tensor
    routing: Routing


LossTerm = Callable[[FedFMXModel, Forward], torch.Tensor]


def ewc_penalty(
    fisher: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor], weight: float
) -> LossTerm:
    """EWC: `(μ/2)·Σ_i F_i·(θ_i − θ*_i)²` over the parameters that have a Fisher."""

    def term(model: FedFMXModel, _: Forward) -> torch.Tensor:
        params = dict(model.named_parameters())
        total = sum(
            (
                (fisher[name] * (params[name] - anchor[name]).pow(2)).sum()
                for name in fisher
                if name in params
            ),
            torch.tensor(0.0),
        )
        return 0.5 * weight * total

    return term


def rar_terms(usage: torch.Tensor, balance_weight: float, z_weight: float) -> LossTerm:
    """RAR: `α·E·Σ_e f_e·p̄_e + β·z-loss` (see `fedfmx.learner.routing`)."""

    def term(_: FedFMXModel, forward: Forward) -> torch.Tensor:
        routing = forward.routing
        return balance_weight * load_balance_loss(routing.probs, usage) + z_weight * router_z_loss(
            routing.logits
        )

    return term


def fres_routing_term(utility: torch.Tensor, weight: float, temperature: float) -> LossTerm:
    """Pull the (unbiased) router towards the FRES target on new-class rows."""

    def term(_: FedFMXModel, forward: Forward) -> torch.Tensor:
        new_rows = forward.batch.is_new
        if not bool(new_rows.any()):
            return torch.tensor(0.0)
        probs = torch.softmax(forward.routing.logits[new_rows], dim=1)
        return weight * fres_route_loss(probs, utility, temperature)

    return term


@dataclass
class LocalData:
    """A device's rows for this round: its current-task stream plus its exemplar buffer."""

    x_new: torch.Tensor
    y_new: torch.Tensor
    x_old: torch.Tensor
    y_old: torch.Tensor

    def __len__(self) -> int:
        return len(self.x_new)


@dataclass
class TrainResult:
    loss: float
    usage: torch.Tensor
    """Rows routed to each expert during training [E]."""
    steps: int


def batches(data: LocalData, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
    """One epoch: shuffled new-task batches, each joined by an equal-sized exemplar replay batch.

    Replaying as many old rows as new ones per step counters the new-class bias of
    class-incremental training without letting the (small) buffer dominate an epoch.

    Batches are made as the loop asks for them, so a device never holds a copy of the whole
    epoch's rows beside the rows themselves (with cached features, a Pi's largest array). The
    draws from `generator` are the same as making them all up front: nothing else draws from it
    between two batches.
    """
    order = torch.randperm(len(data.x_new), generator=generator)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        x, y = data.x_new[rows], data.y_new[rows]
        is_new = torch.ones(len(rows), dtype=torch.bool)
        if len(data.x_old):
            replay = torch.randint(len(data.x_old), (len(rows),), generator=generator)
            x = torch.cat([x, data.x_old[replay]])
            y = torch.cat([y, data.y_old[replay]])
            is_new = torch.cat([is_new, torch.zeros(len(rows), dtype=torch.bool)])
        yield Batch(x=x, y=y, is_new=is_new)


def gather_rows(parts: Sequence[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """`torch.cat(parts)[index]` without building the concatenation: on a device the parts are
    its largest arrays (every held row, every exemplar) and only a few hundred rows are wanted."""
    gathered = torch.empty((len(index), *parts[0].shape[1:]), dtype=parts[0].dtype)
    start = 0
    for part in parts:
        inside = (index >= start) & (index < start + len(part))
        if bool(inside.any()):
            gathered[inside] = part[index[inside] - start]
        start += len(part)
    return gathered


def train_local(
    model: FedFMXModel,
    data: LocalData,
    trainable: Sequence[str],
    terms: Sequence[LossTerm],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    route_bias: torch.Tensor | None = None,
    dense: bool = False,
) -> TrainResult:
    """SGD (momentum 0.9) on `trainable` only: cross-entropy plus every term."""
    chosen = set(trainable)
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    params = [param for name, param in model.named_parameters() if name in chosen]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    usage = torch.zeros(model.num_experts)
    total, steps = 0.0, 0
    model.train()
    for _ in range(epochs):
        for batch in batches(data, batch_size, generator):
            logits, routing = model.forward_routed(batch.x, bias=route_bias, dense=dense)
            forward = Forward(batch=batch, logits=logits, routing=routing)
            loss = F.cross_entropy(logits, batch.y) + sum(
                (term(model, forward) for term in terms), torch.tensor(0.0)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
            usage += routing.usage().detach()
            total += float(loss.detach())
            steps += 1
    for param in model.parameters():
        param.requires_grad_(True)
    return TrainResult(loss=total / max(steps, 1), usage=usage, steps=steps)


def steps_per_round(num_rows: int, batch_size: int, epochs: int) -> int:
    """How many SGD steps a local round takes (FRES's step size η is lr times this)."""
    return epochs * max(1, -(-num_rows // batch_size))


def proximal_term(start: Mapping[str, torch.Tensor], mu: float) -> LossTerm:
    """FedProx: `(μ/2)·‖θ − θ_global‖²` over the parameters in `start`."""

    def term(model: FedFMXModel, _: Forward) -> torch.Tensor:
        params = dict(model.named_parameters())
        total = sum(
            ((params[name] - value).pow(2).sum() for name, value in start.items()),
            torch.tensor(0.0),
        )
        return 0.5 * mu * total

    return term


def distillation_term(teacher: FedFMXModel, weight: float, temperature: float) -> LossTerm:
    """LwF: `w·T²·KL(softmax(t_old/T) ‖ softmax(s_old/T))` over the teacher's classes.

    `t_old` are the teacher's logits (the model when the device last closed a task), `s_old`
    the student's logits for the same classes; every row of the batch is distilled.
    """

    def term(_: FedFMXModel, forward: Forward) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(forward.batch.x)
        old = forward.logits[:, : target.shape[1]]
        return (
            weight
            * temperature**2
            * F.kl_div(
                F.log_softmax(old / temperature, dim=1),
                F.softmax(target / temperature, dim=1),
                reduction="batchmean",
            )
        )

    return term
