"""The device side of a round, free of any transport: announcement and model in, update bytes out.

The in-process engine and `fedfmx-edge join` both drive a `DeviceLearner`, so the learning a
device does is the same whichever way its messages travel.

With a frozen pretrained backbone the device feeds the network cached trunk features instead of
images (`fedfmx.trunk.feature_cache`): the trunk sees each sample once, and local training, Fisher
estimation and FRES run on the projection, experts and head only. The update is the same as
with images, up to float rounding of the trunk (`tests/test_device_cache.py`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fedfmx.config import FleetConfig
from fedfmx.data.stream import DeviceStream, SampleTable
from fedfmx.device.round import (
    DeviceState,
    LocalRows,
    StatisticsRound,
    check_model_tensors,
    statistics_update,
)
from fedfmx.device.round import (
    validate_announcement as validate_announcement,  # callers import it from here
)
from fedfmx.federation.aggregation import FISHER_PREFIX, HEAD_ROWS, HEAD_WEIGHT, Arrays
from fedfmx.learner.exemplars import ExemplarBuffer
from fedfmx.learner.fisher import accumulate_fisher, diagonal_fisher
from fedfmx.learner.methods import ClosedForm, LocalContext, LocalOutcome, make_method
from fedfmx.learner.model import FedFMXModel, build_model, load_numpy_state, state_to_numpy
from fedfmx.learner.training import LocalData, gather_rows
from fedfmx.trunk.feature_cache import FeatureCache, trunk_feature_fn
from fedfmx.trunk.pretrained import TRUNK_FEATURES, PretrainedBackbone, backbone_id
from fedfmx.wire.codec import encode_update
from fedfmx.wire.messages import ModelHeader, RoundAnnouncement, UpdateHeader


class FrozenTrunk(Protocol):
    """A frozen trunk run outside torch (the device's int8 ONNX trunk, `export.trunk`)."""

    @property
    def feature_id(self) -> str:
        """Names its features in the feature cache (never mixed with another trunk's)."""
        ...

    def features(self, images: np.ndarray) -> np.ndarray: ...


class DeviceLearner:
    """One device's learning: stream, exemplars, Fisher, method, and its update encoding.

    `samples` resolves the ids `stream` hands out to images and class names (in memory for a
    fleet partition, a device's sample store for its own sources). `cache_dir` is where the
    trunk-feature cache lives (a device passes a folder it keeps, so
    the cache survives restarts); None uses a temporary folder removed with the learner. The
    cache exists only for a pretrained backbone and a positive `training.feature_cache_mb`.
    `trunk`, when given, computes the cache's misses instead of the torch trunk (issue 16: the
    device's int8 ONNX trunk, faster and ~100 MB lighter at a round's peak).
    """

    def __init__(
        self,
        device_id: str,
        fleet: FleetConfig,
        samples: SampleTable,
        stream: DeviceStream,
        seed: int,
        cache_dir: Path | None = None,
        trunk: FrozenTrunk | None = None,
    ) -> None:
        self.device_id = device_id
        self.fleet = fleet
        self.samples = samples
        self.stream = stream
        self.method = make_method(fleet.method)
        per_class = fleet.training.exemplars_per_class if self.method.uses_exemplars else 0
        self.exemplars = ExemplarBuffer(per_class, None, seed)
        self.state = DeviceState()
        self.generator = torch.Generator().manual_seed(seed)
        self.trunk = trunk
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self.feature_cache = self._open_feature_cache(cache_dir)
        self._shapes: dict[str, tuple[int, ...]] | None = None

    def _open_feature_cache(self, cache_dir: Path | None) -> FeatureCache | None:
        budget_mb = self.fleet.training.feature_cache_mb
        if self.fleet.model.backbone != "efficientnet_lite0" or budget_mb == 0:
            return None
        if isinstance(self.method, ClosedForm):  # each row crosses the trunk once, ever
            return None
        if cache_dir is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="fedfmx-features-")
            cache_dir = Path(self._scratch.name)
        trunk = backbone_id(self.fleet.model.trunk_input_size)
        if self.trunk is not None:
            trunk = self.trunk.feature_id
        return FeatureCache(cache_dir, trunk, budget_mb * 2**20)

    def _model_input(self, network: FedFMXModel, images: np.ndarray) -> torch.Tensor:
        """What the network is fed: the images, or their trunk features from the cache (rows
        that already are trunk features, from a features-only sample store, pass as they are)."""
        if images.ndim == 2:
            return torch.from_numpy(images)
        if self.feature_cache is None or not isinstance(network.backbone, PretrainedBackbone):
            return torch.from_numpy(images)
        if len(images) == 0:
            return torch.empty(0, TRUNK_FEATURES)
        compute = trunk_feature_fn(network.backbone) if self.trunk is None else self.trunk.features
        return torch.from_numpy(self.feature_cache.features(images, compute))

    def check_model(self, model: ModelHeader, weights: Arrays) -> None:
        """ProtocolError unless `weights` fit this fleet's network (`check_model_tensors`)."""
        if self._shapes is None:
            reference = build_model(self.fleet.network, self.fleet.routing, 0, self.fleet.seed)
            self._shapes = {
                name: tuple(value.shape) for name, value in reference.state_dict().items()
            }
        check_model_tensors(model, weights, self._shapes, self.fleet, self.device_id)

    def handle_round(
        self, announcement: RoundAnnouncement, model: ModelHeader, weights: Arrays
    ) -> bytes | None:
        """Train on what the stream holds at this round and return the encoded update.

        Returns None when this device has not met its first task yet (class misalignment).
        """
        position = self.stream.position(announcement.round)
        if position.task is None:
            return None
        network = build_model(
            self.fleet.network, self.fleet.routing, len(model.class_names), self.fleet.seed
        )
        load_numpy_state(network, weights)
        if position.task != self.state.task and len(self.state.held):
            self._close_task(network)
        self.state.task = position.task
        self.state.held = self.stream.available(announcement.round)
        if isinstance(self.method, ClosedForm):
            return self._statistics_update(announcement, model, weights, network)
        held_x, held_names = self.samples.rows(self.state.held)
        old_x, old_names = self.exemplars.arrays()
        local_names = _local_class_names(model.class_names, held_names, old_names)
        network.grow_head(len(local_names))
        index = {name: i for i, name in enumerate(local_names)}
        data = LocalData(
            x_new=self._model_input(network, held_x),
            y_new=torch.tensor([index[n] for n in held_names], dtype=torch.long),
            x_old=self._model_input(network, old_x),
            y_old=torch.tensor([index[n] for n in old_names], dtype=torch.long),
        )
        del held_x  # with a feature cache, the held images are gone before training starts
        context = LocalContext(
            model=network,
            data=data,
            fleet=self.fleet,
            old_fisher=self.state.old_fisher,
            anchor=self.state.anchor,
            teacher=self._teacher(),
            fleet_usage=torch.tensor(announcement.expert_usage, dtype=torch.float32),
            train_backbone=announcement.train_backbone,
            generator=self.generator,
        )
        outcome = self.method.train(context)
        tensors, header = self._update(
            announcement, model, weights, network, outcome, local_names, data
        )
        encoded = encode_update(header, tensors, self.state.residual)
        self.state.residual = dict(encoded.residual)
        return encoded.payload

    def _statistics_update(
        self,
        announcement: RoundAnnouncement,
        model: ModelHeader,
        weights: Arrays,
        network: FedFMXModel,
    ) -> bytes | None:
        """A closed-form head's update (`fedfmx.device.round.statistics_update`), its features
        computed by the network (the trunk's from the cache when there is one)."""

        def features(images: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return network.closed_form_features(self._model_input(network, images)).numpy()

        round_ = StatisticsRound(self.device_id, announcement, model, weights, self.fleet)
        return statistics_update(round_, self.state, self.samples, features)

    def local_rows(self) -> LocalRows:
        """Everything the device holds now: the current task's rows, then its exemplars."""
        old_x, old_names = self.exemplars.arrays()
        rows = LocalRows(*self.samples.rows(self.state.held))
        if not len(old_x):
            return rows
        return LocalRows(np.concatenate([rows.x, old_x]), np.concatenate([rows.names, old_names]))

    def _teacher(self) -> FedFMXModel | None:
        if self.state.teacher is None:
            return None
        classes = self.state.teacher[HEAD_WEIGHT].shape[0]
        teacher = build_model(self.fleet.network, self.fleet.routing, classes, self.fleet.seed)
        load_numpy_state(teacher, self.state.teacher)
        return teacher.eval()

    def _close_task(self, network: FedFMXModel) -> None:
        """On meeting a new task: keep exemplars of the old one, fold its Fisher in, and keep
        the current model as the distillation teacher (for the methods that use them)."""
        held_x, held_names = self.samples.rows(self.state.held)
        names = self.method.fisher_names(network, self.fleet)
        if names:
            old_x, _ = self.exemplars.arrays()
            pick = torch.randperm(len(held_x) + len(old_x), generator=self.generator)
            pick = pick[: self.fleet.fedfmx.fisher_samples]
            # rows `pick` of concat(held_x, old_x), gathered without building it
            parts = [torch.from_numpy(held_x), torch.from_numpy(old_x)]
            sample = gather_rows(parts, pick).numpy()
            fresh = diagonal_fisher(
                network, self._model_input(network, sample), names, self.generator
            )
            params = dict(network.named_parameters())
            self.state.anchor = {name: params[name].detach().clone() for name in names}
            self.state.old_fisher = accumulate_fisher(
                self.state.old_fisher, fresh, self.fleet.fedfmx.fisher_decay
            )
        if self.method.uses_teacher:
            self.state.teacher = state_to_numpy(network)
        self.exemplars.add(held_x, held_names)

    def _update(
        self,
        announcement: RoundAnnouncement,
        model: ModelHeader,
        base: Arrays,
        network: FedFMXModel,
        outcome: LocalOutcome,
        local_names: list[str],
        data: LocalData,
    ) -> tuple[Arrays, UpdateHeader]:
        """Deltas of what the method trained, head rows of the classes held, and the header."""
        trained = {name: value.detach().numpy() for name, value in network.state_dict().items()}
        tensors = {name: trained[name] - base[name] for name in outcome.sent}
        if outcome.merge_fisher:
            tensors |= {
                FISHER_PREFIX + name: value.numpy() for name, value in outcome.merge_fisher.items()
            }
        labels = torch.cat([data.y_new, data.y_old]).numpy()
        held = sorted(set(labels.tolist()))
        counts = np.bincount(labels, minlength=len(local_names))
        known = len(model.class_names)
        rows = trained[HEAD_WEIGHT][held].copy()
        for i, class_id in enumerate(held):
            if (
                class_id < known
            ):  # registered class: delta against the global row; new: against zero
                rows[i] -= base[HEAD_WEIGHT][class_id]
        tensors[HEAD_ROWS] = rows
        header = UpdateHeader(
            fleet=announcement.fleet,
            device_id=self.device_id,
            round=announcement.round,
            base_version=model.version,
            num_samples=len(labels),
            expert_ids=outcome.expert_ids,
            head_classes=[local_names[c] for c in held],
            class_counts=[int(counts[c]) for c in held],
            expert_usage=outcome.result.usage.tolist(),
            includes_backbone=any(name.startswith("backbone.") for name in outcome.sent),
            includes_fisher=bool(outcome.merge_fisher),
            codec=self.fleet.uplink_codec,
            train_loss=outcome.result.loss,
        )
        return tensors, header


def _local_class_names(registry: list[str], *held: np.ndarray) -> list[str]:
    """The fleet's registry, then the classes this device holds that are not registered yet."""
    known = set(registry)
    fresh = sorted({str(name) for names in held for name in names} - known)
    return [*registry, *fresh]
