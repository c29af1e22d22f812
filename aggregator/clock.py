"""The aggregator's half of `doctor`'s clock check: answer a device's probe with our clock.

A probe and its answer share the topic `clients/<id>/clock` (the device may write there and
read it back), so the aggregator also hears its own answers: those carry `aggregator_unix`
and are ignored.
"""

from __future__ import annotations

from pydantic import ValidationError

from fedfmx.wire.messages import ClockProbe


def clock_answer(message: bytes, now: float) -> bytes | None:
    """The answer to a probe (the same probe id, `now` as the aggregator's time); None for an
    answer (ours, heard back) or anything that is not a probe."""
    try:
        probe = ClockProbe.model_validate_json(message)
    except ValidationError:
        return None
    if probe.aggregator_unix is not None:
        return None
    return probe.model_copy(update={"aggregator_unix": now}).model_dump_json().encode()
