"""A serving-only device (`role: serve`): the template it fills, and a real fleet it follows
without ever importing torch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from fleet_helpers import device_yaml, run_to_end, small_fleet, write_fleet
from stream_images import write_digits

from aggregator.service import Aggregator, ServiceHooks, open_aggregator
from edge_client.config import DeviceConfig
from edge_client.serving_device import open_serving_device
from export.checkpoint import Checkpoint, InputSpec
from export.inference import read_onnx_metadata
from export.onnx_model import INPUT_NAME
from export.template import export_template, fill_template
from fedfmx.config import load_fleet
from fedfmx.errors import ConfigError, ProtocolError
from fedfmx.learner.model import build_model, state_to_numpy
from fedfmx.wire.messages import ModelHeader
from fedfmx_cli.serving import export_serving
from transport import find_mosquitto

FLEET = Path(__file__).parent.parent / "device_configs" / "fleets" / "ci-digits.yaml"


def _template(tmp_path: Path) -> tuple[Path, Checkpoint]:
    fleet = load_fleet(FLEET)
    model = build_model(fleet.network, fleet.routing, 2, fleet.seed)
    header = ModelHeader(fleet=fleet.name, version=0, class_names=["0", "1"])
    checkpoint = Checkpoint(fleet, header, InputSpec.of_fleet(fleet), state_to_numpy(model))
    return export_template(checkpoint, tmp_path / "template.onnx"), checkpoint


def test_filled_template_computes_the_version_torch_computes(tmp_path: Path) -> None:
    path, checkpoint = _template(tmp_path)
    fleet = checkpoint.fleet
    grown = build_model(fleet.network, fleet.routing, 5, fleet.seed + 1).eval()  # 5 classes now
    header = ModelHeader(fleet=fleet.name, version=3, class_names=list("abcde"))
    metadata = read_onnx_metadata(path).model_copy(
        update={"model_version": 3, "class_names": header.class_names}
    )
    filled = fill_template(onnx.load_model(str(path)), state_to_numpy(grown), metadata, "t")
    session = ort.InferenceSession(filled.SerializeToString(), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).random((7, 1, 8, 8), dtype=np.float32)
    onnx_logits = session.run(None, {INPUT_NAME: images})[0]
    with torch.no_grad():
        torch_logits = grown(torch.from_numpy(images)).numpy()
    assert onnx_logits.shape == (7, 5)
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-5)


def test_fill_refuses_weights_of_another_model(tmp_path: Path) -> None:
    path, checkpoint = _template(tmp_path)
    metadata = read_onnx_metadata(path)
    weights = dict(checkpoint.weights)
    name = next(n for n in weights if n.startswith("experts."))
    weights[name] = np.zeros((3, 3), np.float32)
    with pytest.raises(ProtocolError, match="shape"):
        fill_template(onnx.load_model(str(path)), weights, metadata, "t")
    del weights[name]
    with pytest.raises(ProtocolError, match="lacks"):
        fill_template(onnx.load_model(str(path)), weights, metadata, "t")


def test_a_serving_device_needs_its_own_source(tmp_path: Path) -> None:
    config = DeviceConfig(
        device_id="viewer",
        data={"client_index": 0},  # type: ignore[arg-type]
        state_dir=tmp_path,
        role="serve",
    )
    with pytest.raises(ConfigError, match="own source"):
        open_serving_device(config)


def test_serving_code_paths_import_no_torch() -> None:
    """Everything `join` loads for `role: serve` (CLI, serving device, template fill, int8
    quantizers, trunk runtime) imports without torch, in a fresh interpreter."""
    code = (
        "import sys; import fedfmx_cli.main, edge_client.serving_device, export.template, "
        "export.trunk, export.quantize, edge_client.device_trunk; "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def _wait_for(predicate: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.2)
    return False


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed")
def test_serving_only_device_serves_the_fleets_model_without_torch(
    tmp_path: Path, mosquitto_broker: object
) -> None:
    """A real fleet (aggregator, two training devices) on Mosquitto; a `fedfmx-edge join`
    process with `role: serve` follows it and serves its last version, and never maps a torch
    library into its memory (checked in /proc/<pid>/maps while it runs)."""
    url = mosquitto_broker.url  # type: ignore[attr-defined]
    fleet = small_fleet(url, clients=2, tasks=2)
    fleet_file = write_fleet(tmp_path, fleet)
    export_serving(out=tmp_path / "serving", fleet=fleet_file)
    for label in range(10):
        write_digits(tmp_path / "labelled", label, 4)
    serve_yaml = tmp_path / "serve.yaml"
    serve_yaml.write_text(
        yaml.safe_dump(
            {
                "device_id": "viewer-1",
                "fleet_file": str(fleet_file),
                "broker": {"url": url},
                "data": {"source": "folder", "path": str(tmp_path / "labelled"), "settle_s": 0},
                "state_dir": str(tmp_path / "viewer"),
                "role": "serve",
                "serving_files": str(tmp_path / "serving"),
                "profile": "raspberry-pi-4",  # int8: dynamic int8, parity-checked on the device
            }
        )
    )
    log = (tmp_path / "viewer.log").open("w")
    viewer = subprocess.Popen(
        [sys.executable, "-m", "fedfmx_cli", "join", "--config", str(serve_yaml)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    text = (tmp_path / "viewer.log").read_text
    merged: list[Aggregator] = []

    def served_before_next_round(_: object) -> None:
        """The viewer serves each version before the next is merged: it then holds the base
        of the next version's delta."""
        _wait_for(lambda: f"serving model version {merged[0].keeper.model.version} " in text(), 60)

    try:
        assert _wait_for(lambda: "connected to" in text(), 60), text()
        hooks = ServiceHooks(on_round=served_before_next_round)
        aggregator = open_aggregator(fleet, tmp_path / "state.sqlite", hooks)
        merged.append(aggregator)
        aggregator.start()
        configs = [device_yaml(tmp_path, fleet_file, i, url) for i in range(2)]
        run_to_end(aggregator, configs)
        last = aggregator.keeper.model.version
        assert _wait_for(lambda: f"serving model version {last} " in text(), 90), text()
        maps = Path(f"/proc/{viewer.pid}/maps").read_text()
        assert "libtorch" not in maps and "onnxruntime" in maps
        assert viewer.poll() is None
    finally:
        viewer.send_signal(signal.SIGTERM)
        viewer.wait(30)
        log.close()
    assert viewer.returncode == 0
    output = (tmp_path / "viewer.log").read_text()
    assert "int8-dynamic" in output
    # after the first version in full, the next ones come as deltas against the one served
    assert "from its delta against" in output, output
