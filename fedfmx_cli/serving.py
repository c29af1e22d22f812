"""`fedfmx-edge export-serving`: the files a serving-only device needs, made where torch is.

A serving-only device (`role: serve` in its YAML) imports no torch, so it cannot trace a model:
this command writes, into the folder its YAML's `serving_files` names, the fleet's model
template (`export.template`) and, for a frozen pretrained trunk, the fp32 trunk
(`export.trunk`), which the device quantizes to int8 on its own images, and, for a closed-form
fleet, its fixed feature maps (`export.feature_maps`: a training device then needs no torch
either). All depend on the fleet's model settings only, never on a version's weights: they are
made once per fleet. For `fedfmx_cf` on the trunk's taps the trunk also outputs the maps its
taps read (`export.tap_trunk`); its serving template is not made yet (its training devices
serve it themselves: `edge_client.closed_form_serving`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedfmx.config import load_fleet
from fedfmx_cli.console import one_line_errors

TEMPLATE_CLASSES = 1
"""Head rows of the traced model: any count works, the filled head brings its own."""


@one_line_errors
def export_serving(
    out: Annotated[Path, typer.Option(help="Folder to write (the device's serving_files).")],
    fleet: Annotated[
        Path | None, typer.Option("--fleet", help="Fleet YAML; default: the embedded demo fleet.")
    ] = None,
) -> None:
    """Write the model template (and fp32 trunk) a serving-only device fills with each version."""
    from edge_client.serving_model import TEMPLATE_FILE
    from export.checkpoint import Checkpoint, InputSpec
    from export.feature_maps import FEATURE_MAPS_FILE, export_feature_maps
    from export.tap_trunk import export_tap_trunk
    from export.template import export_template
    from export.trunk import fp32_trunk_path
    from fedfmx.learner.model import build_model, state_to_numpy
    from fedfmx.trunk.taps import tap_sources
    from fedfmx.wire.messages import ModelHeader

    config = load_fleet(fleet)
    model = build_model(config.network, config.routing, TEMPLATE_CLASSES, config.seed)
    header = ModelHeader(fleet=config.name, version=0, class_names=["template"])
    spec = InputSpec.of_fleet(config)
    checkpoint = Checkpoint(config, header, spec, state_to_numpy(model))
    written: list[Path] = []
    trunk = None
    if model.uses_taps:  # its training devices need only the tap trunk and the maps
        Console().print(
            "no serving template: a `role: serve` device cannot serve fedfmx_cf on the "
            "trunk's taps yet (its training devices serve it, `serve_predictions`)"
        )
    else:
        written.append(export_template(checkpoint, out / TEMPLATE_FILE))
    if config.model.backbone == "efficientnet_lite0":
        size = config.model.trunk_input_size
        sources = tap_sources(config.model.expert_taps) if model.uses_taps else ()
        trunk = fp32_trunk_path(out, size, sources)
        written.append(export_tap_trunk(spec, size, sources, trunk))
    if config.closed_form:
        maps = export_feature_maps(config, out / FEATURE_MAPS_FILE, trunk)
        if maps is None:
            Console().print("no feature maps: numpy cannot reproduce this network's features")
        else:
            written.append(maps)
    for path in written:
        Console().print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("export-serving")(export_serving)
