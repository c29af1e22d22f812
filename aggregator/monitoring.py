"""Prometheus metrics of a running aggregator (`serve --metrics-port`).

Counters follow the aggregator's structured events (`aggregator.events.log_event`): a logging
handler on the events logger turns `update_accepted`, `update_rejected`, `round_closed`,
`model_published` ... into counter increments, so the service has one way to say what happened
and the metrics cannot disagree with the logs. Gauges (devices online, current round, model
version) are read from the SQLite state at scrape time, so they survive restarts.

Names follow Prometheus' guide: `fedfmx_` prefix, base units in the name (`_bytes`,
`_seconds`), `_total` on counters. Labels are bounded: a rejection's free-text reason is
bucketed into a fixed set (`REJECTION_BUCKETS`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from aggregator.events import EventValue
from aggregator.events import log as events_log
from aggregator.state import AggregatorState
from fedfmx.errors import ConfigError

REJECTION_BUCKETS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (bucket, re.compile(pattern))
    for bucket, pattern in (
        ("rate_limit", r"^rate limit"),
        ("norm_bound", r"norm .* exceeds the bound"),
        ("too_large", r"byte limit|decompresses beyond|exceeds .* on "),
        ("not_participant", r"not a participant"),
        ("wrong_round", r"no round is open|^update for round|open is round"),
        ("stale", r"^stale"),
        ("wrong_sender", r"^header says device|^hello for|^status of|^update for fleet"),
        ("non_finite", r"non-finite|must be finite|non-negative"),
        (
            "malformed",
            r"malformed|magic|corrupt|invalid header|safetensors|expected|runs past|crc32|"
            r"chunk|shapes?|expert ids|class_counts|does not fit",
        ),
    )
)
"""(label, pattern) in order; the first match names the bucket, `other` when none does."""

DURATION_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600)


def rejection_bucket(reason: str) -> str:
    """The bounded label for a rejection's free-text reason."""
    for bucket, pattern in REJECTION_BUCKETS:
        if pattern.search(reason):
            return bucket
    return "other"


class AggregatorMetrics(logging.Handler):
    """The aggregator's metrics in their own registry, fed by its events."""

    def __init__(self, state: AggregatorState) -> None:
        super().__init__(logging.INFO)
        self.registry = CollectorRegistry()
        r = self.registry
        self.rounds_opened = Counter("fedfmx_rounds_opened_total", "Rounds opened", registry=r)
        self.rounds_closed = Counter("fedfmx_rounds_closed_total", "Rounds closed", registry=r)
        self.rounds_extended = Counter(
            "fedfmx_round_extensions_total", "Round deadlines extended (no quorum)", registry=r
        )
        self.updates_accepted = Counter(
            "fedfmx_updates_accepted_total", "Updates stored and counted", registry=r
        )
        self.updates_rejected = Counter(
            "fedfmx_updates_rejected_total", "Updates refused, by reason", ["reason"], registry=r
        )
        self.messages_rejected = Counter(
            "fedfmx_messages_rejected_total",
            "Hellos, statuses and throttled messages refused, by reason",
            ["reason"],
            registry=r,
        )
        self.received_bytes = Counter(
            "fedfmx_update_received_bytes_total", "Bytes of accepted update payloads", registry=r
        )
        self.published_bytes = Counter(
            "fedfmx_model_published_bytes_total", "Bytes of model versions published", registry=r
        )
        self.merge_seconds = Histogram(
            "fedfmx_merge_duration_seconds",
            "Time to merge a round's updates",
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.round_seconds = Histogram(
            "fedfmx_round_duration_seconds",
            "Time from a round's announcement to its close",
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        online = Gauge("fedfmx_devices_online", "Registered devices not offline", registry=r)
        online.set_function(lambda: sum(d.status.state != "offline" for d in state.devices()))
        registered = Gauge("fedfmx_devices_registered", "Devices the fleet knows", registry=r)
        registered.set_function(lambda: len(state.devices()))
        version = Gauge("fedfmx_model_version", "Newest model version stored", registry=r)
        version.set_function(lambda: _latest_version(state))
        current = Gauge("fedfmx_round", "Index of the latest round opened (-1: none)", registry=r)
        current.set_function(lambda: _latest_round(state))

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "event", None)
        fields: dict[str, EventValue] = getattr(record, "fields", {})
        if event == "round_opened":
            self.rounds_opened.inc()
        elif event == "round_extended":
            self.rounds_extended.inc()
        elif event == "round_closed":
            self.rounds_closed.inc()
            self.merge_seconds.observe(_number(fields, "merge_duration_s"))
            self.round_seconds.observe(_number(fields, "round_duration_s"))
        elif event == "update_accepted":
            self.updates_accepted.inc()
            self.received_bytes.inc(_number(fields, "bytes"))
        elif event == "update_rejected":
            self.updates_rejected.labels(rejection_bucket(str(fields.get("reason")))).inc()
        elif event == "message_rejected":
            self.messages_rejected.labels(rejection_bucket(str(fields.get("reason")))).inc()
        elif event == "model_published":
            self.published_bytes.inc(_number(fields, "bytes"))


def _number(fields: dict[str, EventValue], key: str) -> float:
    value = fields.get(key)
    return float(value) if isinstance(value, int | float) else 0.0


def _latest_version(state: AggregatorState) -> float:
    stored = state.latest_model()
    return -1.0 if stored is None else float(stored.version)


def _latest_round(state: AggregatorState) -> float:
    last = state.last_round()
    return -1.0 if last is None else float(last.announcement.round)


@contextmanager
def serve_metrics(state: AggregatorState, port: int, host: str) -> Iterator[AggregatorMetrics]:
    """Count the aggregator's events and expose them on http://host:port/metrics meanwhile."""
    metrics = AggregatorMetrics(state)
    level = events_log.level
    if events_log.getEffectiveLevel() > logging.INFO:
        events_log.setLevel(logging.INFO)  # events are INFO: counted even when logs are quieter
    events_log.addHandler(metrics)
    try:
        server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as error:
        raise ConfigError(f"metrics: cannot listen on {host}:{port}: {error.strerror}") from None
    try:
        yield metrics
    finally:
        events_log.removeHandler(metrics)
        events_log.setLevel(level)
        server.shutdown()
        server.server_close()
        thread.join(5)
