"""FRES for the closed-form head: which expert blocks of `φ = [φ_0; φ_1; …]` earn a place.

In the exact ridge head nothing is trained, so FRES cannot decide which expert *learns*; it
decides which expert block the head may *use*. It keeps the paper's shape, plasticity gain on the
newest task's classes minus a Fisher-weighted stability cost on the old ones, measured exactly
from the statistics of held-out folds of devices (`fedfmx.closed_form.head.choose_lambda`'s folds),
with no image and no test row.

For fold `k` held out, `W_S` is the head fitted (`solve_head`) on the other folds' sums using the
blocks `S` only (zero weights elsewhere). The held-out squared error of class column `c`,

    `E_c(W; k) = w_cᵀ G_k w_c − 2 w_cᵀ q_{c,k} + n_{c,k}`,

is exact from fold `k`'s statistics and sums over columns to `analytic.squared_error`. With `A`
every block and `N` / `O` the newest / older classes, block `b` scores

    `P_b = Σ_k Σ_{c∈N} [E_c(W_{A∖b}; k) − E_c(W_A; k)]`                (plasticity gain)
    `S_b = Σ_k Σ_{c∈O} [E_c(W_A; k) − E_c(W_{A∖b}; k)]`
        `= Σ_k Σ_{c∈O} [Δ_cᵀ G_k Δ_c + 2 Δ_cᵀ (G_k w_c^{A∖b} − q_{c,k})]`   (stability cost)
    `u_b = (P_b − β·S_b) / Σ_k N_k`,

with `Δ_c = w_c^{A} − w_c^{A∖b}` the change block `b` makes to an old class's head column. For a
linear head under squared loss the Fisher (the Hessian of the loss in `w_c`, up to the factor 2)
*is* `G`, so `Δᵀ G_k Δ` is the Fisher-weighted drift of EWC, and the loss being quadratic makes the
expansion exact. Blocks with `u_b > 0` are kept; `φ_0`, the shared block, always is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedfmx.closed_form.head import FeatureStatistics, merged, moment_matrix


def _sub_head(
    stats: FeatureStatistics, q: np.ndarray, columns: np.ndarray, lam: float
) -> np.ndarray:
    """`(G_SS + λI)⁻¹ Q_S` padded with zero rows outside `S`: a head [d, C] on blocks `S`."""
    system = stats.gram[np.ix_(columns, columns)] + lam * np.eye(len(columns))
    head = np.zeros_like(q)
    head[columns] = np.linalg.solve(system, q[columns])
    return head


def _class_errors(
    head: np.ndarray, held: FeatureStatistics, q_held: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """`E_c(W; k)` per class column [C] from the held-out fold's statistics."""
    fit = np.einsum("ic,ij,jc->c", head, held.gram, head)
    return fit - 2.0 * np.sum(head * q_held, axis=0) + counts


def fres_block_scores(
    folds: Sequence[FeatureStatistics],
    blocks: Sequence[slice],
    class_names: Sequence[str],
    newest: Sequence[str],
    lam: float,
    beta: float = 1.0,
) -> np.ndarray:
    """`u_b` (module docstring) of every block in `blocks` [B]; needs two folds with rows."""
    filled = [fold for fold in folds if fold.samples > 0]
    if len(filled) < 2:
        raise ValueError("FRES needs at least two folds with rows")
    dim = filled[0].dim
    total = merged(filled, dim)
    is_new = np.array([name in set(newest) for name in class_names])
    every = np.arange(dim)
    without = [np.setdiff1d(every, every[block]) for block in blocks]
    plasticity = np.zeros(len(blocks))
    stability = np.zeros(len(blocks))
    for held in filled:
        rest = total.copy()
        rest.gram -= held.gram
        q_rest = moment_matrix(total, class_names) - moment_matrix(held, class_names)
        q_held = moment_matrix(held, class_names)
        counts = np.array([held.counts.get(name, 0) for name in class_names], dtype=np.float64)
        error_all = _class_errors(_sub_head(rest, q_rest, every, lam), held, q_held, counts)
        for b, columns in enumerate(without):
            error_less = _class_errors(_sub_head(rest, q_rest, columns, lam), held, q_held, counts)
            plasticity[b] += float(np.sum((error_less - error_all)[is_new]))
            stability[b] += float(np.sum((error_all - error_less)[~is_new]))
    rows = sum(fold.samples for fold in filled)
    scores: np.ndarray = (plasticity - beta * stability) / rows
    return scores


def fres_keep(scores: np.ndarray) -> np.ndarray:
    """The blocks FRES keeps: those with a positive score (a boolean mask [B])."""
    kept: np.ndarray = scores > 0
    return kept
