"""Operating a pilot: `doctor` on a device (more operator commands register here too)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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


def register(app: typer.Typer) -> None:
    app.command()(doctor)
