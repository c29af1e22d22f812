"""`fedfmx-edge camera-demo`: a one-camera fleet to watch, made from real photos."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedfmx_cli.console import one_line_errors


@one_line_errors
def camera_demo(
    out: Annotated[Path, typer.Argument(help="Folder to write the demo into.")],
    data_path: Annotated[
        Path | None, typer.Option(help="Folder holding COIL20.mat; default ../shared/datasets.")
    ] = None,
    broker_url: Annotated[str, typer.Option(help="The broker both sides use.")] = (
        "mqtt://127.0.0.1:1883"
    ),
) -> None:
    """Write fleet.yaml, camera.yaml, a labels folder and street.avi (COIL-20 photos)."""
    from fedfmx_cli.stream_demo import camera_demo as write_demo

    for path in write_demo(out, data_path, broker_url):
        Console().print(f"wrote {path}")
    Console().print(
        f"next: fedfmx-edge serve --fleet {out}/fleet.yaml  and, beside it,\n"
        f"      fedfmx-edge join --config {out}/camera.yaml\n"
        f"then: tail -f {out}/state/predictions.jsonl; ls {out}/state/to_label/"
    )


def register(app: typer.Typer) -> None:
    app.command("camera-demo")(camera_demo)
