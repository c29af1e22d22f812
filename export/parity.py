"""The checks an export must pass before its file is written (DESIGN §9, issue 6).

fp32: the file computes the same function, so logits agree to `1e-4` (max abs diff) and top-1
agrees on every row. int8: rounding moves logits, so only decisions are compared: top-1 agrees
with torch on at least 99% of the rows and accuracy drops by at most one point.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from export.errors import ParityError

FP32_MAX_ABS_DIFF = 1e-4
INT8_MIN_AGREEMENT = 0.99
INT8_MAX_ACCURACY_DROP = 0.01

Logits = Callable[[np.ndarray], np.ndarray]
"""float32 images [N, C, H, W] -> logits [N, classes]."""


@dataclass(frozen=True)
class ParityReport:
    rows: int
    max_abs_diff: float
    top1_agreement: float
    reference_accuracy: float
    """Torch fp32 accuracy on the labelled rows (targets >= 0)."""
    exported_accuracy: float

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def batched_logits(logits: Logits, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Run `logits` over `images` in batches (bounded memory on a Pi)."""
    return np.concatenate(
        [logits(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
    )


def compare_logits(
    reference: np.ndarray, exported: np.ndarray, targets: np.ndarray
) -> ParityReport:
    """Agreement of two logit matrices on the same rows; `targets` −1 = class not in the model."""
    labelled = targets >= 0
    ref_top1, exp_top1 = reference.argmax(axis=1), exported.argmax(axis=1)

    def accuracy(top1: np.ndarray) -> float:
        return float((top1[labelled] == targets[labelled]).mean()) if labelled.any() else 0.0

    return ParityReport(
        rows=len(reference),
        max_abs_diff=float(np.abs(reference - exported).max()),
        top1_agreement=float((ref_top1 == exp_top1).mean()),
        reference_accuracy=accuracy(ref_top1),
        exported_accuracy=accuracy(exp_top1),
    )


def require_parity(report: ParityReport, quantized: bool, what: str) -> ParityReport:
    """Raise `ParityError` (one line: which check, measured vs allowed) unless `report` passes."""
    failures = []
    if quantized:
        drop = report.reference_accuracy - report.exported_accuracy
        if report.top1_agreement < INT8_MIN_AGREEMENT:
            failures.append(
                f"top-1 agreement {report.top1_agreement:.2%} < {INT8_MIN_AGREEMENT:.0%}"
            )
        if drop > INT8_MAX_ACCURACY_DROP:
            failures.append(
                f"accuracy drop {100 * drop:.2f} pts > {100 * INT8_MAX_ACCURACY_DROP:.0f}"
            )
    else:
        if not report.max_abs_diff <= FP32_MAX_ABS_DIFF:  # also catches NaN
            failures.append(f"max |Δlogit| {report.max_abs_diff:.2e} > {FP32_MAX_ABS_DIFF:.0e}")
        if report.top1_agreement < 1.0:
            failures.append(f"top-1 agreement {report.top1_agreement:.2%} < 100%")
    if failures:
        raise ParityError(
            f"{what} failed parity on {report.rows} rows: {'; '.join(failures)} "
            "— the file was not written"
        )
    return report
