"""A device's own stream on the raspberry-pi-4 profile: ingestion, camera-to-prediction, disk, RSS.

Runs in one process, as `fedfmx-edge join` does, with the profile's thread counts:

1. **Ingestion**: 1,000 real COIL-20 photos written as files into a watched folder (as PNGs
   at their own 32x32, and as 224x224 RGB JPEGs: what a camera crop looks like), then read by
   the folder source and stored by the sample store (`keep_raw_images` true and false).
   Images/s from the source's start to the 1,000th stored sample; disk of the store (files
   and ledger); peak RSS of the process while it ingests.
2. **Camera to prediction**: a video file of real photos (128x128 RGB) read by the camera
   source's child process, each sampled frame preprocessed and classified at batch 1 by the
   device's int8 ONNX model (exported and parity-checked by `DeviceModelServer`; the weights
   are the fleet's untrained initial ones with 20 class rows: latency does not depend on them)
   and written as a JSON line. Latency: from the frame leaving `VideoCapture.read()` in the
   child to its line being written (the `latency_s` field), p50/p99 over 300 frames.

    nice -n 19 python benchmarks/device_stream.py   # ~2 minutes on 2 cores

Writes benchmarks/results/device_stream.json and .png. Needs ../shared/datasets/coil20 (or
--data-path); exits with a clear message without it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from edge_client.inference import DeviceModelServer
from edge_client.predictions import StreamPredictor
from edge_client.sample_store import SampleStore
from edge_client.sources.camera import CameraSource
from edge_client.sources.folder import FolderSource
from edge_client.stream_config import (
    CameraSourceConfig,
    FolderSourceConfig,
    PredictionsConfig,
    StoreConfig,
)
from export.checkpoint import InputSpec
from fedfmx.config import load_fleet
from fedfmx.data.datasets import ImageDataset, load_dataset
from fedfmx.data.preprocessing import fleet_image_input, model_input
from fedfmx.errors import DataError
from fedfmx.learner.model import build_model, state_to_numpy
from fedfmx.profiles import PeakRss, apply_profile, load_profile
from fedfmx.wire.messages import ModelHeader
from fedfmx_cli.stream_demo import write_video

RESULTS = Path(__file__).parent / "results"
FLEET = Path(__file__).parent.parent / "device_configs" / "fleets" / "stream-coil20.yaml"
IMAGES = 1000
FRAMES = 300


def write_files(dataset: ImageDataset, folder: Path, camera_size: bool) -> None:
    for row in range(IMAGES):
        pixels = np.round(dataset.train_x[row % len(dataset.train_x), 0] * 255).astype(np.uint8)
        name = dataset.class_names[int(dataset.train_y[row % len(dataset.train_y)])]
        target = folder / name / f"{row:05d}.{'jpg' if camera_size else 'png'}"
        target.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(pixels)
        if camera_size:
            image.resize((224, 224), Image.Resampling.BILINEAR).convert("RGB").save(
                target, quality=90
            )
        else:
            image.save(target)


def ingest(dataset: ImageDataset, work: Path, camera_size: bool, keep_raw: bool) -> dict:
    fleet = load_fleet(FLEET)
    folder = work / "labelled"
    write_files(dataset, folder, camera_size)
    store = SampleStore(
        work / "store",
        StoreConfig(keep_raw_images=keep_raw),
        fleet_image_input(fleet),
        fleet.classes,
    )
    source = FolderSource(FolderSourceConfig(path=folder, settle_s=0.0))
    stored = 0
    with PeakRss() as rss:
        started = time.perf_counter()
        source.start()
        while stored < IMAGES and time.perf_counter() - started < 600:
            stored += sum(store.add(sample) for sample in source.poll(0.5))
        elapsed = time.perf_counter() - started
    source.close()
    usage = store.usage()
    store.close()
    return {
        "files": "224x224 RGB JPEG" if camera_size else "32x32 grey PNG",
        "keep_raw_images": keep_raw,
        "stored": stored,
        "seconds": round(elapsed, 3),
        "images_per_s": round(stored / elapsed, 1),
        "store_bytes": usage.bytes,
        "ledger_bytes": usage.ledger_bytes,
        "peak_rss_mb": round(rss.peak_mb, 1),
    }


def latency(dataset: ImageDataset, work: Path, threads: int) -> dict:
    fleet = apply_profile(load_fleet(FLEET), load_profile("raspberry-pi-4"))
    profile = load_profile("raspberry-pi-4")
    names = list(dataset.class_names)
    network = build_model(fleet.model, fleet.routing, len(names), fleet.seed)
    header = ModelHeader(fleet=fleet.name, version=1, class_names=names)
    server = DeviceModelServer(work / "serving", fleet, profile, InputSpec.of_fleet(fleet))
    spec = fleet_image_input(fleet)
    rows = np.arange(200)
    images = dataset.train_x[rows]
    labels = np.array(names)[dataset.train_y[rows]]
    if server.refresh(header, state_to_numpy(network), images, labels) is None:
        raise SystemExit("the int8 export was refused by its parity check")
    predictor = StreamPredictor("bench", spec, PredictionsConfig(output="predictions.jsonl"), work)
    predictor.serve(server.served(), images, labels)
    frames = [
        np.asarray(
            Image.fromarray(np.round(x[0] * 255).astype(np.uint8)).resize((128, 128)).convert("RGB")
        )
        for x in dataset.train_x[:100]
    ]
    video = write_video(work / "clip.avi", frames, fps=30.0)
    camera = CameraSource(
        CameraSourceConfig(url=str(video), sample_fps=15.0, loop_file=True, stall_s=30.0)
    )
    camera.start()
    latencies: list[float] = []
    with PeakRss() as rss:
        give_up = time.monotonic() + 300
        while len(latencies) < FRAMES and time.monotonic() < give_up:
            for sample in camera.poll(1.0):
                record = predictor.classify(sample)
                latencies.append(float(record["latency_s"]))  # type: ignore[arg-type]
    camera.close()
    predictor.close()
    # what batch-1 inference alone costs (preprocessing and the model; no camera, no I/O)
    served = server.served()
    x = model_input(frames[0], spec)[None]
    inference = []
    for _ in range(200):
        started = time.perf_counter()
        served.logits(x)
        inference.append(time.perf_counter() - started)
    ms = np.array(latencies) * 1000
    return {
        "frames": len(latencies),
        "camera_to_prediction_ms": {
            "p50": round(float(np.percentile(ms, 50)), 2),
            "p99": round(float(np.percentile(ms, 99)), 2),
            "max": round(float(ms.max()), 2),
        },
        "model_batch1_ms_p50": round(1000 * float(np.median(inference)), 3),
        "precision": server.quantization.value,
        "peak_rss_mb": round(rss.peak_mb, 1),
        "latencies_ms": [round(v, 2) for v in ms.tolist()],
        "threads": threads,
    }


def plot(result: dict, path: Path) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    runs = result["ingestion"]
    labels = [f"{r['files']}\nraw={'yes' if r['keep_raw_images'] else 'no'}" for r in runs]
    left.bar(range(len(runs)), [r["images_per_s"] for r in runs], color="tab:blue")
    left.set_xticks(range(len(runs)), labels, fontsize=7)
    left.set_ylabel("images/s into the store")
    left.set_title("folder → sample store (1,000 COIL-20 photos)")
    values = np.sort(result["camera"]["latencies_ms"])
    right.plot(values, np.linspace(0, 1, len(values)), color="tab:orange")
    right.set_xlabel("camera-to-prediction latency (ms), batch 1, int8")
    right.set_ylabel("fraction of frames")
    right.set_title(
        f"p50 {result['camera']['camera_to_prediction_ms']['p50']} ms, "
        f"p99 {result['camera']['camera_to_prediction_ms']['p99']} ms"
    )
    figure.suptitle("device stream on the raspberry-pi-4 profile (2 shared x86 cores)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "device_stream.json")
    args = parser.parse_args()
    try:
        dataset = load_dataset("coil20", args.data_path)
    except DataError as error:
        raise SystemExit(f"skipped: {error}") from None
    profile = load_profile("raspberry-pi-4")
    torch.set_num_threads(profile.threads)
    result: dict = {
        "profile": profile.name,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
        "ingestion": [],
    }
    with tempfile.TemporaryDirectory(prefix="device-stream-") as scratch:
        for i, (camera_size, keep_raw) in enumerate(
            [(False, True), (False, False), (True, True), (True, False)]
        ):
            run = ingest(dataset, Path(scratch) / f"ingest-{i}", camera_size, keep_raw)
            print(json.dumps(run))
            result["ingestion"].append(run)
        result["camera"] = latency(dataset, Path(scratch) / "camera", profile.threads)
    result["process_peak_rss_mb"] = round(  # lifetime peak of this process (Linux: KiB)
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
    )
    summary = {k: v for k, v in result["camera"].items() if k != "latencies_ms"}
    print(json.dumps(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
