"""Class-incremental metrics on a hand-written accuracy matrix."""

import math

import torch

from fedfmx.evaluation.metrics import (
    accuracy,
    average_incremental_accuracy,
    backward_transfer,
    final_accuracy,
    forgetting,
)

MATRIX = [[0.9], [0.5, 0.8], [0.4, 0.6, 0.7]]


def test_forgetting_is_mean_drop_from_best() -> None:
    # task 0: best 0.9, final 0.4 → 0.5; task 1: best 0.8, final 0.6 → 0.2
    assert math.isclose(forgetting(MATRIX), 0.35)


def test_backward_transfer_compares_final_with_just_learnt() -> None:
    assert math.isclose(backward_transfer(MATRIX), ((0.4 - 0.9) + (0.6 - 0.8)) / 2)


def test_single_task_has_no_forgetting() -> None:
    assert forgetting([[0.8]]) == 0.0
    assert backward_transfer([[0.8]]) == 0.0


def test_average_incremental_and_final_accuracy() -> None:
    seen = [0.9, 0.6, 0.55]
    assert math.isclose(average_incremental_accuracy(seen), 2.05 / 3)
    assert final_accuracy(seen) == 0.55


def test_accuracy_counts_unlearnt_targets_as_wrong() -> None:
    predicted = torch.tensor([0, 1, 2, 2])
    target = torch.tensor([0, 1, -1, 3])
    assert accuracy(predicted, target) == 0.5
