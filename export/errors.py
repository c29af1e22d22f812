"""Export's own failure, and the one-line form of third-party errors it reports."""

from __future__ import annotations

from pathlib import Path

from fedfmx.errors import DataError, FedFMXError

MAX_MODEL_FILE_BYTES = 2 << 30
"""Largest checkpoint or ONNX file opened (ONNX's own protobuf limit is 2 GiB)."""
MAX_IMAGE_FILE_BYTES = 32 << 20
MAX_IMAGE_PIXELS = 40_000_000
"""Largest image decoded (a 40-megapixel photo); PIL's own bomb guard is far higher."""


class ParityError(FedFMXError):
    """The exported file does not compute what the torch model computes, within tolerance."""


def first_line(error: BaseException) -> str:
    """A library error's first line: enough to act on, short enough for a one-line message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def refuse_oversize(path: Path, limit: int, what: str) -> None:
    """DataError before a file larger than `limit` bytes is read (a missing one is the
    caller's to report)."""
    try:
        size = path.stat().st_size
    except OSError:
        return
    if size > limit:
        raise DataError(f"{path}: {size} bytes, over the {limit}-byte limit for {what}")
