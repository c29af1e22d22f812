"""`fedfmx-edge serve`, `join` and `status`: the aggregator, a device, and the operator's view.

torch is imported only where it is used (a device, or `serve --evaluate`): the aggregator
merges with numpy and starts in about a third of the memory."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from aggregator.districts.config import load_district_config
from aggregator.districts.district import open_district
from aggregator.districts.root import open_root
from aggregator.events import configure_logging
from aggregator.monitoring import serve_metrics
from aggregator.service import Aggregator, ServiceHooks, open_aggregator
from aggregator.state import AggregatorState
from aggregator.state_lock import exclusive_state
from aggregator.status_page import serve_status_page
from edge_client.config import load_device_config
from fedfmx.config import FleetConfig, load_fleet
from fedfmx.errors import ConfigError
from fedfmx_cli.console import one_line_errors
from fedfmx_cli.systemd import SystemdNotifier

if TYPE_CHECKING:
    from edge_client.agent import EdgeDevice
    from edge_client.serving_device import ServingDevice

FleetOption = Annotated[
    Path | None, typer.Option("--fleet", help="Fleet YAML; default: the embedded demo fleet.")
]
JsonLogs = Annotated[bool, typer.Option("--json-logs", help="One JSON object per log line.")]


def stop_on_signals(abandon: Callable[[], bool] = lambda: False) -> threading.Event:
    """An event set by SIGTERM or SIGINT, so a service finishes its step and exits cleanly.

    When `abandon()` says the process is in a step that would take too long to finish (a
    device's local training), the signal also interrupts that step (`Stopped`)."""
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()
        if abandon():
            raise Stopped(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    return stop


class Stopped(Exception):
    """A stop signal interrupted a long step (its work is abandoned, its state unsaved)."""


def _with_broker_url(fleet: FleetConfig, url: str | None) -> FleetConfig:
    if url is None:
        return fleet
    broker = fleet.service.broker.model_copy(update={"url": url})
    service = fleet.service.model_copy(update={"broker": broker})
    return fleet.model_copy(update={"service": service})


@one_line_errors
def serve(
    fleet_file: FleetOption = None,
    state: Annotated[
        Path | None, typer.Option(help="SQLite state file; default: the fleet's state_path.")
    ] = None,
    broker_url: Annotated[str | None, typer.Option(help="Override the fleet's broker url.")] = None,
    evaluate: Annotated[
        bool, typer.Option(help="Evaluate on the fleet data set's test split after each task.")
    ] = False,
    json_logs: JsonLogs = False,
    metrics_port: Annotated[
        int | None, typer.Option(help="Expose Prometheus metrics on this port (/metrics).")
    ] = None,
    http_port: Annotated[
        int | None, typer.Option(help="Serve the read-only status page on this port.")
    ] = None,
    listen: Annotated[
        str, typer.Option(help="Address the metrics and the page listen on (0.0.0.0: all).")
    ] = "127.0.0.1",
    district: Annotated[
        Path | None,
        typer.Option(help="Serve as this district (its YAML) of a fleet with districts."),
    ] = None,
) -> None:
    """Run the fleet's aggregator: rounds, merges and model versions, resumable from its state.

    A fleet with a `districts` section runs its root; `--district` runs one district."""
    configure_logging(json_logs)
    if district is not None:
        _serve_district(district)
        return
    fleet = _with_broker_url(load_fleet(fleet_file), broker_url)
    hooks = ServiceHooks()
    if evaluate:
        from fedfmx.federation.simulation import (  # torch: only here
            load_fleet_dataset,
            task_evaluator,
        )

        hooks = ServiceHooks(evaluate=task_evaluator(fleet, load_fleet_dataset(fleet)))
    state_path = state or fleet.service.state_file(fleet.name)
    with ExitStack() as served:
        served.enter_context(exclusive_state(state_path, "serving it again"))
        aggregator = (
            open_aggregator(fleet, state_path, hooks)
            if fleet.districts is None
            else open_root(fleet, state_path, hooks)
        )
        served.callback(aggregator.state.close)  # last: after the page and metrics stopped
        stop = stop_on_signals()
        notifier = SystemdNotifier()
        if metrics_port is not None:
            served.enter_context(serve_metrics(aggregator.state, metrics_port, listen))
        if http_port is not None:
            page = serve_status_page(
                aggregator.state, fleet.name, fleet.protocol.num_rounds, http_port, listen
            )
            served.enter_context(page)
        _run_aggregator(aggregator, stop, notifier)


def _serve_district(config_file: Path) -> None:
    """`serve --district`: one district aggregator on its own broker, bridged to the root."""
    config = load_district_config(config_file)
    with exclusive_state(config.state_path, "serving it again"):
        district = open_district(config)
        try:
            _run_aggregator(district, stop_on_signals(), SystemdNotifier())
        finally:
            district.partials.close()
            district.state.close()


def _run_aggregator(
    aggregator: Aggregator, stop: threading.Event, notifier: SystemdNotifier
) -> None:
    """Start, tell systemd, run until done or stopped; always close the MQTT session."""
    try:
        aggregator.start()
        version = aggregator.keeper.model.version
        notifier.ready(f"fleet {aggregator.fleet.name}, model version {version}")
        aggregator.run(stop, notifier.heartbeat)
    finally:
        notifier.stopping()
        aggregator.session.close()


@one_line_errors
def join(
    config: Annotated[Path, typer.Option("--config", help="The device YAML.")],
    json_logs: JsonLogs = False,
) -> None:
    """Run one edge device: train on its local stream when a round includes it, send updates
    (`role: serve` in its YAML: only serve the fleet's newest model, without torch)."""
    configure_logging(json_logs)
    device_config = load_device_config(config)
    device: EdgeDevice | ServingDevice
    if device_config.role == "serve":
        from edge_client.serving_device import open_serving_device  # ONNX Runtime, no torch

        device = open_serving_device(device_config)
    else:
        from edge_client.agent import open_device  # torch: the device trains

        device = open_device(device_config)
    notifier = SystemdNotifier()
    try:
        # READY=1 on the loop's first turn
        device.run(stop_on_signals(abandon=lambda: device.training), notifier.heartbeat)
    except Stopped as signal_name:
        Console(stderr=True).print(f"stopped by {signal_name} during local training")
    finally:
        notifier.stopping()


def _store(samples: int | None, size: int | None) -> str:
    """A device's own sample store (folder and camera sources); `-` for a partition."""
    if samples is None or size is None:
        return "-"
    return f"{samples} / {size / 2**20:.1f} MB"


def _ago(seconds: float) -> str:
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


@one_line_errors
def status(
    fleet_file: FleetOption = None,
    state: Annotated[
        Path | None, typer.Option(help="SQLite state file; default: the fleet's state_path.")
    ] = None,
) -> None:
    """Show devices, the current round and task, and accuracy so far, from the state file."""
    fleet = load_fleet(fleet_file)
    path = state or fleet.service.state_file(fleet.name)
    if not path.is_file():
        raise ConfigError(f"{path}: no aggregator state here (has `serve` run for this fleet?)")
    store = AggregatorState(path, fleet.name, create=False)
    try:
        devices, rounds, evaluations = store.devices(), store.round_totals(), store.evaluations()
        rejections = store.rejections()
    finally:
        store.close()
    out = Console()
    now = time.time()
    table = Table(title=f"fleet {fleet.name}: devices")
    own_sources = any(row.status.store_samples is not None for row in devices)
    columns = ["device", "state", "last seen", "classes", "updates", "peak RSS", "profile"]
    if own_sources:  # folder and camera devices: their sample store
        columns.insert(-1, "store")
    for column in columns:
        table.add_column(column)
    for row in devices:
        rss = row.status.peak_rss_mb
        cells = [
            row.device_id,
            row.status.state,
            _ago(now - row.last_seen),
            str(len(row.classes_met)),
            str(row.updates_accepted),
            "-" if rss is None else f"{rss:.0f} MB",
            row.profile,
        ]
        if own_sources:
            cells.insert(-1, _store(row.status.store_samples, row.status.store_bytes))
        table.add_row(*cells)
    out.print(table)
    total = fleet.protocol.num_rounds
    if rounds:
        last = rounds[-1]
        state_word = "closed" if last.closed is not None else "open"
        out.print(
            f"round {last.round + 1}/{total} ({state_word}), task {last.task + 1}/"
            f"{fleet.protocol.num_tasks}: {last.updates} updates, {last.skips} skips of "
            f"{last.participants} participants"
        )
    else:
        out.print("no round opened yet")
    for evaluation in evaluations:
        out.print(
            f"after task {evaluation.task + 1}: {100 * evaluation.seen:.1f}% on every class "
            f"seen (model version {evaluation.model_version})"
        )
    if rejections:
        out.print(f"{len(rejections)} messages rejected; last: {rejections[-1][2]}")


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(join)
    app.command()(status)
