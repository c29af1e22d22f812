"""Export's own failure, and the one-line form of third-party errors it reports."""

from __future__ import annotations

from fedfmx.errors import FedFMXError


class ParityError(FedFMXError):
    """The exported file does not compute what the torch model computes, within tolerance."""


def first_line(error: BaseException) -> str:
    """A library error's first line: enough to act on, short enough for a one-line message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
