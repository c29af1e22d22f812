"""On-device inference: `predict` on IDX files and PNG directories, providers, model swaps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from test_export import train_digits_checkpoint
from typer.testing import CliRunner, Result

from export.checkpoint import load_checkpoint
from export.formats import ExportFormat, InferenceProvider, Quantization
from export.inference import ModelServer, execution_providers
from export.pipeline import EvalSet, export_checkpoint
from fedfmx.data.datasets import ImageDataset, load_digits
from fedfmx.errors import ConfigError, DataError
from fedfmx_cli.deploy import register


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    return load_digits()


@pytest.fixture(scope="module")
def model_file(digits: ImageDataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("model")
    checkpoint = load_checkpoint(train_digits_checkpoint(directory))
    out = directory / "model.onnx"
    eval_set = EvalSet.of_dataset(checkpoint, digits)
    export_checkpoint(checkpoint, ExportFormat.onnx, Quantization.none, out, eval_set)
    return out


def write_idx_uint8(path: Path, images: np.ndarray) -> None:
    """IDX: two zero bytes, dtype code 0x08 (uint8), ndims, big-endian uint32 sizes, data."""
    header = bytes([0, 0, 0x08, images.ndim]) + np.array(images.shape, ">u4").tobytes()
    path.write_bytes(header + images.astype(np.uint8).tobytes())


def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def write_pngs(images: np.ndarray, folder: Path) -> None:
    """Unit-range grey images as 8-bit PNGs named 00.png, 01.png, ..."""
    for i, image in enumerate(images):
        Image.fromarray(np.rint(image * 255).astype(np.uint8), mode="L").save(
            folder / f"{i:02d}.png"
        )


def _predict(model: str, images: str, *options: str) -> Result:
    """`fedfmx-edge predict --model MODEL --input IMAGES [options]`."""
    return CliRunner().invoke(cli(), ["predict", "--model", model, "--input", images, *options])


def test_predict_on_an_idx_file_prints_json_lines(
    model_file: Path, digits: ImageDataset, tmp_path: Path
) -> None:
    raw = np.rint(digits.test_x[:, 0] * 16)  # back to the file's 0..16 pixel counts
    write_idx_uint8(tmp_path / "images-idx3-ubyte", raw)
    result = _predict(str(model_file), str(tmp_path / "images-idx3-ubyte"), "--json")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == len(digits.test_y)
    predicted = np.array([r["class_id"] for r in records])
    assert (predicted == digits.test_y).mean() > 0.9
    assert all(r["class_name"] == str(r["class_id"]) and 0 < r["probability"] <= 1 for r in records)


def test_predict_on_a_png_directory_prints_a_table(
    model_file: Path, digits: ImageDataset, tmp_path: Path
) -> None:
    write_pngs(digits.test_x[:20, 0], tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    result = _predict(str(model_file), str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "20 predictions" in result.stdout and "00.png" in result.stdout


def test_predict_with_a_corrupt_model_is_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07 definitely not protobuf")
    result = _predict(str(broken), str(tmp_path))
    assert result.exit_code == 2
    assert "Traceback" not in result.output  # rich wraps the one line at the terminal width
    assert "broken.onnx: not a loadable ONNX model" in " ".join(result.stderr.split())


def test_swap_keeps_serving_the_old_model_when_the_new_file_is_bad(
    model_file: Path, digits: ImageDataset, tmp_path: Path
) -> None:
    server = ModelServer(model_file)
    before = server.predict(digits.test_x[:8])
    broken = tmp_path / "v8.onnx"
    broken.write_bytes(b"truncated")
    with pytest.raises(DataError):
        server.swap(broken)
    assert server.current.path == model_file
    np.testing.assert_array_equal(server.predict(digits.test_x[:8]).class_ids, before.class_ids)
    copy = tmp_path / "v9.onnx"
    copy.write_bytes(model_file.read_bytes())
    assert server.swap(copy).model_version == 7
    assert server.current.path == copy


def test_missing_gpu_provider_is_an_error_unless_the_profile_allows_cpu() -> None:
    cpu_only = ["CPUExecutionProvider"]
    with pytest.raises(ConfigError, match="CUDAExecutionProvider"):
        execution_providers(InferenceProvider.cuda, fallback_to_cpu=False, available=cpu_only)
    assert execution_providers(InferenceProvider.cuda, True, cpu_only) == cpu_only
    jetson = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert execution_providers(InferenceProvider.tensorrt, False, jetson) == jetson
    assert execution_providers(InferenceProvider.cuda, False, jetson) == jetson[1:]


def test_predict_takes_provider_and_threads_from_a_device_profile(
    model_file: Path, digits: ImageDataset, tmp_path: Path
) -> None:
    write_pngs(digits.test_x[:4, 0], tmp_path)
    result = _predict(str(model_file), str(tmp_path), "--profile", "raspberry-pi-4")
    assert result.exit_code == 0, result.output
    assert "4 predictions" in result.stdout
    jetson = tmp_path / "strict-jetson.yaml"
    jetson.write_text(
        "name: strict-jetson\nthreads: 4\ntrain_memory_mb: 1000\nmax_experts_per_round: 2\n"
        "batch_size: 32\nexemplars_per_class: 10\nuse_gpu: true\ngpu_fallback_to_cpu: false\n"
        "inference_provider: tensorrt\n"
    )
    refused = _predict(str(model_file), str(tmp_path), "--profile", str(jetson))
    assert refused.exit_code == 2 and "TensorrtExecutionProvider" in refused.output
