"""Feature statistics on the wire and in the fleet's model, numpy only.

**On the wire** (an update whose header says `includes_statistics`): `stats.gram` is the upper
triangle of the *mean* Gram matrix `G/N` (`N` the update's rows) in `triangle_shape(d)` blocks,
and `stats.moments` one row per `head_classes` entry, the class mean `q_c/n_c`; the counts
`n_c` are the header's `class_counts`. Means are bounded whatever `N` is, so the fp16 and int8
codecs of `fedfmx.wire.codec` apply to them as to any tensor; the receiver multiplies the counts
back. A device sends the statistics of the rows it has not sent before, and nothing in a round
without new rows.

An update of fewer rows than `(d + 1)/2` carries, instead of the triangle, `stats.factor`: the
exact factor `F/√N` [r, d] of the same mean Gram matrix
(`G = FᵀF`, `fedfmx.closed_form.head.gram_factor`, `r ≤ N` rows; the header's `factor_rank` is `r`),
`d·r` values instead of `d(d+1)/2`. The receiver forms `G = N·(F/√N)ᵀ(F/√N)` and validates it as any
Gram matrix.

**In the model** the fleet's running sums are kept per fold of devices (a device's fold is a
hash of its id) beside the weights, so they persist and resume with the model version:
`analytic.fold<k>.gram` (packed triangle of `G`), `analytic.fold<k>.moments` ([C, d], rows in
registry order), `analytic.fold<k>.counts` ([C]) and `analytic.lambda` (the `λ` in use). The
folds give `choose_lambda` held-out devices; the head is solved on their sum. The sums stay on
the aggregator: a device needs the head, the candidates and its row count, never the fleet's
`G` (d²/2 float64 per fold, ~34 MB at d = 2,048), so `device_view` drops them from the
version the devices are sent.

`λ` is chosen by *prequential* accuracy: the model also carries the head of every candidate
`λ` (`analytic.candidates`, [L, C, d]); before a device adds rows to the sums it counts, for
each candidate, how many of those rows it classifies right (`UpdateHeader.lambda_hits`). The
rows are not in the sums the candidates were fitted on, so this is held-out accuracy on
training data the fleet has not merged yet (never the test set). The fleet's running totals
(`analytic.hits`) pick `λ`; before any hit is counted, the held-out-fold squared error does.

`analytic.rows.<device>` counts the rows of each device the sums hold. A device reads it from
the model it starts from and sends the statistics of its rows after that many (saying so in
`rows_before`), so an update lost on the way (a round closed at its deadline without it) is
sent again in the next round, and none is ever counted twice.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from fedfmx.closed_form.head import (
    CLOSED_FORM_PREFIX,
    FeatureStatistics,
    choose_lambda,
    factor_problem,
    factor_rank_problem,
    merged,
    pack_triangle,
    ridge_scale,
    solve_head,
    statistics_problem,
    triangle_shape,
    unpack_triangle,
)
from fedfmx.config import AnalyticConfig
from fedfmx.errors import ProtocolError
from fedfmx.wire.messages import UpdateHeader

GRAM = "stats.gram"
FACTOR = "stats.factor"
MOMENTS = "stats.moments"
LAMBDA = CLOSED_FORM_PREFIX + "lambda"
CANDIDATES = CLOSED_FORM_PREFIX + "candidates"
HITS = CLOSED_FORM_PREFIX + "hits"
ROWS_PREFIX = CLOSED_FORM_PREFIX + "rows."
FLEET_SUMS_PREFIX = CLOSED_FORM_PREFIX + "fold"
HEAD_WEIGHT = "head.weight"

Arrays = dict[str, np.ndarray]


def class_means(
    moments: Mapping[str, np.ndarray], counts: Mapping[str, int], head_classes: Sequence[str]
) -> np.ndarray:
    """`stats.moments`: the class means `q_c/n_c` [C, d] in `head_classes` order, float32."""
    return np.stack([moments[name] / counts[name] for name in head_classes]).astype(np.float32)


def statistics_tensors(stats: FeatureStatistics, head_classes: Sequence[str]) -> Arrays:
    """An update's statistics tensors with `G`'s triangle (module docstring); every class has
    rows."""
    packed = pack_triangle(stats.gram)  # half of G, divided in place: no second d×d copy
    packed /= stats.samples
    return {
        GRAM: packed.astype(np.float32),
        MOMENTS: class_means(stats.moments, stats.counts, head_classes),
    }


def factor_tensors(
    factor: np.ndarray,
    moments: Mapping[str, np.ndarray],
    counts: Mapping[str, int],
    head_classes: Sequence[str],
) -> Arrays:
    """An update's statistics tensors with `G`'s exact factor `F` (`G = FᵀF`, [r, d]) instead
    of its triangle, sent as `F/√N` so that it is bounded whatever `N` is, as the mean is."""
    rows = sum(counts[name] for name in head_classes)
    return {
        FACTOR: (factor / np.sqrt(rows)).astype(np.float32),
        MOMENTS: class_means(moments, counts, head_classes),
    }


def statistics_shapes(header: UpdateHeader, dim: int) -> dict[str, tuple[int, ...]]:
    """The tensors a statistics update must carry, and their shapes (ProtocolError for a
    factor rank no `num_samples` rows can have)."""
    moments = (len(header.head_classes), dim)
    if not header.factor_rank:
        return {GRAM: triangle_shape(dim), MOMENTS: moments}
    problem = factor_rank_problem(header.factor_rank, header.num_samples, dim)
    if problem is not None:
        raise ProtocolError(f"statistics rejected: {problem}")
    return {FACTOR: (header.factor_rank, dim), MOMENTS: moments}


def gram_of_update(
    header: UpdateHeader, tensors: Mapping[str, np.ndarray], dim: int, limits: AnalyticConfig
) -> np.ndarray:
    """`G` [d, d] float64 from an update's triangle (`N·G/N`) or factor (`N·(F/√N)ᵀ(F/√N)`);
    ProtocolError for a malformed triangle or a factor `factor_problem` refuses."""
    rows = header.num_samples
    if not header.factor_rank:
        try:
            return unpack_triangle(tensors[GRAM], dim) * rows
        except ValueError as error:
            raise ProtocolError(f"statistics: {error}") from None
    factor = np.asarray(tensors[FACTOR], dtype=np.float64) * np.sqrt(rows)
    problem = factor_problem(factor, rows, dim, limits.max_feature_norm)
    if problem is not None:
        raise ProtocolError(f"statistics rejected: {problem}")
    gram: np.ndarray = factor.T @ factor
    return gram


def statistics_of_update(
    header: UpdateHeader, tensors: Mapping[str, np.ndarray], dim: int, limits: AnalyticConfig
) -> FeatureStatistics:
    """Decoded tensors back to sums, validated (`statistics_problem`); ProtocolError if not."""
    if len(set(header.head_classes)) != len(header.head_classes):
        raise ProtocolError("statistics name a class twice")
    if header.num_samples != sum(header.class_counts):
        raise ProtocolError(
            f"num_samples {header.num_samples} is not the sum of class_counts "
            f"{sum(header.class_counts)}"
        )
    gram = gram_of_update(header, tensors, dim, limits)
    rows = np.asarray(tensors[MOMENTS], dtype=np.float64)
    counts = dict(zip(header.head_classes, header.class_counts, strict=True))
    moments = {name: rows[i] * counts[name] for i, name in enumerate(header.head_classes)}
    stats = FeatureStatistics(gram, moments, counts)
    problem = statistics_problem(stats, dim, limits.max_feature_norm, limits.max_samples)
    if problem is not None:
        raise ProtocolError(f"statistics rejected: {problem}")
    return stats


def device_view(weights: Mapping[str, np.ndarray]) -> Arrays:
    """The model's tensors a device is sent: all but the fleet's sums (module docstring)."""
    return {n: np.asarray(v) for n, v in weights.items() if not n.startswith(FLEET_SUMS_PREFIX)}


def rows_held(weights: Mapping[str, np.ndarray], device_id: str) -> int:
    """How many of the device's rows the fleet's sums hold."""
    count = weights.get(ROWS_PREFIX + device_id)
    return 0 if count is None else round(float(np.asarray(count).reshape(-1)[0]))


def fold_of(device_id: str, folds: int) -> int:
    """The fold of a device: a stable hash of its id (the same after any restart)."""
    return zlib.crc32(device_id.encode()) % folds


def fleet_folds(
    weights: Mapping[str, np.ndarray], registry: Sequence[str], folds: int
) -> list[FeatureStatistics]:
    """The fleet's per-fold sums stored beside the weights (empty sums before the first)."""
    dim = weights[HEAD_WEIGHT].shape[1]
    result = []
    for k in range(folds):
        prefix = f"{FLEET_SUMS_PREFIX}{k}."
        if prefix + "gram" not in weights:
            result.append(FeatureStatistics.empty(dim))
            continue
        moments = np.asarray(weights[prefix + "moments"], dtype=np.float64)
        counts = np.asarray(weights[prefix + "counts"])
        stats = FeatureStatistics(unpack_triangle(np.asarray(weights[prefix + "gram"]), dim))
        for name, moment, count in zip(registry, moments, counts, strict=False):
            if count > 0:
                stats.moments[name] = moment
                stats.counts[name] = round(float(count))
        result.append(stats)
    return result


def refit(
    weights: Mapping[str, np.ndarray],
    registry: Sequence[str],
    round_folds: Sequence[FeatureStatistics],
    round_rows: Mapping[str, int],
    round_hits: np.ndarray,
    analytic: AnalyticConfig,
) -> Arrays:
    """The next version's weights: the round's sums folded into the fleet's, `λ` chosen on
    held-out accuracy, and `head.weight` solved from the total (`W = (G + λI)⁻¹Q`);
    `round_rows` are the rows each device added this round, `round_hits` their devices'
    prequential hits per candidate `λ` (module docstring)."""
    folds = fleet_folds(weights, registry, analytic.folds)
    for fleet_fold, fresh in zip(folds, round_folds, strict=True):
        fleet_fold.add(fresh)
    state = {
        n: v
        for n, v in weights.items()
        if not n.startswith(CLOSED_FORM_PREFIX) or n.startswith(ROWS_PREFIX)
    }
    for device, rows in round_rows.items():
        state[ROWS_PREFIX + device] = np.array([float(rows_held(weights, device) + rows)])
    for k, fold in enumerate(folds):
        prefix = f"{FLEET_SUMS_PREFIX}{k}."
        state[prefix + "gram"] = pack_triangle(fold.gram)
        state[prefix + "moments"] = (
            np.stack([fold.moments.get(n, np.zeros(fold.dim)) for n in registry])
            if registry
            else np.zeros((0, fold.dim))
        )
        state[prefix + "counts"] = np.array(
            [float(fold.counts.get(n, 0)) for n in registry], dtype=np.float64
        )
    total = merged(folds, folds[0].dim)
    if total.samples == 0:
        return state | {HEAD_WEIGHT: np.asarray(weights[HEAD_WEIGHT])}
    hits = np.asarray(weights.get(HITS, np.zeros(len(analytic.lambdas)))) + round_hits
    state[HITS] = hits
    scale = ridge_scale(total)
    candidates = [solve_head(total, registry, s * scale) for s in analytic.lambdas]
    state[CANDIDATES] = np.stack(candidates).astype(np.float32)
    if hits.sum() > 0:
        best = int(np.argmax(hits))
        lam, head = analytic.lambdas[best] * scale, candidates[best]
    else:
        lam = choose_lambda(folds, registry, analytic.lambdas) or analytic.default_lambda * scale
        head = solve_head(total, registry, lam)
    state[LAMBDA] = np.array([lam])
    state[HEAD_WEIGHT] = head.astype(np.float32)
    return state


def prequential_hits(
    weights: Mapping[str, np.ndarray],
    registry: Sequence[str],
    features: np.ndarray,
    names: Sequence[str],
) -> np.ndarray:
    """Per candidate `λ`: how many of these rows (not yet in the sums) its head gets right."""
    heads = weights.get(CANDIDATES)
    if heads is None or not len(registry):
        return np.zeros(0, dtype=np.int64)
    index = {name: i for i, name in enumerate(registry)}
    truth = np.array([index.get(name, -1) for name in names])
    predicted = np.argmax(np.einsum("nd,lcd->lnc", features, heads), axis=2)
    return (predicted == truth[None, :]).sum(axis=1)
