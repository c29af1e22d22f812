"""TorchScript export (deprecated in torch 2.13, shipped because deployments still ask for it).

`torch.jit.trace` records the same static-shape graph as ONNX: AES is sort + scatter, and the
only shape read at run time is the batch size, so one trace serves every batch size. The
forward path for PyTorch-native edge runtimes is ExecuTorch (`torch.export` + a delegate); this
module stays until the fleet's devices move there.

int8: the one quantization path torch 2.13 still runs eagerly on CPU is
`torch.ao.quantization.quantize_dynamic` of `nn.Linear` (int8 weights, activations quantized per
batch) — deprecated too, and it leaves the convolutions float. PT2E static quantization needs
`torch.export` + a backend quantizer and does not produce TorchScript.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from export.errors import first_line
from export.metadata import TORCHSCRIPT_METADATA_FILE, ExportMetadata
from fedfmx.errors import DataError
from fedfmx.learner.model import FedFMXModel


def export_torchscript(
    model: FedFMXModel, metadata: ExportMetadata, out: Path, quantize: bool = False
) -> Path:
    """Trace `model` (int8 dynamic on its linear layers when `quantize`) and save it to `out`."""
    spec = metadata.input
    example = torch.zeros(2, spec.channels, spec.height, spec.width)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_deprecations():
        module: torch.nn.Module = model.eval()
        if quantize:
            module = torch.ao.quantization.quantize_dynamic(
                module, {torch.nn.Linear}, dtype=torch.qint8
            )
        with torch.no_grad():
            traced = torch.jit.trace(module, example)
        extra = {TORCHSCRIPT_METADATA_FILE: metadata.model_dump_json()}
        torch.jit.save(traced, str(out), _extra_files=extra)
    return out


def load_torchscript(path: Path) -> tuple[torch.jit.ScriptModule, ExportMetadata]:
    """Load a TorchScript file and its FedFMX metadata (TorchScript's own loader: no pickle of
    arbitrary objects, only the archive's restricted unpickler)."""
    extra = {TORCHSCRIPT_METADATA_FILE: ""}
    try:
        with _quiet_deprecations():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError, OSError) as error:
        raise DataError(f"{path}: not a loadable TorchScript file ({first_line(error)})") from None
    return module.eval(), ExportMetadata.parse(extra[TORCHSCRIPT_METADATA_FILE], str(path))


@contextmanager
def _quiet_deprecations() -> Iterator[None]:
    """TorchScript and torch.ao warn on every call that they are deprecated (documented above).

    The tracer also warns that GroupNorm's batch-size sanity check becomes a constant; that check
    only guards training, so the traced graph is unaffected.
    """
    with warnings.catch_warnings():
        for category in (FutureWarning, DeprecationWarning, UserWarning, torch.jit.TracerWarning):
            warnings.simplefilter("ignore", category)
        yield
