"""`fedfmx-edge export` as one function: checkpoint -> file, parity-checked before it is written.

The file is built under a temporary name beside `out`, run on the evaluation set next to the
torch model, and renamed onto `out` only when it passes (`export.parity`); a failed export
leaves no file a device could pick up by mistake.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.checkpoint import Checkpoint
from export.formats import ExportFormat, Quantization
from export.inference import OnnxClassifier
from export.metadata import ExportMetadata, Precision
from export.onnx_model import OPSET, export_onnx
from export.parity import Logits, ParityReport, batched_logits, compare_logits, require_parity
from export.quantize import QuantMode, quantize_onnx
from export.torchscript_model import export_torchscript, load_torchscript
from fedfmx.data.datasets import ImageDataset, load_dataset
from fedfmx.learner.model import FedFMXModel


def precision_of(fmt: ExportFormat, quantization: Quantization) -> Precision:
    if quantization is Quantization.none:
        return "fp32"
    if fmt is ExportFormat.onnx and quantization is Quantization.int8:
        return "int8-static"
    return "int8-dynamic"


@dataclass(frozen=True, eq=False)
class EvalSet:
    """Labelled images for the parity and accuracy checks."""

    images: np.ndarray
    targets: np.ndarray
    """Global class id of each image; −1 where the model has no row for its class."""

    @classmethod
    def of_dataset(cls, checkpoint: Checkpoint, dataset: ImageDataset) -> EvalSet:
        """The test split, its labels mapped to the checkpoint's global class ids by name."""
        registry = {name: i for i, name in enumerate(checkpoint.header.class_names)}
        ids = np.array([registry.get(name, -1) for name in dataset.class_names], np.int64)
        return cls(images=dataset.test_x, targets=ids[dataset.test_y])


def fleet_dataset(checkpoint: Checkpoint, data_path: Path | None = None) -> ImageDataset:
    """The data set the checkpoint's fleet trained on (`data_path` overrides its location)."""
    data = checkpoint.fleet.data
    return load_dataset(data.dataset, data_path if data_path is not None else data.path)


def calibration_slice(dataset: ImageDataset, samples: int, seed: int = 0) -> np.ndarray:
    """A seeded random slice of the training split: the stand-in for a device's recent stream."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(dataset.train_x), size=min(samples, len(dataset.train_x)), replace=False)
    return dataset.train_x[np.sort(rows)]


@dataclass(frozen=True)
class ExportResult:
    path: Path
    metadata: ExportMetadata
    parity: ParityReport


def export_checkpoint(
    checkpoint: Checkpoint,
    fmt: ExportFormat,
    quantization: Quantization,
    out: Path,
    eval_set: EvalSet,
    calibration: np.ndarray | None = None,
    opset: int = OPSET,
) -> ExportResult:
    """Export, check parity against torch on `eval_set`, then move the file onto `out`.

    Raises `ParityError` (and writes nothing) when the file falls outside the tolerances.
    """
    model = checkpoint.build()
    precision = precision_of(fmt, quantization)
    metadata = ExportMetadata.of_checkpoint(
        checkpoint, precision, opset if fmt is ExportFormat.onnx else None
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as scratch:
        partial = Path(scratch) / out.name
        exported = write_file(model, metadata, fmt, quantization, partial, calibration, opset)
        report = compare_logits(
            batched_logits(torch_logits(model), eval_set.images),
            batched_logits(exported, eval_set.images),
            eval_set.targets,
        )
        require_parity(report, precision != "fp32", f"{fmt} {precision} export")
        partial.replace(out)
    return ExportResult(path=out, metadata=metadata, parity=report)


def torch_logits(module: torch.nn.Module) -> Logits:
    """A torch module (eager or TorchScript) as a numpy-in, numpy-out logits function."""

    def logits(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.asarray(module(torch.from_numpy(images)).numpy())

    return logits


def write_file(
    model: FedFMXModel,
    metadata: ExportMetadata,
    fmt: ExportFormat,
    quantization: Quantization,
    partial: Path,
    calibration: np.ndarray | None,
    opset: int,
) -> Logits:
    """Write the file to `partial`, unchecked, and return its logits, computed by the runtime
    that will serve it (ONNX Runtime, or the TorchScript loader), from the file as written.

    Only `export_checkpoint` should hand a file to a device; the benchmark calls this directly
    to measure a file that fails parity.
    """
    if fmt is ExportFormat.torchscript:
        export_torchscript(model, metadata, partial, quantize=quantization is not Quantization.none)
        module, _ = load_torchscript(partial)
        return torch_logits(module)
    if quantization is Quantization.none:
        export_onnx(model, metadata, partial, opset)
    else:
        fp32 = export_onnx(model, metadata, partial.with_suffix(".fp32.onnx"), opset)
        mode: QuantMode = "static" if quantization is Quantization.int8 else "dynamic"
        quantize_onnx(fp32, partial, mode, metadata, calibration)
    return OnnxClassifier.load(partial).logits
