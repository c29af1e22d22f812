"""fedfmx-edge: federated class-incremental learning for edge fleets (FedFMX)."""

# Commands import torch, onnx and matplotlib inside their bodies, so `serve` stays light.

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from aggregator.events import configure_logging
from fedfmx.compat import StrEnum
from fedfmx.config import FleetConfig, load_fleet, validate_document
from fedfmx.errors import ConfigError
from fedfmx_cli import (
    deploy,
    enrolment,
    operations,
    provisioning,
    services,
    serving,
    stream_commands,
)
from fedfmx_cli.console import console, one_line_errors
from transport.brokers import BrokerChoice

if TYPE_CHECKING:
    from fedfmx.federation.simulation import RoundLog, SimulationResult

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


class Transport(StrEnum):
    mqtt = "mqtt"
    inproc = "inproc"


FleetOption = Annotated[
    Path | None, typer.Option("--fleet", help="Fleet YAML; default: the embedded demo fleet.")
]


def _apply_overrides(
    fleet: FleetConfig, method: str | None, seed: int | None, data_path: Path | None
) -> FleetConfig:
    update: dict[str, object] = {}
    if method is not None:
        update["method"] = method
    if seed is not None:
        update["seed"] = seed
    if data_path is not None:
        update["data"] = fleet.data.model_copy(update={"path": data_path})
    document = fleet.model_copy(update=update).model_dump()
    return validate_document(FleetConfig, document, "command line")


def _print_summary(result: SimulationResult) -> None:
    table = Table(title=f"{result.method}: accuracy after each task (%)")
    table.add_column("after task", justify="right")
    for j in range(len(result.accuracy_matrix)):
        table.add_column(f"task {j}", justify="right")
    table.add_column("all seen", justify="right", style="bold")
    for t, row in enumerate(result.accuracy_matrix):
        cells = [f"{100 * v:.1f}" for v in row] + [""] * (len(result.accuracy_matrix) - len(row))
        table.add_row(str(t), *cells, f"{100 * result.seen_accuracy[t]:.1f}")
    out = Console()
    out.print(table)
    out.print(
        f"final accuracy {100 * result.final_accuracy:.1f}%  "
        f"average incremental {100 * result.average_incremental_accuracy:.1f}%  "
        f"forgetting {100 * result.forgetting:.1f} pts  "
        f"uplink {result.uplink_bytes / 1e6:.2f} MB  "
        f"downlink {result.downlink_bytes / 1e6:.2f} MB  ({result.wall_time_s:.0f} s)"
    )


@app.command()
@one_line_errors
def simulate(
    fleet_file: FleetOption = None,
    transport: Annotated[
        Transport,
        typer.Option(
            help="mqtt: a broker, the aggregator and one process per device; "
            "inproc: one process, no network (benchmarks)."
        ),
    ] = Transport.mqtt,
    broker: Annotated[
        BrokerChoice, typer.Option(help="The broker to start for --transport mqtt.")
    ] = BrokerChoice.embedded,
    broker_url: Annotated[
        str | None, typer.Option(help="Use this running broker instead of starting one.")
    ] = None,
    workdir: Annotated[
        Path | None,
        typer.Option(help="Keep the device YAMLs, states, logs and aggregator state here."),
    ] = None,
    secure: Annotated[
        bool,
        typer.Option(
            help="Provision certificates, ACL and signing key on the fly and run a local "
            "Mosquitto with mutual TLS and ACLs."
        ),
    ] = False,
    method: Annotated[str | None, typer.Option(help="Override the fleet's method.")] = None,
    seed: Annotated[int | None, typer.Option(help="Override the fleet's seed.")] = None,
    data_path: Annotated[
        Path | None, typer.Option(help="Directory holding the data set files.")
    ] = None,
    results: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write a PNG of accuracy per task here.")
    ] = None,
    checkpoint_out: Annotated[
        Path | None, typer.Option(help="Save the final global model here (for `export`).")
    ] = None,
    districts: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Run a tree: this many district aggregators, each behind its own Mosquitto "
            "bridged to the root's (mutual TLS), devices spread over them.",
        ),
    ] = None,
) -> None:
    """Run a whole class-incremental federation: every task, every round, every device."""
    from export.checkpoint import Checkpoint, InputSpec, save_checkpoint
    from fedfmx.evaluation.plots import plot_seen_accuracy
    from fedfmx.federation.simulation import load_fleet_dataset, run_simulation
    from fedfmx.wire.messages import ModelHeader
    from fedfmx_cli.fleet_simulation import MqttRun, run_over_mqtt

    fleet = _apply_overrides(load_fleet(fleet_file), method, seed, data_path)
    dataset = load_fleet_dataset(fleet)
    total = fleet.protocol.num_rounds
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not sys.stderr.isatty(),
    ) as progress:
        bar = progress.add_task(f"{fleet.name} · {fleet.method}", total=total, status="")

        def on_round(log: RoundLog) -> None:
            status = f"task {log.task} · {log.updates} updates · {log.uplink_bytes / 1e6:.1f} MB up"
            if not fleet.closed_form:  # a closed-form round fits no loss: it adds statistics
                status += f" · loss {log.mean_loss:.3f}"
            progress.update(bar, advance=1, status=status)
            if not sys.stderr.isatty():
                console.print(f"round {log.round + 1}/{total}: {status}", highlight=False)

        if districts is not None:
            from fedfmx_cli.tree_simulation import run_tree_over_mqtt

            if broker_url is not None or transport is Transport.inproc:
                raise ConfigError(
                    "--districts starts its own brokers (mutual TLS, bridged): drop "
                    "--broker-url and --transport inproc"
                )

            configure_logging(as_json=False, level=logging.WARNING)
            interrupted = services.stop_on_signals()
            result = run_tree_over_mqtt(fleet, dataset, districts, workdir, on_round, interrupted)
        elif transport is Transport.mqtt and fleet.method != "joint":
            configure_logging(as_json=False, level=logging.WARNING)
            # stopped by a signal, it stops every process it started
            interrupted = services.stop_on_signals()
            result = run_over_mqtt(
                fleet, dataset, MqttRun(broker, broker_url, workdir, secure), on_round, interrupted
            )
        else:
            result = run_simulation(fleet, dataset, on_round)
    _print_summary(result)
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(result.to_json(), indent=2))
    if plot is not None:
        plot_seen_accuracy(
            {result.method: result.seen_accuracy}, plot, f"{fleet.name}: {fleet.data.dataset}"
        )
    if checkpoint_out is not None and result.final_model is not None:
        final = result.final_model
        header = ModelHeader(fleet=fleet.name, version=final.version, class_names=final.class_names)
        spec = InputSpec.of_dataset(dataset)
        save_checkpoint(Checkpoint(fleet, header, spec, final.weights), checkpoint_out)


deploy.register(app)
provisioning.register(app)
services.register(app)
operations.register(app)
enrolment.register(app)
stream_commands.register(app)
serving.register(app)

bench = typer.Typer(no_args_is_help=True, help="Reproducible benchmarks (JSON + PNG).")
app.add_typer(bench, name="bench")


class GridName(StrEnum):
    reduced = "reduced"
    full = "full"


@bench.command("fcil")
@one_line_errors
def bench_fcil(
    fleet_file: Annotated[
        Path | None, typer.Option("--fleet", help="Base fleet; default: the FCIL benchmark fleet.")
    ] = None,
    grid: Annotated[
        GridName, typer.Option(help="reduced: minutes; full: hours.")
    ] = GridName.reduced,
    methods: Annotated[list[str] | None, typer.Option("--method", help="Repeat to pick.")] = None,
    seeds: Annotated[list[int] | None, typer.Option("--seed", help="Repeat to pick.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for <name>.json and <name>.png.")] = Path(
        "benchmarks/results"
    ),
    name: Annotated[str, typer.Option(help="Output file stem.")] = "fcil_fmnist",
) -> None:
    """FedFMX against the baselines and ablations: methods x seeds x settings."""
    from fedfmx.evaluation.benchmark import (
        ALL_METHODS,
        BENCH_FLEET,
        FULL,
        REDUCED,
        markdown_table,
        run_grid,
        write_outputs,
    )

    chosen = FULL if grid is GridName.full else REDUCED
    if methods:
        unknown = sorted(set(methods) - set(ALL_METHODS))
        if unknown:
            raise ConfigError(
                f"unknown method {unknown[0]!r}; choose from {', '.join(ALL_METHODS)}"
            )
        chosen = replace(chosen, methods=tuple(methods))
    if seeds:
        chosen = replace(chosen, seeds=tuple(seeds))
    base = (
        load_fleet(fleet_file)
        if fleet_file is not None
        else FleetConfig.model_validate(BENCH_FLEET)
    )
    document = run_grid(base, chosen, progress=lambda line: console.print(line, highlight=False))
    write_outputs(document, out / f"{name}.json", out / f"{name}.png")
    Console().print(markdown_table(document))


def main() -> None:
    app()
