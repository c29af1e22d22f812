"""The device's YAML and its durable state (what `fedfmx-edge join` resumes from)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from edge_client.config import load_device_config
from edge_client.state import STATE_FILE, Progress, Snapshot, load_snapshot, save_snapshot
from fedfmx.config import load_fleet
from fedfmx.device.learner import DeviceLearner
from fedfmx.errors import ConfigError, DataError
from fedfmx.federation.rounds import RoundKeeper
from fedfmx.federation.simulation import initial_model, load_fleet_dataset, own_partition

FLEET = Path(__file__).parent.parent / "device_configs" / "fleets" / "ci-digits.yaml"


def test_relative_paths_are_read_from_the_yaml_s_folder(tmp_path: Path) -> None:
    folder = tmp_path / "device-007"
    folder.mkdir()
    path = folder / "device.yaml"
    path.write_text(
        "device_id: device-007\n"
        "fleet_file: ../fleet.yaml\n"
        "broker: {url: 'mqtts://broker:8883', ca_file: ca.pem, password_file: /etc/pw}\n"
        "profile: raspberry-pi-4\n"
        "data: {client_index: 7}\n"
        "state_dir: state\n"
    )
    config = load_device_config(path)
    assert config.fleet_file == folder / "../fleet.yaml"
    assert config.broker.ca_file == folder / "ca.pem"
    assert config.broker.password_file == Path("/etc/pw")
    assert config.state_dir == folder / "state"
    assert config.profile == "raspberry-pi-4"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("device_id: d\ndata: {client_index: 0}\nstate_dir: s\nbroker: {port: 1}\n", "broker.port"),
        ("device_id: 'bad id'\ndata: {client_index: 0}\nstate_dir: s\n", "device_id"),
        ("device_id: d\ndata: {client_index: 0\n", "not valid YAML"),
    ],
)
def test_config_errors_are_one_line_naming_the_field(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "device.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        load_device_config(path)
    assert "\n" not in str(error.value)


def learner_after_two_rounds() -> DeviceLearner:
    fleet = load_fleet(FLEET)
    dataset = load_fleet_dataset(fleet)
    samples, stream = own_partition(fleet, dataset, 0)
    learner = DeviceLearner("d0", fleet, samples, stream, seed=5)
    keeper = RoundKeeper(fleet, initial_model(fleet))
    for round_index in range(4):  # crosses a task boundary: Fisher, anchor, exemplars exist
        announcement = keeper.open_round(round_index, ["d0"], 0.0)
        update = learner.handle_round(announcement, keeper.model_header(), keeper.model.weights)
        if update is not None:
            keeper.accept(update)
        keeper.close_round()
    assert learner.state.old_fisher and len(learner.exemplars)
    return learner


def test_a_saved_device_restores_exactly_what_it_learnt(tmp_path: Path) -> None:
    learner = learner_after_two_rounds()
    snapshot = Snapshot(Progress("d0", "ci-digits", 3, 2, 1), b"model", b"pending")
    save_snapshot(tmp_path, learner, snapshot)
    restored_learner = DeviceLearner("d0", learner.fleet, learner.samples, learner.stream, seed=5)
    restored = load_snapshot(tmp_path, restored_learner)
    assert restored == snapshot
    state, back = learner.state, restored_learner.state
    assert state.old_fisher.keys() == back.old_fisher.keys()
    assert all(torch.equal(state.old_fisher[n], back.old_fisher[n]) for n in state.old_fisher)
    assert all(torch.equal(state.anchor[n], back.anchor[n]) for n in state.anchor)
    assert np.array_equal(state.held, back.held) and state.task == back.task
    assert state.residual.keys() == back.residual.keys()
    x, y = learner.exemplars.arrays()
    x2, y2 = restored_learner.exemplars.arrays()
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert torch.equal(learner.generator.get_state(), restored_learner.generator.get_state())


def test_no_state_is_none_and_a_corrupt_one_is_refused(tmp_path: Path) -> None:
    learner = learner_after_two_rounds()
    assert load_snapshot(tmp_path, learner) is None
    save_snapshot(tmp_path, learner, Snapshot(Progress("d0", "ci-digits")))
    path = tmp_path / STATE_FILE
    path.write_bytes(path.read_bytes()[:100])  # a torn write that somehow reached the name
    with pytest.raises(DataError, match="device state is unreadable"):
        load_snapshot(tmp_path, learner)
