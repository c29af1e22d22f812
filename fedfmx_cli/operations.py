"""Operating a pilot: `doctor` on a device, `rollback` of the fleet's model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedfmx.errors import ConfigError
from fedfmx_cli.console import one_line_errors


@one_line_errors
def doctor(
    config: Annotated[Path, typer.Option("--config", help="The device YAML.")],
) -> None:
    """Check this device: Python, torch, ONNX Runtime, data, disk, broker, clock, profile."""
    from edge_client.doctor import diagnose

    findings = diagnose(config)
    for finding in findings:
        typer.echo(finding.line())
    failed = [f.check for f in findings if f.verdict == "fail"]
    if failed:
        typer.echo(f"doctor: {len(failed)} check(s) failed: {', '.join(failed)}", err=True)
        raise typer.Exit(1)


@one_line_errors
def rollback(
    to: Annotated[int, typer.Option("--to", help="The model version to bring back.")],
    fleet_file: Annotated[
        Path | None, typer.Option("--fleet", help="Fleet YAML; default: the demo fleet.")
    ] = None,
    state: Annotated[
        Path | None, typer.Option(help="SQLite state file; default: the fleet's state_path.")
    ] = None,
) -> None:
    """Make model VERSION the newest again (as version N+1); `serve` then publishes it signed.

    Stop the aggregator first (systemctl stop fedfmx-aggregator); start it again after."""
    from aggregator.rollback import roll_back
    from aggregator.state import AggregatorState
    from aggregator.state_lock import exclusive_state
    from fedfmx.config import load_fleet

    fleet = load_fleet(fleet_file)
    path = state or fleet.service.state_file(fleet.name)
    if not path.is_file():
        raise ConfigError(f"{path}: no aggregator state here (has `serve` run for this fleet?)")
    with exclusive_state(path, "rolling back"):
        store = AggregatorState(path, fleet.name, create=False)
        try:
            done = roll_back(store, fleet, to)
        finally:
            store.close()
    typer.echo(f"version {done.new_version} now holds the weights of version {done.restored}")
    typer.echo(f"round {done.spent_round + 1} closed without training (a rollback spends one)")
    typer.echo("start the aggregator again: it publishes the new version, signed")


def register(app: typer.Typer) -> None:
    app.command()(doctor)
    app.command()(rollback)
