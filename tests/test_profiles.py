"""Device profiles: the shipped files are valid, and a device obeys the stricter limit."""

from pathlib import Path

import pytest
import torch

from fedfmx.config import FleetConfig
from fedfmx.errors import ConfigError
from fedfmx.profiles import (
    PROFILES_DIR,
    DeviceProfile,
    PeakRss,
    apply_profile,
    load_profile,
    training_device,
)

SHIPPED = ["raspberry-pi-4", "raspberry-pi-5", "jetson-nano", "jetson-orin-nano", "generic-x86"]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert load_profile(PROFILES_DIR / f"{name}.yaml") == profile


def test_profile_limits_win_where_stricter() -> None:
    # batch 64, 2 experts per round, 20 exemplars per class, 2 threads
    fleet = FleetConfig(method="fedfmx")
    pi4 = apply_profile(fleet, load_profile("raspberry-pi-4"))
    assert (pi4.training.batch_size, pi4.training.threads) == (32, 3)
    assert pi4.fedfmx.max_experts_per_round == 1
    assert pi4.training.exemplars_per_class == 10
    orin = apply_profile(fleet, load_profile("jetson-orin-nano"))
    assert orin.training.batch_size == 64  # the fleet's smaller batch wins
    assert orin.fedfmx.max_experts_per_round == 2
    assert orin.training.exemplars_per_class == 20


def test_missing_gpu_falls_back_only_when_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    nano = load_profile("jetson-nano")
    assert training_device(nano) == torch.device("cpu")
    strict = nano.model_copy(update={"gpu_fallback_to_cpu": False})
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        training_device(strict)


def test_bad_profiles_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no such device profile .*raspberry-pi-4"):
        load_profile("raspberry-pi-9")
    bad = tmp_path / "bad.yaml"
    fields = ["name: x", "threads: 0", "train_memory_mb: 1", "max_experts_per_round: 1"]
    bad.write_text("\n".join([*fields, "batch_size: 1", "exemplars_per_class: 0"]))
    with pytest.raises(ConfigError, match="threads"):
        load_profile(bad)
    assert isinstance(load_profile("generic-x86"), DeviceProfile)


def test_peak_rss_counts_memory_held_during_the_block() -> None:
    with PeakRss() as before:
        pass
    with PeakRss() as during:
        block = bytearray(200 * 2**20)
        block[::4096] = b"x" * len(block[::4096])  # touch every page: 200 MB resident
    del block
    assert during.peak_mb > before.peak_mb + 150
