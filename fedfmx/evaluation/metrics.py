"""Class-incremental metrics over the accuracy matrix `a[t][j]`.

`a[t][j]` is the accuracy on task j's test classes after training on task t (j <= t; entries
with j > t are not defined and not stored: row t has t+1 entries).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedfmx.learner.model import FedFMXModel

AccuracyMatrix = list[list[float]]


def final_accuracy(seen_accuracy: Sequence[float]) -> float:
    """Accuracy on all classes seen so far, after the last task."""
    return float(seen_accuracy[-1])


def average_incremental_accuracy(seen_accuracy: Sequence[float]) -> float:
    """`Ā = (1/T)·Σ_t A_t`, `A_t` the accuracy on all classes seen up to task t (Rebuffi et al.)."""
    return float(np.mean(seen_accuracy))


def forgetting(matrix: AccuracyMatrix) -> float:
    """Chaudhry et al. 2018: `F = (1/(T−1))·Σ_{j<T−1} (max_{t<T−1} a[t][j] − a[T−1][j])`.

    The mean over old tasks of how far the final accuracy fell below the best ever reached;
    0 with a single task.
    """
    last = len(matrix) - 1
    if last < 1:
        return 0.0
    drops = [max(matrix[t][j] for t in range(j, last)) - matrix[last][j] for j in range(last)]
    return float(np.mean(drops))


def backward_transfer(matrix: AccuracyMatrix) -> float:
    """Lopez-Paz & Ranzato 2017: `BWT = (1/(T−1))·Σ_{j<T−1} (a[T−1][j] − a[j][j])`.

    Negative values mean forgetting.
    """
    last = len(matrix) - 1
    if last < 1:
        return 0.0
    return float(np.mean([matrix[last][j] - matrix[j][j] for j in range(last)]))


@torch.no_grad()
def predict(model: FedFMXModel, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Top-1 global class ids."""
    model.eval()
    return torch.cat(
        [
            model(x[start : start + batch_size]).argmax(dim=1)
            for start in range(0, len(x), batch_size)
        ]
    )


def accuracy(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of rows where the prediction equals the target (target −1 = class never learnt)."""
    if len(target) == 0:
        return 0.0
    return float((predicted == target).float().mean())
