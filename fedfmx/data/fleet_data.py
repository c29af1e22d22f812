"""A fleet's data set and how the seeded plan deals it to devices: numpy only, so a device
without torch (`edge_client.sources.partition`) loads its share as the simulation does."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedfmx.config import FleetConfig
from fedfmx.data.datasets import ImageDataset, load_dataset, subsample
from fedfmx.data.stream import ArraySamples, IncrementalPlan, OwnRowsStream


def load_fleet_dataset(fleet: FleetConfig) -> ImageDataset:
    """The fleet's data set, sliced to the configured per-class caps (and split for tuning)."""
    data = fleet.data
    dataset = load_dataset(data.dataset, data.path)
    if data.validation_fraction is not None:
        dataset = holdout_validation(dataset, data.validation_fraction, fleet.seed)
    if data.train_per_class is None and data.test_per_class is None:
        return dataset
    return subsample(dataset, data.train_per_class, data.test_per_class, fleet.seed)


def holdout_validation(dataset: ImageDataset, fraction: float, seed: int) -> ImageDataset:
    """Replace the test set by a seeded per-class slice of the training set (for tuning)."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(dataset.train_y), dtype=bool)
    for label in np.unique(dataset.train_y):
        rows = np.flatnonzero(dataset.train_y == label)
        held[rng.choice(rows, size=max(1, int(fraction * len(rows))), replace=False)] = True
    return replace(
        dataset,
        train_x=dataset.train_x[~held],
        train_y=dataset.train_y[~held],
        test_x=dataset.train_x[held],
        test_y=dataset.train_y[held],
    )


def make_plan(fleet: FleetConfig, dataset: ImageDataset) -> IncrementalPlan:
    protocol = fleet.protocol
    return IncrementalPlan.build(
        dataset.train_y,
        len(dataset.class_names),
        protocol.num_tasks,
        protocol.num_clients,
        protocol.alpha,
        protocol.max_lag,
        protocol.rounds_per_task,
        fleet.seed,
        lags=protocol.lags,
    )


def own_partition(
    fleet: FleetConfig, dataset: ImageDataset, client: int
) -> tuple[ArraySamples, OwnRowsStream]:
    """Client `client`'s rows of the fleet plan, copied out of `dataset` (a device keeps its
    own rows only), and its stream over them."""
    stream = OwnRowsStream(make_plan(fleet, dataset).stream(client, fleet.seed))
    names = np.array(dataset.class_names)[dataset.train_y[stream.rows]]
    return ArraySamples(dataset.train_x[stream.rows].copy(), names), stream
