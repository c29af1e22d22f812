"""A device's durable state: one safetensors file, replaced atomically after every round.

It holds what the device learnt (Fisher, anchor, exemplars, distillation teacher, codec
residual, random generator), where it is (last round answered, task, model version), the
verified global model it last used, and the update it has not seen acknowledged yet. One file
written to a temporary name, fsync'ed and renamed over the old one: a power cut leaves the old
state or the new one, never half of each (DESIGN §7). safetensors and JSON only, no pickle.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from fedfmx.device.round import DeviceState
from fedfmx.errors import DataError
from fedfmx.learner.exemplars import ExemplarBuffer

if TYPE_CHECKING:
    from edge_client.statistics_learner import StatisticsLearner
    from fedfmx.device.learner import DeviceLearner
    from fedfmx.learner.fisher import TensorMap

    Learner = DeviceLearner | StatisticsLearner
    """A torch learner, or the torch-free closed-form one (no Fisher, anchor or generator)."""

STATE_FILE = "device-state.safetensors"
FORMAT = 1


@dataclass
class Progress:
    """Where the device stands in the fleet's schedule (the JSON metadata of the file)."""

    device_id: str
    fleet: str
    last_round: int | None = None
    """The last round answered (an update stored as pending, or nothing to send)."""
    model_version: int | None = None
    updates_sent: int = 0
    """Updates the aggregator acknowledged as accepted."""


@dataclass
class Snapshot:
    progress: Progress
    model_payload: bytes | None = None
    """The verified encoded global model of `progress.model_version`."""
    pending_update: bytes | None = None
    """An update sent (or about to be) with no receipt yet: re-sent after a restart."""


def _bytes_array(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).copy()


def _prefixed(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}/{name}": np.ascontiguousarray(value) for name, value in arrays.items()}


def _section(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    start = len(prefix) + 1
    return {name[start:]: value for name, value in arrays.items() if name.startswith(prefix + "/")}


def _learner_arrays(learner: Learner) -> dict[str, np.ndarray]:
    state = learner.state
    arrays = (
        _prefixed("fisher", {n: t.numpy() for n, t in state.old_fisher.items()})
        | _prefixed("anchor", {n: t.numpy() for n, t in state.anchor.items()})
        | _prefixed("residual", state.residual)
        | _prefixed("teacher", state.teacher or {})
        | _prefixed("exemplars", learner.exemplars.state())
    )
    arrays["held"] = state.held.astype(np.int64)
    arrays["contributed"] = state.contributed.astype(np.int64)
    arrays["task"] = np.array([-1 if state.task is None else state.task], dtype=np.int64)
    if learner.generator is not None:
        arrays["generator"] = learner.generator.get_state().numpy()
    return arrays


def save_snapshot(directory: Path, learner: Learner, snapshot: Snapshot) -> None:
    """Write the whole state atomically (temporary file, fsync, rename, fsync the directory)."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = _learner_arrays(learner)
    if snapshot.model_payload is not None:
        arrays["model_payload"] = _bytes_array(snapshot.model_payload)
    if snapshot.pending_update is not None:
        arrays["pending_update"] = _bytes_array(snapshot.pending_update)
    metadata = {"format": str(FORMAT), "progress": json.dumps(asdict(snapshot.progress))}
    target = directory / STATE_FILE
    temporary = directory / f".{STATE_FILE}.tmp"
    save_file(arrays, temporary, metadata=metadata)
    with temporary.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, target)
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def load_snapshot(directory: Path, learner: Learner) -> Snapshot | None:
    """Restore `learner` from the saved state; None when there is none yet.

    A file that cannot be read is a DataError naming it: the device refuses to start from a
    state it cannot trust rather than silently forgetting what it learnt.
    """
    path = directory / STATE_FILE
    if not path.exists():
        return None
    try:
        arrays = load_file(path)
        with safe_open(path, "np") as stored:
            metadata = stored.metadata() or {}
        if metadata.get("format") != str(FORMAT):
            raise DataError(f"{path}: state format {metadata.get('format')}, expected {FORMAT}")
        progress = Progress(**json.loads(metadata["progress"]))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(
            f"{path}: device state is unreadable ({error}); move it away to start afresh"
        ) from None
    task = int(arrays["task"][0])
    teacher = _section(arrays, "teacher")
    learner.state = DeviceState(
        old_fisher=_tensors(_section(arrays, "fisher")),
        anchor=_tensors(_section(arrays, "anchor")),
        held=arrays["held"],
        contributed=arrays.get("contributed", np.empty(0, dtype=np.int64)),
        residual=_section(arrays, "residual"),
        teacher=teacher or None,
        task=None if task < 0 else task,
    )
    exemplars = learner.exemplars
    learner.exemplars = ExemplarBuffer.from_state(
        _section(arrays, "exemplars"), exemplars.per_class, exemplars.total_cap, exemplars.seed
    )
    if learner.generator is not None:
        import torch

        learner.generator.set_state(torch.from_numpy(arrays["generator"]))
    model = arrays.get("model_payload")
    pending = arrays.get("pending_update")
    return Snapshot(
        progress,
        None if model is None else model.tobytes(),
        None if pending is None else pending.tobytes(),
    )


def _tensors(arrays: dict[str, np.ndarray]) -> TensorMap:
    """Saved Fisher or anchor arrays as tensors (torch imported only when there are any: a
    closed-form device keeps none and runs without torch)."""
    if not arrays:
        return {}
    import torch

    return {name: torch.from_numpy(value) for name, value in arrays.items()}
