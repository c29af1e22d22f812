"""The in-process federation engine: one aggregator and N devices in one process, no network.

Messages still travel as they would over MQTT (announcements as pydantic models, models and
updates as encoded bytes), so the byte counts are real and the MQTT transport plugs into the
same `RoundKeeper` and `DeviceLearner`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from fedfmx.config import FleetConfig
from fedfmx.data.datasets import ImageDataset
from fedfmx.data.fleet_data import (  # re-exported: callers import them from here
    holdout_validation as holdout_validation,
)
from fedfmx.data.fleet_data import (
    load_fleet_dataset as load_fleet_dataset,
)
from fedfmx.data.fleet_data import (
    make_plan as make_plan,
)
from fedfmx.data.fleet_data import (
    own_partition as own_partition,
)
from fedfmx.data.stream import ArraySamples, IncrementalPlan
from fedfmx.device.learner import DeviceLearner
from fedfmx.errors import ProtocolError
from fedfmx.evaluation.metrics import (
    AccuracyMatrix,
    accuracy,
    average_incremental_accuracy,
    backward_transfer,
    final_accuracy,
    forgetting,
    predict,
)
from fedfmx.federation.rounds import GlobalModel, RoundKeeper
from fedfmx.learner.model import build_model, load_numpy_state, state_to_numpy
from fedfmx.learner.training import LocalData, train_local
from fedfmx.wire.codec import MAX_MODEL_BYTES, decode_model

logger = logging.getLogger(__name__)


@dataclass
class RoundLog:
    round: int
    task: int
    updates: int
    uplink_bytes: int
    downlink_bytes: int
    mean_loss: float
    rejected: int = 0
    """Updates the aggregator refused (malformed, non-finite, beyond the norm bound...)."""


@dataclass
class SimulationResult:
    """Everything `--results` writes (see `to_json`)."""

    method: str
    config: dict[str, object]
    class_order: list[str]
    accuracy_matrix: AccuracyMatrix
    seen_accuracy: list[float]
    uplink_bytes: int
    downlink_bytes: int
    rounds: list[RoundLog] = field(default_factory=list)
    wall_time_s: float = 0.0
    final_model: GlobalModel | None = None
    """The last global model (not part of the JSON; `--checkpoint-out` saves it)."""

    @property
    def final_accuracy(self) -> float:
        return final_accuracy(self.seen_accuracy)

    @property
    def average_incremental_accuracy(self) -> float:
        return average_incremental_accuracy(self.seen_accuracy)

    @property
    def forgetting(self) -> float:
        return forgetting(self.accuracy_matrix)

    def to_json(self) -> dict[str, object]:
        return {
            "method": self.method,
            "final_accuracy": self.final_accuracy,
            "average_incremental_accuracy": self.average_incremental_accuracy,
            "forgetting": self.forgetting,
            "backward_transfer": backward_transfer(self.accuracy_matrix),
            "seen_accuracy": self.seen_accuracy,
            "accuracy_matrix": self.accuracy_matrix,
            "uplink_bytes": self.uplink_bytes,
            "downlink_bytes": self.downlink_bytes,
            "uplink_bytes_per_client_round": _per_update(self.uplink_bytes, self.rounds),
            "class_order": self.class_order,
            "rounds": [vars(r) for r in self.rounds],
            "wall_time_s": self.wall_time_s,
            "config": self.config,
        }


def _per_update(total: int, rounds: list[RoundLog]) -> float:
    updates = sum(r.updates for r in rounds)
    return total / updates if updates else 0.0


def initial_model(fleet: FleetConfig) -> GlobalModel:
    """Version 0: freshly initialised weights (seeded) and no classes yet."""
    network = build_model(fleet.network, fleet.routing, 0, fleet.seed)
    usage = [1.0 / fleet.model.num_experts] * fleet.model.num_experts
    return GlobalModel(
        version=0, weights=state_to_numpy(network), class_names=[], expert_usage=usage
    )


def device_id(client: int) -> str:
    return f"device-{client:03d}"


def evaluate(
    fleet: FleetConfig, model: GlobalModel, dataset: ImageDataset, tasks: list[list[int]], upto: int
) -> tuple[list[float], float]:
    """Accuracy on each task 0..upto's test classes, and on all of them together."""
    network = build_model(fleet.network, fleet.routing, len(model.class_names), fleet.seed)
    load_numpy_state(network, model.weights)
    registry = {name: i for i, name in enumerate(model.class_names)}
    names = np.array(dataset.class_names)
    global_ids = torch.tensor([registry.get(str(n), -1) for n in names[dataset.test_y]])
    seen = np.isin(dataset.test_y, [c for task in tasks[: upto + 1] for c in task])
    predicted = predict(network, torch.from_numpy(dataset.test_x[seen])) if len(registry) else None
    targets = global_ids[torch.from_numpy(seen)]
    task_of = {c: t for t, task in enumerate(tasks) for c in task}
    per_task_rows = np.array([task_of[int(c)] for c in dataset.test_y[seen]])
    if predicted is None:
        return [0.0] * (upto + 1), 0.0
    per_task = [
        accuracy(
            predicted[torch.from_numpy(per_task_rows == t)],
            targets[torch.from_numpy(per_task_rows == t)],
        )
        for t in range(upto + 1)
    ]
    return per_task, accuracy(predicted, targets)


def task_evaluator(
    fleet: FleetConfig, dataset: ImageDataset
) -> Callable[[GlobalModel, int], tuple[list[float], float]]:
    """`evaluate` bound to the fleet's test set and task plan, for the MQTT aggregator."""
    tasks = make_plan(fleet, dataset).tasks
    return lambda model, task: evaluate(fleet, model, dataset, tasks, task)


ProgressHook = Callable[[RoundLog], None]
Tamper = Callable[[str, bytes, Mapping[str, np.ndarray]], bytes]
"""What a device does to its update before sending it: `(device id, payload, the global weights
it trained from) -> payload`; the robustness benchmark's hostile devices."""


def run_simulation(
    fleet: FleetConfig, dataset: ImageDataset, on_round: ProgressHook | None = None
) -> SimulationResult:
    """The in-process engine for federated methods, the centralised run for `joint`."""
    if fleet.method == "joint":
        return run_joint(fleet, dataset, on_round)
    return run_inproc(fleet, dataset, on_round)


def _empty_result(
    fleet: FleetConfig, dataset: ImageDataset, plan: IncrementalPlan
) -> SimulationResult:
    return SimulationResult(
        method=fleet.method,
        config=fleet.model_dump(mode="json"),
        class_order=[dataset.class_names[c] for task in plan.tasks for c in task],
        accuracy_matrix=[],
        seen_accuracy=[],
        uplink_bytes=0,
        downlink_bytes=0,
    )


def _record_task(
    result: SimulationResult,
    fleet: FleetConfig,
    model: GlobalModel,
    dataset: ImageDataset,
    plan: IncrementalPlan,
    task: int,
) -> None:
    per_task, seen = evaluate(fleet, model, dataset, plan.tasks, task)
    result.accuracy_matrix.append(per_task)
    result.seen_accuracy.append(seen)


def run_joint(
    fleet: FleetConfig, dataset: ImageDataset, on_round: ProgressHook | None = None
) -> SimulationResult:
    """Upper bound: one model trained centrally on all data of every task seen so far.

    Same rounds and local epochs as the federation, no devices, no bytes on the wire.
    """
    torch.set_num_threads(fleet.training.threads)
    started = time.perf_counter()
    plan = make_plan(fleet, dataset)
    result = _empty_result(fleet, dataset, plan)
    network = build_model(fleet.network, fleet.routing, 0, fleet.seed)
    generator = torch.Generator().manual_seed(fleet.seed)
    class_names: list[str] = []
    for round_index in range(plan.num_rounds):
        task = plan.task_of_round(round_index)
        seen = [c for t in plan.tasks[: task + 1] for c in t]
        class_names += [
            dataset.class_names[c] for c in seen if dataset.class_names[c] not in class_names
        ]
        network.grow_head(len(class_names))
        rows = np.isin(dataset.train_y, seen)
        ids = {dataset.class_names[c]: class_names.index(dataset.class_names[c]) for c in seen}
        labels = torch.tensor([ids[dataset.class_names[c]] for c in dataset.train_y[rows]])
        empty = torch.empty(0)
        data = LocalData(torch.from_numpy(dataset.train_x[rows]), labels, empty, empty.long())
        trained = train_local(
            network,
            data,
            [n for n, _ in network.named_parameters()],
            [],
            epochs=fleet.training.local_epochs,
            batch_size=fleet.training.batch_size,
            lr=fleet.training.lr,
            generator=generator,
        )
        log = RoundLog(round_index, task, 1, 0, 0, trained.loss)
        result.rounds.append(log)
        if on_round is not None:
            on_round(log)
        if (round_index + 1) % fleet.protocol.rounds_per_task == 0:
            model = GlobalModel(round_index + 1, state_to_numpy(network), list(class_names), [])
            _record_task(result, fleet, model, dataset, plan, task)
            result.final_model = model
    result.wall_time_s = time.perf_counter() - started
    return result


def run_inproc(
    fleet: FleetConfig,
    dataset: ImageDataset,
    on_round: ProgressHook | None = None,
    tamper: Tamper | None = None,
) -> SimulationResult:
    """Run every task and round of `fleet` in this process and measure it.

    `tamper` alters updates before the aggregator sees them (hostile devices, in
    `benchmarks/robustness.py`); an update the aggregator refuses is logged and counted in
    `RoundLog.rejected`, and the round goes on, as in the MQTT service.
    """
    torch.set_num_threads(fleet.training.threads)
    started = time.perf_counter()
    plan = make_plan(fleet, dataset)
    keeper = RoundKeeper(fleet, initial_model(fleet))
    names = np.array(dataset.class_names)[dataset.train_y]
    devices = [
        DeviceLearner(
            device_id(k),
            fleet,
            ArraySamples(dataset.train_x, names),
            plan.stream(k, fleet.seed),
            seed=fleet.seed * 1000 + k,
        )
        for k in range(fleet.protocol.num_clients)
    ]
    result = _empty_result(fleet, dataset, plan)
    held: dict[str, int] = {}  # the version each device holds: it takes the next one's delta
    for round_index in range(plan.num_rounds):
        participants = [d.device_id for d in devices]
        announcement = keeper.open_round(round_index, participants, deadline_unix=0.0)
        payload = keeper.device_payload()
        delta = keeper.delta_payload()
        header, weights = decode_model(payload, max_bytes=MAX_MODEL_BYTES)
        log = RoundLog(round_index, announcement.task, 0, 0, 0, 0.0)
        losses = []
        for device in devices:
            takes_delta = delta is not None and held.get(device.device_id) == delta.base_version
            sent = len(delta.payload) if delta is not None and takes_delta else len(payload)
            log.downlink_bytes += sent + len(announcement.model_dump_json())
            held[device.device_id] = header.version
            update = device.handle_round(announcement, header, weights)
            if update is None:
                continue
            if tamper is not None:
                update = tamper(device.device_id, update, weights)
            try:
                accepted = keeper.accept(update)
            except ProtocolError as error:
                logger.warning("update of %s rejected: %s", device.device_id, error)
                log.rejected += 1
                continue
            if accepted is not None:
                log.updates += 1
                log.uplink_bytes += len(update)
                losses.append(accepted.train_loss)
        keeper.close_round()
        log.mean_loss = float(np.mean(losses)) if losses else 0.0
        result.rounds.append(log)
        result.uplink_bytes += log.uplink_bytes
        result.downlink_bytes += log.downlink_bytes
        if on_round is not None:
            on_round(log)
        if (round_index + 1) % fleet.protocol.rounds_per_task == 0:
            _record_task(result, fleet, keeper.model, dataset, plan, announcement.task)
    result.final_model = keeper.model
    result.wall_time_s = time.perf_counter() - started
    return result
