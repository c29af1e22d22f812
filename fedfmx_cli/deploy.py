"""`fedfmx-edge export` and `fedfmx-edge predict`: a trained checkpoint to a device file, and
predictions from that file with ONNX Runtime. torch and onnxruntime are imported inside the
commands, so the services that share this CLI (`serve`, `join`) do not pay for them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from export.formats import ExportFormat, InferenceProvider, Quantization
from fedfmx_cli.console import one_line_errors

if TYPE_CHECKING:
    from export.inference import Prediction


@one_line_errors
def export(
    checkpoint: Annotated[
        Path, typer.Option(help="Checkpoint (.safetensors) of a global model version.")
    ],
    out: Annotated[Path, typer.Option(help="File to write (.onnx or .pt).")],
    format: Annotated[ExportFormat, typer.Option(help="File format.")] = ExportFormat.onnx,
    quantize: Annotated[
        Quantization,
        typer.Option(
            help="int8: ONNX static QDQ (calibrated) / TorchScript dynamic; "
            "int8-dynamic: ONNX linear layers only, no calibration."
        ),
    ] = Quantization.none,
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="PNG directory or IDX file of the device's recent images for static int8; "
            "default: a slice of the fleet's training split."
        ),
    ] = None,
    calibration_samples: Annotated[int, typer.Option(min=1)] = 256,
    data_path: Annotated[
        Path | None, typer.Option(help="Directory of the data set used for the parity check.")
    ] = None,
) -> None:
    """Export a checkpoint; fails (exit 2, file not written) when parity with torch fails."""
    from export.checkpoint import load_checkpoint
    from export.images import load_images
    from export.pipeline import EvalSet, calibration_slice, export_checkpoint, fleet_dataset

    ckpt = load_checkpoint(checkpoint)
    dataset = fleet_dataset(ckpt, data_path)
    samples = (
        calibration_slice(dataset, calibration_samples)
        if calibration is None
        else load_images(calibration, ckpt.input, limit=calibration_samples)[0]
    )
    result = export_checkpoint(
        ckpt, format, quantize, out, EvalSet.of_dataset(ckpt, dataset), samples
    )
    report = result.parity
    Console().print(
        f"wrote {result.path} ({result.path.stat().st_size / 1024:.0f} KiB, "
        f"{result.metadata.precision}, model version {result.metadata.model_version}); "
        f"parity on {report.rows} test images: top-1 agreement {report.top1_agreement:.2%}, "
        f"max |Δlogit| {report.max_abs_diff:.2e}, accuracy {report.reference_accuracy:.2%} "
        f"(torch) → {report.exported_accuracy:.2%}",
        highlight=False,
    )


@one_line_errors
def predict(
    model: Annotated[Path, typer.Option(help="Exported ONNX file.")],
    input: Annotated[Path, typer.Option(help="Directory of PNG images, or an IDX file.")],
    provider: Annotated[
        InferenceProvider, typer.Option(help="Execution provider (the device profile's).")
    ] = InferenceProvider.cpu,
    threads: Annotated[int, typer.Option(min=1, help="ONNX Runtime intra-op threads.")] = 1,
    fallback_to_cpu: Annotated[
        bool, typer.Option(help="Run on the CPU when the provider is missing.")
    ] = False,
    json_lines: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = (
        False
    ),
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    profile: Annotated[
        str | None,
        typer.Option(help="A device profile (name or YAML): its provider, threads and fallback."),
    ] = None,
) -> None:
    """Classify images with an exported model through ONNX Runtime."""
    from export.images import load_images
    from export.inference import OnnxClassifier

    if profile is not None:
        from fedfmx.profiles import load_profile

        limits = load_profile(profile)
        provider = InferenceProvider(limits.inference_provider)
        threads, fallback_to_cpu = limits.threads, limits.gpu_fallback_to_cpu
    classifier = OnnxClassifier.load(model, provider, threads, fallback_to_cpu)
    images, names = load_images(input, classifier.metadata.input)
    _print_predictions(names, classifier.predict(images, batch_size), json_lines)


def _print_predictions(names: list[str], prediction: Prediction, json_lines: bool) -> None:
    columns = (names, prediction.class_ids, prediction.class_names, prediction.probabilities)
    rows = list(zip(*columns, strict=True))
    if json_lines:
        for name, class_id, label, prob in rows:
            record = {"input": name, "class_id": int(class_id), "class_name": label}
            typer.echo(json.dumps(record | {"probability": round(float(prob), 6)}))
        return
    table = Table(title=f"{len(names)} predictions")
    for column in ("input", "class id", "class", "probability"):
        table.add_column(column, justify="left" if column in ("input", "class") else "right")
    for name, class_id, label, prob in rows:
        table.add_row(name, str(class_id), label, f"{prob:.3f}")
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add `export` and `predict` to the `fedfmx-edge` app."""
    app.command()(export)
    app.command()(predict)
