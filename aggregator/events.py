"""One structured log line per aggregator event, readable by people or (with --json-logs) tools.

Every event goes through `log_event`, so an operator can grep one name (`round_closed`,
`update_rejected`, ...) and a log shipper can parse the JSON form without regexes.
"""

from __future__ import annotations

import json
import logging
import sys
import time

log = logging.getLogger("fedfmx.events")

EventValue = str | int | float | bool | None | list[str]


def log_event(event: str, level: int = logging.INFO, **fields: EventValue) -> None:
    """Log `event` with its fields; the formatter decides between text and JSON."""
    log.log(level, event, extra={"event": event, "fields": fields})


class EventFormatter(logging.Formatter):
    """`event key=value ...` for people, one JSON object per line when `as_json`."""

    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "event", None)
        fields: dict[str, EventValue] = getattr(record, "fields", {})
        if self.as_json:
            document: dict[str, object] = {
                "time": round(record.created, 3),
                "level": record.levelname.lower(),
                "event": event or "log",
                "logger": record.name,
            }
            document |= fields if event else {"message": record.getMessage()}
            return json.dumps(document)
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        if event is None:
            return f"{stamp} {record.levelname.lower()} {record.name}: {record.getMessage()}"
        pairs = " ".join(f"{key}={_text(value)}" for key, value in fields.items())
        return f"{stamp} {event} {pairs}".rstrip()


def _text(value: EventValue) -> str:
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes: a CLI run inside a test runner
    swaps it, and a handler bound to the old one would write to a closed file."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(as_json: bool, level: int = logging.INFO) -> None:
    """Send every log record to stderr through `EventFormatter` (replacing other handlers)."""
    handler = _CurrentStderr()
    handler.setFormatter(EventFormatter(as_json))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
