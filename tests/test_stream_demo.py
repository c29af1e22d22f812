"""The stream demo's material: the feeder follows the plan, the camera demo writes a fleet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from edge_client.config import load_device_config
from fedfmx.config import load_fleet
from fedfmx.data.datasets import DataError, load_dataset
from fedfmx.federation.simulation import load_fleet_dataset, make_plan
from fedfmx_cli.stream_demo import FolderFeeder, camera_demo

FLEETS = Path(__file__).parent.parent / "device_configs" / "fleets"


def test_the_feeder_writes_each_devices_share_when_the_plan_says(tmp_path: Path) -> None:
    fleet = load_fleet(FLEETS / "ci-digits.yaml")
    dataset = load_fleet_dataset(fleet)
    folders = [tmp_path / f"d{k}" for k in range(fleet.protocol.num_clients)]
    feeder = FolderFeeder(fleet, dataset, folders)
    plan = make_plan(fleet, dataset)
    expected: list[set[int]] = [set() for _ in folders]
    for round_index in range(3):
        feeder.deliver(round_index)
        for k, folder in enumerate(folders):
            expected[k] |= set(plan.stream(k, fleet.seed).available(round_index).tolist())
            files = list(folder.rglob("*")) if folder.exists() else []
            images = [p for p in files if p.is_file()]
            assert {int(p.stem) for p in images} == expected[k]  # no partial, no dot-file
            for path in images:
                assert path.parent.name == dataset.class_names[int(dataset.train_y[int(path.stem)])]
    assert feeder.deliver(plan.num_rounds) == 0  # past the schedule: nothing more


def test_camera_demo_writes_a_fleet_a_device_a_labels_folder_and_a_video(tmp_path: Path) -> None:
    try:
        load_dataset("coil20")
    except DataError as error:
        pytest.skip(f"COIL-20 absent: {error}")
    paths = camera_demo(tmp_path, None, "mqtt://127.0.0.1:1883")
    assert {p.name for p in paths} == {"fleet.yaml", "camera.yaml", "street.avi"}
    fleet = load_fleet(tmp_path / "fleet.yaml")
    device = load_device_config(tmp_path / "camera.yaml")
    assert device.data.source == "camera" and fleet.name == "camera-demo"
    classes = sorted(
        p.relative_to(tmp_path / "labelled").as_posix() for p in (tmp_path / "labelled").glob("*/*")
    )
    assert classes == [f"coil20/obj{i:02d}" for i in range(1, 5)]
    import cv2

    capture = cv2.VideoCapture(str(tmp_path / "street.avi"))
    frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    ok, first = capture.read()
    capture.release()
    assert ok and first.shape == (128, 128, 3) and frames == 48
    assert np.asarray(first).std() > 5  # a photo, not a blank frame
    assert yaml.safe_load((tmp_path / "camera.yaml").read_text())["predictions"]["mqtt"]
