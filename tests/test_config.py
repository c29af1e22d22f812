"""Fleet YAML: the shipped files are valid, the demo equals the defaults, errors are one line."""

from pathlib import Path

import pytest

from fedfmx.config import FleetConfig, load_fleet
from fedfmx.errors import ConfigError
from fedfmx.evaluation.benchmark import BENCH_FLEET

FLEETS = Path(__file__).parent.parent / "device_configs" / "fleets"


def test_demo_yaml_is_the_embedded_default() -> None:
    assert load_fleet(FLEETS / "demo.yaml") == FleetConfig()
    assert load_fleet(None) == FleetConfig()


@pytest.mark.parametrize("path", sorted(FLEETS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_fleet_is_valid(path: Path) -> None:
    assert load_fleet(path).name


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("protocol: {alpha: -1}", "protocol.alpha"),
        ("data: {dataset: cifar10}", "'fashion_mnist', 'digits'"),
        ("method: nope", "method"),
        ("protocol: {rounds_per_task: 2, max_lag: 2}", "lags must be < rounds_per_task"),
        ("model: {num_experts: 2}\nfedfmx: {k_max: 3}", "k_max"),
        ("trainnig: {}", "trainnig"),
        ("- a\n- b", "expected a mapping"),
        ("protocol: {alpha: [", "not valid YAML"),
    ],
)
def test_bad_fleet_gives_one_line_naming_the_field(
    tmp_path: Path, text: str, fragment: str
) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_fleet(path)
    message = str(error.value)
    assert fragment in message
    assert "\n" not in message


def test_missing_fleet_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such fleet file"):
        load_fleet(tmp_path / "absent.yaml")


def test_benchmark_fleet_file_matches_the_embedded_one() -> None:
    assert load_fleet(FLEETS / "fcil-fmnist.yaml") == FleetConfig.model_validate(BENCH_FLEET)
