"""Federated methods as small strategies over one local loop and one merge.

A method decides, on the device, which parameters to train and send and which loss terms to add.
The round loop (in-process or MQTT), the codec and the merge are shared by all of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from fedfmx.config import FleetConfig
from fedfmx.fisher import (
    FresScores,
    TensorMap,
    diagonal_fisher,
    expert_parameter_names,
    fres_scores,
    new_class_gradients,
    select_trained_experts,
)
from fedfmx.model import FedFMXModel
from fedfmx.routing import fres_route_target
from fedfmx.training import (
    LocalData,
    LossTerm,
    TrainResult,
    ewc_penalty,
    fres_routing_term,
    rar_terms,
    steps_per_round,
    train_local,
)


@dataclass
class LocalContext:
    """Everything a method may use on the device for one round."""

    model: FedFMXModel
    data: LocalData
    fleet: FleetConfig
    old_fisher: TensorMap
    """Old-knowledge Fisher accumulated on this device (online EWC)."""
    anchor: TensorMap
    """Parameters when the device last closed a task: EWC's `θ*`."""
    fleet_usage: torch.Tensor
    """RAR's `f_e` published by the aggregator."""
    train_backbone: bool
    generator: torch.Generator


@dataclass
class LocalOutcome:
    """What a method trained: the parameters whose deltas travel, and merge statistics."""

    sent: list[str]
    expert_ids: list[int]
    merge_fisher: TensorMap | None
    result: TrainResult
    scores: FresScores | None = None


class Method(Protocol):
    name: str
    uses_exemplars: bool
    uses_fisher: bool

    def train(self, context: LocalContext) -> LocalOutcome: ...


def _names(model: FedFMXModel, prefix: str) -> list[str]:
    return [name for name, _ in model.named_parameters() if name.startswith(prefix)]


class FedFMX:
    """FRES picks the experts worth training, AES routes, RAR balances, EWC protects old classes."""

    name = "fedfmx"
    uses_exemplars = True
    uses_fisher = True

    def train(self, context: LocalContext) -> LocalOutcome:
        model, data, cfg = context.model, context.data, context.fleet.fedfmx
        training = context.fleet.training
        expert_names = expert_parameter_names(model)
        scores = self.score(context, expert_names)
        selected = select_trained_experts(scores.utility, cfg.max_experts_per_round)
        sent = [name for e in selected for name in expert_names[e]] + _names(model, "router.")
        if context.train_backbone:
            sent += _names(model, "backbone.")
        penalised = {name: value for name, value in context.old_fisher.items() if name in sent}
        terms: list[LossTerm] = [
            ewc_penalty(penalised, context.anchor, cfg.ewc_weight),
            rar_terms(context.fleet_usage, cfg.rar_weight, cfg.z_loss_weight),
            fres_routing_term(scores.utility, cfg.fres_route_weight, cfg.fres_temperature),
        ]
        bias = torch.log(
            fres_route_target(scores.utility, cfg.fres_temperature) * model.num_experts
        )
        result = train_local(
            model,
            data,
            [*sent, "head.weight"],
            terms,
            epochs=training.local_epochs,
            batch_size=training.batch_size,
            lr=training.lr,
            generator=context.generator,
            route_bias=bias,
        )
        merge_names = [name for e in selected for name in expert_names[e]]
        sample = _fisher_sample(data, cfg.fisher_samples, context.generator)
        merge_fisher = (
            diagonal_fisher(model, sample, merge_names, context.generator) if merge_names else {}
        )
        return LocalOutcome(
            sent=sent, expert_ids=selected, merge_fisher=merge_fisher, result=result, scores=scores
        )

    @staticmethod
    def score(context: LocalContext, expert_names: Mapping[int, list[str]]) -> FresScores:
        """FRES on a slice of the new-class rows; η is the step the local round will take."""
        data, training = context.data, context.fleet.training
        rows = torch.randperm(len(data.x_new), generator=context.generator)[
            : context.fleet.fedfmx.fisher_samples
        ]
        gradients = new_class_gradients(
            context.model, data.x_new[rows], data.y_new[rows], expert_names
        )
        fisher = {
            e: [
                context.old_fisher.get(name, torch.zeros_like(g))
                for name, g in zip(names, gradients[e], strict=True)
            ]
            for e, names in expert_names.items()
        }
        eta = training.lr * steps_per_round(len(data), training.batch_size, training.local_epochs)
        return fres_scores(gradients, fisher, eta, context.fleet.fedfmx.fres_lambda)


class FedAvg:
    """FedAvg fine-tuning of the whole model: the lower bound every method must beat."""

    name = "fedavg"
    uses_exemplars = False
    uses_fisher = False

    def train(self, context: LocalContext) -> LocalOutcome:
        model, training = context.model, context.fleet.training
        sent = [name for name, _ in model.named_parameters() if name != "head.weight"]
        result = train_local(
            model,
            context.data,
            [*sent, "head.weight"],
            [],
            epochs=training.local_epochs,
            batch_size=training.batch_size,
            lr=training.lr,
            generator=context.generator,
        )
        return LocalOutcome(
            sent=sent, expert_ids=list(range(model.num_experts)), merge_fisher=None, result=result
        )


def _fisher_sample(data: LocalData, limit: int, generator: torch.Generator) -> torch.Tensor:
    """Up to `limit` rows of everything the device holds (new rows and exemplars)."""
    rows = torch.cat([data.x_new, data.x_old]) if len(data.x_old) else data.x_new
    return rows[torch.randperm(len(rows), generator=generator)[:limit]]


METHODS: dict[str, type[FedFMX] | type[FedAvg]] = {"fedfmx": FedFMX, "fedavg": FedAvg}


def make_method(name: str) -> Method:
    return METHODS[name]()
