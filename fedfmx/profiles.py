"""Device profiles: the limits of a class of hardware, and how a device's training obeys them.

A profile lives in `device_configs/<name>.yaml`. The fleet says how the fleet learns; the profile
says what this device can afford, and wins wherever it is stricter (threads, batch size, experts
trained per round, exemplars kept).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import psutil
from pydantic import BaseModel, ConfigDict, Field

from fedfmx.config import FleetConfig, read_yaml, validate_document
from fedfmx.errors import ConfigError

if TYPE_CHECKING:  # torch only to train: a serving-only device reads its profile without it
    import torch

log = logging.getLogger(__name__)

PROFILES_DIR = Path(__file__).resolve().parent.parent / "device_configs"


class DeviceProfile(BaseModel):
    """What one kind of device can do; every field is a limit the device enforces."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    threads: int = Field(ge=1)
    """Torch intra-op threads for training (leave a core to the camera pipeline)."""
    train_memory_mb: int = Field(gt=0)
    """Budget for the training process's peak RSS; reported against the measured peak."""
    max_experts_per_round: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    exemplars_per_class: int = Field(ge=0)
    use_gpu: bool = False
    gpu_fallback_to_cpu: bool = True
    """When the GPU is asked for but absent: train on the CPU (True) or refuse to start."""
    inference_precision: Literal["fp32", "int8"] = "int8"
    inference_provider: Literal["cpu", "cuda", "tensorrt"] = "cpu"


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A profile by name (`raspberry-pi-4`) from `device_configs/`, or from a YAML path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
        raise ConfigError(f"{path}: no such device profile (known: {known})")
    return validate_document(DeviceProfile, read_yaml(path, "device profile"), str(path))


def training_device(profile: DeviceProfile) -> torch.device:
    """The device to train on; says clearly when the profile's GPU is missing."""
    import torch

    if not profile.use_gpu:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not profile.gpu_fallback_to_cpu:
        raise ConfigError(
            f"profile {profile.name} needs a CUDA GPU and none is present; "
            "set gpu_fallback_to_cpu: true to train on the CPU"
        )
    log.warning("profile %s asks for a GPU but none is present: training on the CPU", profile.name)
    return torch.device("cpu")


def apply_profile(fleet: FleetConfig, profile: DeviceProfile) -> FleetConfig:
    """The fleet as this device runs it: the stricter of fleet and profile for every limit."""
    training = fleet.training.model_copy(
        update={
            "threads": profile.threads,
            "batch_size": min(fleet.training.batch_size, profile.batch_size),
            "exemplars_per_class": min(
                fleet.training.exemplars_per_class, profile.exemplars_per_class
            ),
        }
    )
    fedfmx = fleet.fedfmx.model_copy(
        update={
            "max_experts_per_round": min(
                fleet.fedfmx.max_experts_per_round, profile.max_experts_per_round
            )
        }
    )
    return fleet.model_copy(update={"training": training, "fedfmx": fedfmx})


class PeakRss:
    """Samples this process's resident memory on a thread while a block runs; `peak_mb` after.

    `ru_maxrss` only knows the lifetime peak (data loading included); a device wants the peak
    of each round, against its profile's `train_memory_mb`.
    """

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        process = psutil.Process()
        while True:
            self.peak_mb = max(self.peak_mb, process.memory_info().rss / 2**20)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, psutil.Process().memory_info().rss / 2**20)
