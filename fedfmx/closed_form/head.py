"""Closed-form (ridge) head statistics, numpy only: the exact federated head.

A linear head `W` on fixed features `φ(x) ∈ ℝᵈ` fitted by ridge regression onto one-hot targets
needs only two sums over the data (ACIL, RanPAC NeurIPS'23, Analytic Federated Learning):

- the Gram matrix `G = Σ_n φ(x_n)φ(x_n)ᵀ` (d×d, symmetric positive semi-definite);
- the per-class first moments `q_c = Σ_{n: y_n=c} φ(x_n)`, i.e. the columns of `Q = Σ φ yᵀ`;

and the counts `n_c`. Sums are associative and commutative, so the head solved from the merged
sums, `W = (G + λI)⁻¹ Q`, is *exactly* the head fitted on the pooled data, whatever the non-IID
split over devices, the order updates arrive in, or the order tasks came in. Classes are keyed by
*name* (the fleet's registry assigns ids later), so misaligned devices merge without agreeing on
ids first.

Everything here is float64: the solve is where rounding would show.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

CLOSED_FORM_PREFIX = "analytic."
"""Names of the fleet's summed statistics kept beside a model's weights
(`fedfmx.closed_form.state`): part of the model version, so they persist and resume with it; never
loaded into a network."""
SYMMETRY_TOLERANCE = 1e-6
"""Largest `|G − Gᵀ|` allowed, relative to `max |G|`."""
PSD_TOLERANCE = 1e-2
"""Slack of the Cauchy–Schwarz checks, relative to the largest diagonal entry (int8 wire
rounding is below 0.4 % of a block's largest value)."""


@dataclass
class FeatureStatistics:
    """`G`, `q_c` and `n_c` of some rows: one device's round, a district's, or the fleet's."""

    gram: np.ndarray
    """`Σ φφᵀ`, float64 [d, d]."""
    moments: dict[str, np.ndarray] = field(default_factory=dict)
    """Class name -> `q_c = Σ_{y=c} φ`, float64 [d]."""
    counts: dict[str, int] = field(default_factory=dict)
    """Class name -> `n_c`."""

    @classmethod
    def empty(cls, dim: int) -> FeatureStatistics:
        return cls(np.zeros((dim, dim)))

    @classmethod
    def of(cls, features: np.ndarray, names: Sequence[str]) -> FeatureStatistics:
        """The statistics of rows `features` [n, d] labelled by class `names` [n]."""
        phi = np.asarray(features, dtype=np.float64)
        labels = np.asarray(names)
        if phi.ndim != 2 or len(labels) != len(phi):
            raise ValueError(f"features {phi.shape} and {len(labels)} names do not line up")
        stats = cls(phi.T @ phi)
        add_class_sums(stats.moments, stats.counts, phi, names)
        return stats

    @property
    def dim(self) -> int:
        return int(self.gram.shape[0])

    @property
    def samples(self) -> int:
        return sum(self.counts.values())

    def add(self, other: FeatureStatistics) -> None:
        """Fold another set of sums in (associative, commutative); `gram` is added in place."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        self.gram += other.gram
        for name, moment in other.moments.items():
            self.moments[name] = self.moments.get(name, 0.0) + moment
            self.counts[name] = self.counts.get(name, 0) + other.counts[name]

    def add_rows(self, features: np.ndarray, names: Sequence[str]) -> None:
        """Add rows `features` [n, d] labelled `names` in place: `G += ΦᵀΦ`, `q_c += Σ φ`.

        The product is taken in the rows' own precision (float32 on a device: a d×d temporary
        of half the size) and accumulated in float64.
        """
        if features.ndim != 2 or features.shape[1] != self.dim or len(names) != len(features):
            raise ValueError(f"rows {features.shape} do not fit statistics of dimension {self.dim}")
        self.gram += features.T @ features
        add_class_sums(self.moments, self.counts, features, names)

    def copy(self) -> FeatureStatistics:
        return FeatureStatistics(
            self.gram.copy(),
            {n: m.copy() for n, m in self.moments.items()},
            dict(self.counts),
        )


def add_class_sums(
    moments: dict[str, np.ndarray],
    counts: dict[str, int],
    features: np.ndarray,
    names: Sequence[str],
) -> None:
    """`q_c += Σ_{y=c} φ` (accumulated in float64) and `n_c += |{n: y_n = c}|`, in place."""
    labels = np.asarray(names)
    for name in sorted(set(labels.tolist())):
        rows = labels == name
        key = str(name)
        moments[key] = moments.get(key, 0.0) + features[rows].sum(axis=0, dtype=np.float64)
        counts[key] = counts.get(key, 0) + int(rows.sum())


def merged(parts: Iterable[FeatureStatistics], dim: int) -> FeatureStatistics:
    """The sum of every part (an empty sum of dimension `dim` when there is none)."""
    total = FeatureStatistics.empty(dim)
    for part in parts:
        total.add(part)
    return total


def moment_matrix(stats: FeatureStatistics, class_names: Sequence[str]) -> np.ndarray:
    """`Q` [d, C] in the order of `class_names` (zero columns for classes without rows)."""
    columns = [stats.moments.get(name, np.zeros(stats.dim)) for name in class_names]
    return np.stack(columns, axis=1) if columns else np.zeros((stats.dim, 0))


def solve_head(stats: FeatureStatistics, class_names: Sequence[str], lam: float) -> np.ndarray:
    """The ridge head `Wᵀ = ((G + λI)⁻¹ Q)ᵀ` [C, d], one row per name in `class_names`.

    It minimises `Σ_n ‖Wᵀφ(x_n) − e_{y_n}‖² + λ‖W‖²_F` over every row the sums came from;
    `λ > 0` makes `G + λI` positive definite, so the solve is well posed for any `G`.
    """
    if lam <= 0:
        raise ValueError(f"the ridge λ must be positive, got {lam}")
    system = stats.gram + lam * np.eye(stats.dim)
    solution: np.ndarray = np.linalg.solve(system, moment_matrix(stats, class_names))
    return solution.T


def squared_error(head: np.ndarray, stats: FeatureStatistics, class_names: Sequence[str]) -> float:
    """`Σ_n ‖Wᵀφ_n − e_{y_n}‖²` on the rows behind `stats`, from the statistics alone:

    `tr(Wᵀ G W) − 2·tr(Wᵀ Q) + N` with `W = headᵀ` [d, C], `N = Σ_c n_c` (classes of `stats`
    missing from `class_names` predict zero, so they add `n_c` each, as the last term does).
    """
    w = head.T
    fit = float(np.einsum("ic,ij,jc->", w, stats.gram, w))
    cross = float(np.sum(w * moment_matrix(stats, class_names)))
    return fit - 2.0 * cross + stats.samples


def ridge_scale(stats: FeatureStatistics) -> float:
    """`tr(G)/d`, the mean eigenvalue of `G`: the unit `λ` candidates are measured in."""
    return max(float(np.trace(stats.gram)) / max(stats.dim, 1), 1e-12)


def choose_lambda(
    folds: Sequence[FeatureStatistics], class_names: Sequence[str], relative: Sequence[float]
) -> float | None:
    """`λ` by cross-validation over folds of *devices*: for each candidate `s·tr(G)/d`, fit on
    all folds but one and measure `squared_error` on the one left out; the least total wins.

    Needs two folds with rows; returns None otherwise (the caller falls back to its default).
    Only training statistics enter: the test set is never read.
    """
    filled = [fold for fold in folds if fold.samples > 0]
    if len(filled) < 2:
        return None
    total = merged(filled, filled[0].dim)
    scale = ridge_scale(total)
    best: tuple[float, float] | None = None
    for factor in relative:
        lam = factor * scale
        error = 0.0
        for held in filled:
            rest = total.copy()
            rest.gram = rest.gram - held.gram
            for name, moment in held.moments.items():
                rest.moments[name] = rest.moments[name] - moment
                rest.counts[name] -= held.counts[name]
            error += squared_error(solve_head(rest, class_names, lam), held, class_names)
        if best is None or error < best[0]:
            best = (error, lam)
    assert best is not None
    return best[1]


# --- compact form of a symmetric matrix --------------------------------------------------------


def triangle_shape(dim: int) -> tuple[int, int]:
    """The upper triangle's `d(d+1)/2` values as `⌈d/2⌉` blocks of `d+1` (zero-padded): a
    rectangle, so every codec that works per row (int8 with a scale per row) applies to it."""
    return (math.ceil(dim / 2), dim + 1)


def pack_triangle(matrix: np.ndarray) -> np.ndarray:
    """The upper triangle of a symmetric matrix, row by row, in `triangle_shape` blocks."""
    dim = matrix.shape[0]
    values = matrix[np.triu_indices(dim)]
    rows, width = triangle_shape(dim)
    packed = np.zeros(rows * width, dtype=matrix.dtype)
    packed[: len(values)] = values
    return packed.reshape(rows, width)


def unpack_triangle(packed: np.ndarray, dim: int) -> np.ndarray:
    """The symmetric matrix `pack_triangle` packed; ValueError if the shape or padding is off."""
    if packed.shape != triangle_shape(dim):
        raise ValueError(f"packed triangle {packed.shape}, expected {triangle_shape(dim)}")
    flat = packed.reshape(-1).astype(np.float64)
    size = dim * (dim + 1) // 2
    if np.any(flat[size:] != 0):
        raise ValueError("packed triangle has non-zero padding")
    matrix = np.zeros((dim, dim))
    rows, cols = np.triu_indices(dim)
    matrix[rows, cols] = flat[:size]
    matrix[cols, rows] = flat[:size]
    return matrix


# --- exact low-rank factor of a round's Gram matrix ---------------------------------------------


def factor_is_smaller(rows: int, dim: int) -> bool:
    """Whether the exact factor of `n` rows' Gram matrix (`d·n` values) is smaller than its
    triangle (`d(d+1)/2`): `2n < d + 1`. At `d` = 2,048, up to 1,024 rows."""
    return 2 * rows < dim + 1


def gram_factor(features: np.ndarray) -> np.ndarray:
    """`F = Lᵀ` [r, d] with `FᵀF = ΦᵀΦ = G` exactly, for rows `Φ` [n, d].

    From the thin SVD `Φ = U S Vᵀ`: `ΦᵀΦ = V S Uᵀ U S Vᵀ = V S² Vᵀ`, so `L = V S` (row `k` of
    `F` is `σ_k v_kᵀ`). Singular values below numpy's rank tolerance (`σ_max·max(n, d)·ε`) are
    dropped (what they add to `G` is below float64 rounding), so `r ≤ min(n, d)`, and at least
    one row is kept (a zero row when every feature is zero). Each row's sign is fixed (its
    largest entry in magnitude positive): `σ_k²` and `v_k` are the eigenpairs of `G`, so `F` is
    computed from `G` alone, up to the basis within a repeated eigenvalue (docs/decisions.md).
    The SVD runs in the rows' own precision, as `FeatureStatistics.add_rows` takes `ΦᵀΦ`
    (float32 on a device: the same rounding as its triangle; float64 rows: float64).
    """
    phi = np.asarray(features)
    if not np.issubdtype(phi.dtype, np.floating):
        phi = phi.astype(np.float64)
    _, sigma, vt = np.linalg.svd(phi, full_matrices=False)
    keep = sigma > sigma.max(initial=0.0) * max(phi.shape) * np.finfo(phi.dtype).eps
    keep[:1] = True
    rows = sigma[keep, None] * vt[keep]
    signs = np.sign(rows[np.arange(len(rows)), np.abs(rows).argmax(axis=1)])
    signs[signs == 0] = 1.0
    result: np.ndarray = rows * signs[:, None]
    return result


def factor_rank_problem(rank: int, rows: int, dim: int) -> str | None:
    """Why a factor of `rank` rows cannot be the exact factor of `rows` rows' `d×d` Gram
    matrix (its rank is at most `min(rows, d)`, and a factor has at least one row), or None."""
    if not 1 <= rank <= min(rows, dim):
        return f"factor of rank {rank}, allowed 1..{min(rows, dim)} for {rows} rows of {dim}"
    return None


def factor_problem(factor: np.ndarray, rows: int, dim: int, max_feature_norm: float) -> str | None:
    """Why `factor` [r, d] cannot be the exact factor `F` (`G = FᵀF`) of `rows` real rows, or
    None: its rank (`factor_rank_problem`), finite values, and `‖F‖²_F = tr(G) ≤ N·B²`, the
    bound `statistics_problem` puts on `tr(G)`, checked before `G` is formed (so an absurd
    factor cannot overflow it). `G = FᵀF` is symmetric and positive semi-definite whatever
    `F` is; the rest of `statistics_problem` then applies to it."""
    if factor.ndim != 2 or factor.shape[1] != dim:
        return f"factor {list(factor.shape)}, expected [r, {dim}]"
    problem = factor_rank_problem(factor.shape[0], rows, dim)
    if problem is not None:
        return problem
    if not np.all(np.isfinite(factor)):
        return "factor holds non-finite values"
    with np.errstate(over="ignore"):
        trace = float(np.sum(np.square(factor)))
    return trace_problem(trace, rows, max_feature_norm)


# --- validation ---------------------------------------------------------------------------------


def statistics_problem(
    stats: FeatureStatistics, dim: int, max_feature_norm: float, max_samples: int
) -> str | None:
    """Why these statistics cannot come from real features, or None when they pass.

        Checks, in order: shape `[d, d]`; finite values; symmetry; counts non-negative, at most
        `max_samples` in all, and at least one row; a moment per counted class and none for a class
        of count 0; `G_ii ≥ 0`; the Cauchy–Schwarz bounds every Gram matrix of real rows obeys,
        `|G_ij| ≤ √(G_ii·G_jj)` and `|q_{c,i}| ≤ √(n_c·G_ii)` (up to a slack for the wire's
    rounding, `PSD_TOLERANCE` of the largest `G_ii`); and the mean squared feature norm
        `tr(G)/N ≤ B²` for the bound `B = max_feature_norm` (the features of a bounded input are
        bounded). A hostile or broken sender fails one of them; rounding of the wire codec does not.
    """
    gram = stats.gram
    if gram.shape != (dim, dim):
        return f"Gram matrix {list(gram.shape)}, expected [{dim}, {dim}]"
    moments = list(stats.moments.values())
    if not np.all(np.isfinite(gram)) or not all(np.all(np.isfinite(m)) for m in moments):
        return "statistics hold non-finite values"
    if any(m.shape != (dim,) for m in moments):
        return f"a class moment is not of dimension {dim}"
    scale = float(np.abs(gram).max()) if gram.size else 0.0
    if float(np.abs(gram - gram.T).max(initial=0.0)) > SYMMETRY_TOLERANCE * max(scale, 1e-30):
        return "Gram matrix is not symmetric"
    if set(stats.counts) != set(stats.moments):
        return "counts and moments name different classes"
    if any(n < 0 for n in stats.counts.values()):
        return "negative class count"
    total = stats.samples
    if total <= 0 or total > max_samples:
        return f"{total} rows in all, allowed 1..{max_samples}"
    diagonal = np.diag(gram)
    slack = PSD_TOLERANCE * max(float(diagonal.max(initial=0.0)), 1e-30)
    if float(diagonal.min(initial=0.0)) < -slack:
        return "Gram matrix has a negative diagonal entry"
    # the slack enters under the root: a small G_ii rounded down must not tighten the bound
    root = np.sqrt(np.clip(diagonal, 0.0, None) + slack)
    if np.any(np.abs(gram) > np.outer(root, root) + slack):
        return "Gram matrix breaks Cauchy–Schwarz (|G_ij| > √(G_ii·G_jj)): not a Gram matrix"
    for name, moment in stats.moments.items():
        count = stats.counts[name]
        if count == 0 and np.any(moment != 0):
            return f"class {name!r} has a moment but no rows"
        if np.any(np.abs(moment) > np.sqrt(count) * root + math.sqrt(max(count, 1)) * slack):
            return f"moment of class {name!r} breaks |q_i| ≤ √(n·G_ii)"
    return trace_problem(float(np.trace(gram)), total, max_feature_norm)


def trace_problem(trace: float, rows: int, max_feature_norm: float) -> str | None:
    """Why `tr(G) = Σ‖φ‖²` cannot come from `rows` features of norm at most `B`, or None:
    the mean squared norm `tr(G)/N` must be at most `B²` (up to `PSD_TOLERANCE`)."""
    if not trace <= rows * max_feature_norm**2 * (1 + PSD_TOLERANCE):
        return f"mean squared feature norm exceeds the bound {max_feature_norm:.3g}²"
    return None
