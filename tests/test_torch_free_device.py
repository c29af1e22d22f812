"""A closed-form training device without torch (issue 16): its numpy features against the torch
network's, and `fedfmx-edge join` processes on a real Mosquitto that never load torch while
the fleet's head becomes the pooled solve."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from fleet_helpers import device_yaml, small_fleet, write_fleet
from lite0_helpers import needs_weights

from aggregator.service import ServiceHooks, open_aggregator
from edge_client.closed_form_serving import ClosedFormServer
from edge_client.serving_model import TEMPLATE_FILE
from edge_client.statistics_learner import StatisticsLearner
from export.checkpoint import InputSpec
from export.feature_maps import FEATURE_MAPS_FILE, closed_form_features, load_feature_maps
from export.trunk_runtime import TrunkRuntime, fp32_trunk_path
from fedfmx.closed_form.head import FeatureStatistics, solve_head
from fedfmx.closed_form.state import LAMBDA, ROWS_PREFIX, device_view
from fedfmx.config import FleetConfig, load_fleet
from fedfmx.data.fleet_data import load_fleet_dataset, own_partition
from fedfmx.data.stream import SampleTable
from fedfmx.device.learner import DeviceLearner
from fedfmx.device.round import STATISTICS_BATCH
from fedfmx.errors import ConfigError
from fedfmx.federation.rounds import RoundKeeper
from fedfmx.federation.simulation import initial_model
from fedfmx.learner.model import build_model, state_to_numpy
from fedfmx.trunk.taps import tap_sources
from fedfmx.wire.messages import ModelHeader
from fedfmx_cli.serving import export_serving

FLEET = Path(__file__).parent.parent / "device_configs" / "fleets" / "ci-digits.yaml"
JOIN_S = 120.0
LITE0_TAPS = {"backbone": "efficientnet_lite0"}
"""`fedfmx_cf` on the trunk: its experts read the trunk's taps by default."""


def _fleet(method: str, **model: object) -> FleetConfig:
    document = load_fleet(FLEET).model_dump(mode="json")
    document["method"] = method
    document["model"].update(model)
    return FleetConfig.model_validate(document)


@pytest.fixture(scope="module")
def tap_serving(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`export-serving`'s folder for `fedfmx_cf` on the Lite0 trunk (made once: ~20 s)."""
    folder = tmp_path_factory.mktemp("tap-serving")
    export_serving(out=folder, fleet=write_fleet(folder, _fleet("fedfmx_cf", **LITE0_TAPS)))
    return folder


def _torch_features(fleet: FleetConfig, rows: np.ndarray) -> np.ndarray:
    network = build_model(fleet.network, fleet.routing, 1, fleet.seed)
    with torch.no_grad():
        return network.closed_form_features(torch.from_numpy(rows)).numpy()


@needs_weights
def test_fedfmx_cf_on_trunk_taps_gets_its_tap_trunk_and_maps(tap_serving: Path) -> None:
    """Its experts read the trunk's stage outputs: `export-serving` writes the trunk that
    outputs them beside the pool (one pass) and the maps, and no serving template."""
    fleet = load_fleet(tap_serving / "fleet.yaml")
    sources = tap_sources(fleet.model.expert_taps)
    assert sources == ("block4", "block7", "block10")
    trunk = fp32_trunk_path(tap_serving, fleet.model.trunk_input_size, sources)
    outputs = [o.name for o in onnx.load_model(str(trunk), load_external_data=False).graph.output]
    assert outputs == ["features", *sources]
    assert (tap_serving / FEATURE_MAPS_FILE).is_file()
    assert not (tap_serving / TEMPLATE_FILE).exists()
    maps = load_feature_maps(tap_serving / FEATURE_MAPS_FILE)
    assert maps.taps == ("pool", *fleet.model.expert_taps) and maps.width == 2048


@needs_weights
def test_numpy_tap_features_of_the_onnx_trunk_are_the_torch_networks(tap_serving: Path) -> None:
    """Images -> the ONNX trunk's outputs -> numpy pooling, unit norm and projections, against
    the torch network's `φ` of the same images (fp32 both ways)."""
    fleet = load_fleet(tap_serving / "fleet.yaml")
    maps = load_feature_maps(tap_serving / FEATURE_MAPS_FILE)
    size = fleet.model.trunk_input_size
    path = fp32_trunk_path(tap_serving, size, tap_sources(maps.taps))
    trunk = TrunkRuntime.load(path, size, taps=maps.taps)
    rows = load_fleet_dataset(fleet).train_x[:40]  # 40: not a multiple of the trunk's batch
    expected = _torch_features(fleet, rows)
    computed = closed_form_features(maps, trunk.features(rows))
    assert computed.shape == expected.shape == (40, 2048)
    scale = np.abs(expected).max()
    assert scale > 0 and (expected > 0).mean() > 0.2
    np.testing.assert_allclose(computed, expected, rtol=0, atol=1e-5 * scale)


@needs_weights
def test_a_pooled_only_trunk_is_refused_for_tap_features(tap_serving: Path) -> None:
    from export.trunk import export_trunk

    fleet = load_fleet(tap_serving / "fleet.yaml")
    size = fleet.model.trunk_input_size
    pooled = export_trunk(InputSpec.of_fleet(fleet), size, tap_serving / "pooled.onnx")
    with pytest.raises(ConfigError, match="does not output block4, block7, block10"):
        TrunkRuntime.load(pooled, size, taps=("pool", *fleet.model.expert_taps))


@pytest.mark.parametrize(
    ("method", "model"),
    [
        ("ridge", {"random_features": 256}),
        ("fedfmx_cf", {}),  # the shared projection and three convolution banks on the pixels
        ("ridge", {"backbone": "efficientnet_lite0"}),  # the projection of a trunk's pool
    ],
)
def test_numpy_features_are_the_torch_networks(
    tmp_path: Path, method: str, model: dict[str, object]
) -> None:
    fleet = _fleet(method, **model)
    export_serving(out=tmp_path, fleet=write_fleet(tmp_path, fleet))
    maps = load_feature_maps(tmp_path / FEATURE_MAPS_FILE)
    if model.get("backbone"):
        rows = np.random.default_rng(0).gamma(1.0, 0.3, (64, 1280)).astype(np.float32)
    else:
        rows = load_fleet_dataset(fleet).train_x[:64]
    expected = _torch_features(fleet, rows)
    computed = closed_form_features(maps, rows)
    assert computed.shape == expected.shape == (64, maps.width)
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(computed, expected, rtol=0, atol=1e-5 * scale)


def test_feature_maps_naming_an_unknown_map_are_refused(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    fleet = _fleet("ridge", random_features=64)
    export_serving(out=tmp_path, fleet=write_fleet(tmp_path, fleet))
    path = tmp_path / FEATURE_MAPS_FILE
    arrays = load_file(path)
    with safe_open(path, "np") as stored:
        metadata = stored.metadata()
    save_file(arrays | {"taps.extra": np.zeros(3, np.float32)}, path, metadata=metadata)
    with pytest.raises(ConfigError, match="need torch"):
        load_feature_maps(path)


def test_opening_a_closed_form_device_imports_no_torch(tmp_path: Path) -> None:
    """`join`'s CLI, agent and the device it opens for a closed-form fleet, in a fresh
    interpreter: torch is never imported."""
    fleet = small_fleet("mqtt://127.0.0.1:1", clients=2, tasks=2).model_copy(
        update={"method": "fedfmx_cf"}
    )
    fleet_file = write_fleet(tmp_path, fleet)
    export_serving(out=tmp_path / "state-0" / "serving", fleet=fleet_file)
    config = device_yaml(tmp_path, fleet_file, 0, "mqtt://127.0.0.1:1")
    code = (
        "import sys; import fedfmx_cli.main; from edge_client.agent import open_device; "
        "from edge_client.config import load_device_config; from pathlib import Path; "
        f"d = open_device(load_device_config(Path({str(config)!r}))); "
        "print(type(d.learner).__name__, 'torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["StatisticsLearner", "False"]


def test_a_torch_free_device_serves_the_heads_logits_on_its_own_features(tmp_path: Path) -> None:
    """`ClosedFormServer`: a version's head over the learner's numpy `φ` gives the torch
    network's logits; the same version is not served twice, a version without classes never."""
    fleet = _fleet("fedfmx_cf")
    export_serving(out=tmp_path, fleet=write_fleet(tmp_path, fleet))
    samples, stream = own_partition(fleet, load_fleet_dataset(fleet), 0)
    maps = load_feature_maps(tmp_path / FEATURE_MAPS_FILE)
    server = ClosedFormServer(StatisticsLearner("device-000", fleet, samples, stream, maps, None))
    network = build_model(fleet.network, fleet.routing, 3, fleet.seed)
    weights = state_to_numpy(network)
    header = ModelHeader(fleet=fleet.name, version=4, class_names=["a", "b", "c"])
    assert (
        server.refresh(header.model_copy(update={"class_names": []}), weights, *_no_rows()) is None
    )
    served = server.refresh(header, weights, *_no_rows())
    assert (
        served is not None and server.served() is served and served.class_names == ["a", "b", "c"]
    )
    assert server.refresh(header, weights, *_no_rows()) is None
    images = load_fleet_dataset(fleet).train_x[:32]
    with torch.no_grad():
        expected = network(torch.from_numpy(images)).numpy()
    computed = served.logits(images)
    assert computed.shape == expected.shape == (32, 3)
    np.testing.assert_allclose(computed, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def _no_rows() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 1, 8, 8), np.float32), np.zeros(0, np.str_)


def _watch_maps(process: subprocess.Popen[bytes], seen: list[str]) -> None:
    """Every library the running process maps, sampled until it exits."""
    while process.poll() is None:
        try:
            seen.append(Path(f"/proc/{process.pid}/maps").read_text())
        except OSError:
            return
        threading.Event().wait(0.05)


@pytest.mark.parametrize(
    ("method", "model"),
    [
        ("ridge", {"random_features": 256}),
        ("fedfmx_cf", {"random_features": 256}),  # banks on the pixels
        pytest.param("fedfmx_cf", LITE0_TAPS, marks=needs_weights, id="fedfmx_cf-trunk-taps"),
    ],
)
def test_torch_free_devices_join_and_the_head_is_the_pooled_solve(
    tmp_path: Path, mosquitto_broker: object, method: str, model: dict[str, object]
) -> None:
    url = mosquitto_broker.url  # type: ignore[attr-defined]
    serves = model == LITE0_TAPS
    # closed-form rounds take milliseconds: a device's statuses come faster than the default
    # rate limit; plain float32 on the uplink so the merged sums are the pooled ones to fp32
    fleet = small_fleet(url, clients=2, tasks=2, rate_limit={"messages_per_s": 100.0, "burst": 500})
    document = fleet.model_dump(mode="json")
    document["method"] = method
    document["model"].update(model)
    document["codec"] = {"quantize": "none"}
    fleet = FleetConfig.model_validate(document)
    fleet_file = write_fleet(tmp_path, fleet)
    export_serving(out=tmp_path / "state-0" / "serving", fleet=fleet_file)
    shutil.copytree(tmp_path / "state-0" / "serving", tmp_path / "state-1" / "serving")
    aggregator = open_aggregator(fleet, tmp_path / "state.sqlite", ServiceHooks())
    aggregator.start()
    stop = threading.Event()
    serving = threading.Thread(target=aggregator.run, args=(stop,), daemon=True)
    serving.start()
    processes, logs, seen = [], [], [[], []]  # type: ignore[var-annotated]
    try:
        for index in range(2):
            log = (tmp_path / f"device-{index}.log").open("w")
            logs.append(log)
            command = [sys.executable, "-m", "fedfmx_cli", "join", "--config"]
            config = device_yaml(tmp_path, fleet_file, index, url)
            if serves:  # predictions between rounds, still without torch
                config.write_text(config.read_text() + "serve_predictions: true\n")
            process = subprocess.Popen(
                [*command, str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            processes.append(process)
            threading.Thread(target=_watch_maps, args=(process, seen[index]), daemon=True).start()
        for process in processes:
            process.wait(JOIN_S)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        for log in logs:
            log.close()
        stop.set()
        serving.join(30)
    outputs = [(tmp_path / f"device-{i}.log").read_text() for i in range(2)]
    assert [p.returncode for p in processes] == [0, 0], outputs
    for maps, output in zip(seen, outputs, strict=True):
        assert maps, output
        assert not any("libtorch" in sample for sample in maps)
        assert "closed-form device without torch" in output
        assert ("serving closed-form head version" in output) == serves
    model = aggregator.keeper.model
    assert model.version == fleet.protocol.num_rounds
    pooled = FeatureStatistics.empty(model.weights["head.weight"].shape[1])
    dataset = load_fleet_dataset(fleet)
    for index in range(2):
        samples, stream = own_partition(fleet, dataset, index)
        rounds = range(fleet.protocol.num_rounds)  # every row any round offered the device
        ids = np.unique(np.concatenate([stream.available(r) for r in rounds]))
        images, names = samples.rows(ids)
        pooled.add_rows(_torch_features(fleet, images), [str(n) for n in names])
        assert model.weights[ROWS_PREFIX + f"device-{index:03d}"][0] == len(ids)
    lam = float(model.weights[LAMBDA][0])
    expected = solve_head(pooled, model.class_names, lam)
    np.testing.assert_allclose(
        model.weights["head.weight"], expected, rtol=0, atol=1e-3 * np.abs(expected).max()
    )


class CountingSamples:
    """A sample table that records how many rows each read asks for."""

    def __init__(self, samples: SampleTable) -> None:
        self.samples = samples
        self.reads: list[int] = []

    def rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.reads.append(len(ids))
        return self.samples.rows(ids)


def test_the_torch_free_update_is_the_torch_learners(tmp_path: Path) -> None:
    """Same rows, same round: the same header (rows_before, counts, λ hits) and the same
    statistics to float rounding, accepted by the aggregator's validation; rows are read in
    batches, and a round with nothing new sends nothing."""
    fleet = _fleet("fedfmx_cf")  # closed-form uplink default: float32 + zstd
    export_serving(out=tmp_path, fleet=write_fleet(tmp_path, fleet))
    maps = load_feature_maps(tmp_path / FEATURE_MAPS_FILE)
    samples, stream = own_partition(fleet, load_fleet_dataset(fleet), 0)
    counting = CountingSamples(samples)
    torch_free = StatisticsLearner("device-000", fleet, counting, stream, maps, None)
    reference = DeviceLearner("device-000", fleet, samples, stream, seed=0)
    keeper = RoundKeeper(fleet, initial_model(fleet))
    sent = 0
    for round_index in range(4):
        announcement = keeper.open_round(round_index, ["device-000"], deadline_unix=0.0)
        header, weights = keeper.model_header(), device_view(keeper.model.weights)
        torch_free.check_model(header, weights)
        ours = torch_free.handle_round(announcement, header, weights)
        theirs = reference.handle_round(announcement, header, weights)
        assert (ours is None) == (theirs is None)
        if ours is not None and theirs is not None:
            our_header, our_tensors = keeper.decode(ours, "device-000")
            their_header, their_tensors = keeper.decode(theirs, "device-000")
            assert our_header == their_header
            for name, value in their_tensors.items():
                np.testing.assert_allclose(our_tensors[name], value, rtol=1e-4, atol=1e-6)
            keeper.accept(ours, "device-000")
            sent += 1
        keeper.close_round()
    assert sent >= 2
    assert counting.reads and max(counting.reads) <= STATISTICS_BATCH
    held = round(float(keeper.model.weights[ROWS_PREFIX + "device-000"][0]))
    assert held == len(torch_free.state.contributed) > 0
