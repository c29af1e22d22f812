"""Federated methods as small strategies over one local loop and one merge.

A method decides, on the device, which parameters to train and send and which loss terms to
add; the round loop (in-process or MQTT), the codec and the merge are shared by all of them.
FedFMX and its ablations are one class with switches; the FedAvg family is another, composing
the classic continual-learning terms (proximal, EWC, LwF, replay).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from fedfmx.config import FleetConfig
from fedfmx.learner.fisher import (
    FresScores,
    TensorMap,
    diagonal_fisher,
    expert_parameter_names,
    fisher_summary,
    fres_scores,
    new_class_gradients,
    select_trained_experts,
)
from fedfmx.learner.model import FedFMXModel
from fedfmx.learner.routing import fres_route_target
from fedfmx.learner.training import (
    LocalData,
    LossTerm,
    TrainResult,
    distillation_term,
    ewc_penalty,
    fres_routing_term,
    gather_rows,
    proximal_term,
    rar_terms,
    steps_per_round,
    train_local,
)

HEAD = "head.weight"


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
    teacher: FedFMXModel | None
    """The model as it was when the device last closed a task (LwF's teacher)."""
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


class Method(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def uses_exemplars(self) -> bool:
        """Whether the device keeps an exemplar buffer and replays it."""
        ...

    @property
    def uses_teacher(self) -> bool:
        """Whether the device keeps the model of its last task as a distillation teacher."""
        ...

    def fisher_names(self, model: FedFMXModel, fleet: FleetConfig) -> list[str]:
        """Parameters whose old-knowledge Fisher the device keeps (empty: none)."""
        ...

    def train(self, context: LocalContext) -> LocalOutcome: ...


def parameter_names(model: FedFMXModel, *prefixes: str) -> list[str]:
    return [name for name, _ in model.named_parameters() if name.startswith(prefixes)]


def _fisher_sample(data: LocalData, limit: int, generator: torch.Generator) -> torch.Tensor:
    """Up to `limit` rows of everything the device holds (new rows and exemplars)."""
    pick = torch.randperm(len(data.x_new) + len(data.x_old), generator=generator)[:limit]
    return gather_rows([data.x_new, data.x_old], pick)


@dataclass(frozen=True)
class FedFMX:
    """FRES picks the experts worth training, AES routes, RAR balances, EWC protects old classes.

    The switches give the ablations: `use_fres=False` picks experts by the router's mean gate
    probability on new rows (router only); `use_rar=False` drops the load-balance and z-loss
    terms. The `fixed_topk` ablation is a routing setting (`FleetConfig.routing`), since it must
    hold at inference too.
    """

    name: str = "fedfmx"
    use_fres: bool = True
    use_rar: bool = True
    uses_exemplars: bool = True
    uses_teacher: bool = False

    def fisher_names(self, model: FedFMXModel, fleet: FleetConfig) -> list[str]:
        names = parameter_names(model, "experts.", "router.")
        if fleet.model.backbone_mode == "train":
            names += parameter_names(model, "backbone.")
        return names

    def train(self, context: LocalContext) -> LocalOutcome:
        model, data, cfg = context.model, context.data, context.fleet.fedfmx
        training = context.fleet.training
        expert_names = expert_parameter_names(model)
        scores = self.score(context, expert_names)
        selected = select_trained_experts(scores.utility, cfg.max_experts_per_round)
        sent = [name for e in selected for name in expert_names[e]]
        sent += parameter_names(model, "router.")
        if context.train_backbone:
            sent += parameter_names(model, "backbone.")
        penalised = {name: value for name, value in context.old_fisher.items() if name in sent}
        terms: list[LossTerm] = [ewc_penalty(penalised, context.anchor, cfg.ewc_weight)]
        if self.use_rar:
            terms.append(rar_terms(context.fleet_usage, cfg.rar_weight, cfg.z_loss_weight))
        bias = None
        if self.use_fres:
            terms.append(
                fres_routing_term(scores.utility, cfg.fres_route_weight, cfg.fres_temperature)
            )
            target = fres_route_target(scores.utility, cfg.fres_temperature)
            bias = torch.log(target * model.num_experts)
        result = train_local(
            model,
            data,
            [*sent, HEAD],
            terms,
            epochs=training.local_epochs,
            batch_size=training.batch_size,
            lr=training.lr,
            generator=context.generator,
            route_bias=bias,
        )
        merge_names = [name for e in selected for name in expert_names[e]]
        sample = _fisher_sample(data, cfg.fisher_samples, context.generator)
        fisher = diagonal_fisher(model, sample, merge_names, context.generator)
        merge_fisher = {name: fisher_summary(value) for name, value in fisher.items()}
        return LocalOutcome(sent, selected, merge_fisher, result)

    def score(self, context: LocalContext, expert_names: Mapping[int, list[str]]) -> FresScores:
        """FRES on a slice of the new-class rows; η is the step the local round will take.

        Without FRES the "score" is the router's mean gate probability on those rows.
        """
        data, training = context.data, context.fleet.training
        limit = context.fleet.fedfmx.fisher_samples
        rows = torch.randperm(len(data.x_new), generator=context.generator)[:limit]
        if not self.use_fres:
            with torch.no_grad():
                _, routing = context.model.forward_routed(data.x_new[rows])
            gate = routing.probs.mean(dim=0)
            return FresScores(plasticity=gate, stability=torch.zeros_like(gate), utility=gate)
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


@dataclass(frozen=True)
class FedAvgFamily:
    """FedAvg fine-tuning of the whole model, optionally with one continual-learning term.

    The switches add FedProx's proximal term, an EWC penalty, LwF distillation, exemplar
    replay, or weight aligning of the head after the local round (`align_weights`, with
    replay: `fedavg_replay_wa`). `dense_moe` is this with replay and every expert active
    (`FleetConfig.routing`).
    """

    name: str = "fedavg"
    prox: bool = False
    ewc: bool = False
    lwf: bool = False
    uses_exemplars: bool = False
    weight_aligning: bool = False

    @property
    def uses_teacher(self) -> bool:
        return self.lwf

    def fisher_names(self, model: FedFMXModel, fleet: FleetConfig) -> list[str]:
        return [name for name, _ in model.named_parameters() if name != HEAD] if self.ewc else []

    def train(self, context: LocalContext) -> LocalOutcome:
        model, fleet = context.model, context.fleet
        sent = [name for name, _ in model.named_parameters() if name != HEAD]
        terms: list[LossTerm] = []
        if self.prox:
            params = dict(model.named_parameters())
            start = {name: params[name].detach().clone() for name in sent}
            terms.append(proximal_term(start, fleet.baselines.prox_mu))
        if self.ewc:
            terms.append(
                ewc_penalty(context.old_fisher, context.anchor, fleet.baselines.ewc_weight)
            )
        if self.lwf and context.teacher is not None:
            terms.append(
                distillation_term(
                    context.teacher, fleet.baselines.lwf_weight, fleet.baselines.lwf_temperature
                )
            )
        result = train_local(
            model,
            context.data,
            [*sent, HEAD],
            terms,
            epochs=fleet.training.local_epochs,
            batch_size=fleet.training.batch_size,
            lr=fleet.training.lr,
            generator=context.generator,
        )
        if self.weight_aligning:
            new_rows = torch.unique(context.data.y_new)
            with torch.no_grad():
                model.head.weight.copy_(align_weights(model.head.weight, new_rows))
        return LocalOutcome(sent, list(range(model.num_experts)), None, result)


def align_weights(head: torch.Tensor, new_rows: torch.Tensor) -> torch.Tensor:
    """Weight aligning (WA, Zhao et al., CVPR 2020): the head's new-class rows are rescaled so
    their mean norm is the old-class rows' mean norm,

        `w_c ← γ·w_c` for new `c`,   `γ = mean_{c old} ‖w_c‖ / mean_{c new} ‖w_c‖`,

    which removes the bias towards the classes just learnt that training on few old rows (the
    exemplars) leaves in the head. Unchanged when either side is empty. (WA's weight clipping
    to non-negative values during training is not applied: the head here has signed rows.)
    """
    is_new = torch.zeros(len(head), dtype=torch.bool)
    is_new[new_rows] = True
    if bool(is_new.all()) or not bool(is_new.any()):
        return head
    norms = head.norm(dim=1)
    gamma = norms[~is_new].mean() / norms[is_new].mean().clamp_min(1e-12)
    return torch.where(is_new.unsqueeze(1), gamma * head, head)


@dataclass(frozen=True)
class ClosedForm:
    """A head solved in closed form: the device sends its new rows' feature statistics
    (`fedfmx.closed_form.head`), nothing is trained, and the aggregator solves `W = (G + λI)⁻¹Q`.

    `ridge` runs it on the input's random ReLU features (or a frozen trunk's features): with
    exact sums it needs no replay, so it keeps no exemplar and no image beyond the round.
    `fedfmx_cf` (closed-form FedFMX) runs it on the shared features and its experts' (the
    network is `FleetConfig.network`); `fedfmx_cf_no_experts` on the shared features alone.
    """

    name: str = "ridge"
    uses_exemplars: bool = False
    uses_teacher: bool = False

    def fisher_names(self, model: FedFMXModel, fleet: FleetConfig) -> list[str]:
        return []


METHODS: dict[str, Method | ClosedForm] = {
    "fedfmx": FedFMX(),
    "no_fres": FedFMX(name="no_fres", use_fres=False),
    "fixed_topk": FedFMX(name="fixed_topk"),
    "no_rar": FedFMX(name="no_rar", use_rar=False),
    "fedavg": FedAvgFamily(),
    "fedprox": FedAvgFamily(name="fedprox", prox=True),
    "fedewc": FedAvgFamily(name="fedewc", ewc=True),
    "fedlwf": FedAvgFamily(name="fedlwf", lwf=True),
    "fedavg_replay": FedAvgFamily(name="fedavg_replay", uses_exemplars=True),
    "fedavg_replay_wa": FedAvgFamily(
        name="fedavg_replay_wa", uses_exemplars=True, weight_aligning=True
    ),
    "dense_moe": FedAvgFamily(name="dense_moe", uses_exemplars=True),
    "ridge": ClosedForm(),
    "fedfmx_cf": ClosedForm(name="fedfmx_cf"),
    "fedfmx_cf_no_experts": ClosedForm(name="fedfmx_cf_no_experts"),
}
"""Every federated method by name; `joint` (centralised upper bound) lives in the simulator."""


def make_method(name: str) -> Method | ClosedForm:
    return METHODS[name]
