"""Peak RSS and time of a device's local rounds under each device profile's limits.

    python benchmarks/device_profiles.py      # → results/device_profiles.json  (~3 min)
    python benchmarks/device_profiles.py --method ridge --backbone efficientnet_lite0 \\
        --profile raspberry-pi-4  # → results/device_profiles_<method>_<backbone>.json

Each profile runs in its own process (so memory is that device's alone): the demo fleet's first
device, with the profile applied (threads, batch size, expert budget, exemplar cap), holding
only its own share of Fashion-MNIST, runs its first four rounds (task 0 with the backbone, then
the first round of task 1: Fisher, exemplars, FRES). Times are on this x86 machine with the
profile's thread count, not on the device itself.

`--method` and `--backbone` measure another method (a closed-form one sends statistics and
trains nothing) or the frozen pretrained trunk (with the device's feature cache, filled during
these rounds). `--int8-trunk` computes the cache's misses with the device's int8 ONNX trunk
(`export.trunk`, calibrated on its first 256 images, made in a child process as
`edge_client.device_trunk` makes it) instead of the torch trunk.
`--serving-only` measures a `role: serve` device instead (`edge_client.serving_model`, no
torch): the template and fp32 trunk are written first (with torch, as `export-serving` does),
then a child process that never imports torch makes its int8 trunk, fills, quantizes and
parity-checks one model version on 512 of the device's images and classifies 300 frames at
batch 1. `--torch-free` measures a closed-form training device without torch
(`edge_client.statistics_learner`): the parent writes the serving files with torch, as
`fedfmx-edge export-serving` does (fp32 trunk — for `fedfmx_cf` on the trunk the one that also
outputs its taps — and feature maps), and keeps the aggregator's side; the child, which never
imports torch, loads its share, opens its learner as `join` does (making its int8 trunk with
`--int8-trunk`, else opening the fp32 one), and answers the parent's rounds over a pipe (so
its memory is the device's alone). `--malloc-arena-max N` runs
each child with `MALLOC_ARENA_MAX=N` (glibc).

Peak RSS: the highest of /proc/self/status VmRSS sampled every 10 ms during each round (the
serving child: VmHWM, its whole life). `load_average` records the machine's load.

    python benchmarks/device_profiles.py --backbone efficientnet_lite0 --int8-trunk \\
        --profile raspberry-pi-4   # → results/device_profiles_fedfmx_efficientnet_lite0_int8.json
    python benchmarks/device_profiles.py --backbone efficientnet_lite0 --serving-only \\
        --profile raspberry-pi-4   # → results/device_profiles_serving_efficientnet_lite0.json
    python benchmarks/device_profiles.py --method ridge --backbone efficientnet_lite0 \\
        --torch-free --int8-trunk --profile raspberry-pi-4
        # → results/device_profiles_torchfree_ridge_efficientnet_lite0_int8.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fedfmx.config import FleetConfig
from fedfmx.profiles import PROFILES_DIR, DeviceProfile, PeakRss, apply_profile, load_profile

RESULTS = Path(__file__).parent / "results"
ROUNDS = 4
SERVED_FRAMES = 300


def fleet_of(profile: DeviceProfile, method: str, backbone: str) -> FleetConfig:
    default = FleetConfig()
    base = FleetConfig.model_validate(
        default.model_dump()
        | {"method": method, "model": default.model.model_dump() | {"backbone": backbone}}
    )
    return apply_profile(base, profile)


def process_memory_mb() -> dict[str, float]:
    status = Path("/proc/self/status").read_text()
    return {
        key: int(re.search(rf"{key}:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
        for key in ("VmRSS", "VmHWM")
    }


def rounds_summary(
    profile: DeviceProfile,
    rounds: Sequence[Mapping[str, float | int | bool]],
    rss_before_mb: float,
    rows: int,
) -> dict[str, object]:
    """A profile's rounds, their mean time (rounds that sent something) and peak RSS."""
    peak = max(float(r["peak_rss_mb"]) for r in rounds)
    return {
        "rss_before_rounds_mb": rss_before_mb,
        "profile": profile.model_dump(),
        "rows_held": rows,
        "rounds": rounds,
        "mean_round_s": float(np.mean([r["seconds"] for r in rounds if r["trained"]])),
        "peak_rss_mb": peak,
        "within_memory_budget": peak <= profile.train_memory_mb,
    }


def measure(profile_name: str, method: str, backbone: str, int8_trunk: bool) -> dict[str, object]:
    import torch

    from fedfmx.device.learner import DeviceLearner
    from fedfmx.evaluation.benchmark import time_device_rounds
    from fedfmx.federation.simulation import load_fleet_dataset, own_partition

    profile = load_profile(profile_name)
    fleet = fleet_of(profile, method, backbone)
    torch.set_num_threads(profile.threads)
    dataset = load_fleet_dataset(fleet)
    samples, stream = own_partition(fleet, dataset, 0)
    del dataset  # a device holds its own rows only
    trunk = None
    with tempfile.TemporaryDirectory(prefix="device-trunk-") as folder:
        if int8_trunk:  # imported only here: ONNX Runtime is ~20 MB of a torch-trunk device
            from edge_client.device_trunk import calibration_images, make_trunk_in_child
            from export.checkpoint import InputSpec
            from export.trunk_runtime import TrunkRuntime

            size = fleet.model.trunk_input_size
            images = calibration_images(samples, stream, fleet.protocol.num_rounds)
            path = make_trunk_in_child(Path(folder), InputSpec.of_fleet(fleet), size, images)
            trunk = TrunkRuntime.load(path, size, profile.threads)
        before = process_memory_mb()
        device = DeviceLearner("device-000", fleet, samples, stream, seed=0, trunk=trunk)
        rounds = time_device_rounds(device, fleet, ROUNDS)
    summary = rounds_summary(profile, rounds, before["VmRSS"], len(stream.rows))
    return {"method": method, "backbone": backbone, "int8_trunk": int8_trunk} | summary


def frame(stream: IO[bytes], data: bytes) -> None:
    stream.write(struct.pack("<I", len(data)) + data)
    stream.flush()


def read_frame(stream: IO[bytes]) -> bytes:
    (size,) = struct.unpack("<I", stream.read(4))
    return stream.read(size)


def run_torch_free(profile_name: str, method: str, backbone: str, int8_trunk: bool) -> str:
    """The aggregator's side in this process (torch: the initial model), the device in a child
    that never imports torch: each round's announcement and device-view model go down a pipe,
    the update comes back, so the child's memory is the device's alone. Returns its JSON."""
    import yaml

    from export.feature_maps import FEATURE_MAPS_FILE
    from fedfmx.federation.rounds import RoundKeeper
    from fedfmx.federation.simulation import initial_model
    from fedfmx_cli.serving import export_serving

    fleet = fleet_of(load_profile(profile_name), method, backbone)
    with tempfile.TemporaryDirectory(prefix="torch-free-device-") as scratch:
        serving = Path(scratch) / "serving"
        fleet_file = Path(scratch) / "fleet.yaml"
        fleet_file.write_text(yaml.safe_dump(fleet.model_dump(mode="json")))
        export_serving(out=serving, fleet=fleet_file)  # what an operator runs, with torch
        if not (serving / FEATURE_MAPS_FILE).is_file():
            raise SystemExit(f"{method} on {backbone}: numpy cannot compute its features")
        command = [sys.executable, __file__, "--child", profile_name, "--method", method]
        command += ["--backbone", backbone, "--torch-free-folder", scratch]
        command += ["--int8-trunk"] if int8_trunk else []
        child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert child.stdin is not None and child.stdout is not None
        keeper = RoundKeeper(fleet, initial_model(fleet))
        for round_index in range(ROUNDS):
            announcement = keeper.open_round(round_index, ["device-000"], deadline_unix=0.0)
            frame(child.stdin, announcement.model_dump_json().encode())
            frame(child.stdin, keeper.device_payload())
            update = read_frame(child.stdout)
            if update:
                keeper.accept(update)
            keeper.close_round()
        frame(child.stdin, b"")
        output = child.stdout.read().decode()
        if child.wait() != 0:
            raise SystemExit("the torch-free device child failed")
    return output


def measure_torch_free(
    profile_name: str, method: str, backbone: str, int8_trunk: bool, folder: Path
) -> dict[str, object]:
    """A closed-form device's rounds in this process, which must not import torch: the rounds
    come from the parent (`run_torch_free`) over stdin, the updates go back over stdout."""
    from edge_client.config import DeviceConfig, PartitionSource
    from edge_client.device_data import DeviceData
    from edge_client.statistics_learner import open_statistics_learner
    from fedfmx.data.fleet_data import load_fleet_dataset, own_partition
    from fedfmx.wire.codec import MAX_MODEL_BYTES, decode_model
    from fedfmx.wire.messages import RoundAnnouncement

    profile = load_profile(profile_name)
    fleet = fleet_of(profile, method, backbone)
    dataset = load_fleet_dataset(fleet)
    samples, stream = own_partition(fleet, dataset, 0)
    del dataset  # a device holds its own rows only
    config = DeviceConfig(
        device_id="device-000",
        data=PartitionSource(client_index=0),
        state_dir=folder,
        serving_files=folder / "serving",
        int8_trunk=int8_trunk,
        serve_predictions=False,
    )
    device = open_statistics_learner(config, fleet, DeviceData(samples, stream, None))
    before = process_memory_mb()
    rounds: list[dict[str, float | int | bool]] = []
    pipe_in, pipe_out = sys.stdin.buffer, sys.stdout.buffer
    while message := read_frame(pipe_in):
        announcement = RoundAnnouncement.model_validate_json(message)
        started = time.perf_counter()
        with PeakRss() as memory:  # what the agent does with a round: decode, check, compute
            header, weights = decode_model(read_frame(pipe_in), max_bytes=MAX_MODEL_BYTES)
            device.check_model(header, weights)
            payload = device.handle_round(announcement, header, weights)
            del weights
        rounds.append(
            {
                "round": announcement.round,
                "seconds": time.perf_counter() - started,
                "peak_rss_mb": memory.peak_mb,
                "trained": payload is not None,
                "rows_held": len(device.state.held),
                "uplink_bytes": len(payload or b""),
            }
        )
        frame(pipe_out, payload or b"")
    summary = rounds_summary(profile, rounds, before["VmRSS"], len(stream.rows))
    return (
        {"method": method, "backbone": backbone, "int8_trunk": int8_trunk}
        | summary
        | {
            "torch_imported": "torch" in sys.modules,
            "process_peak_rss_mb": process_memory_mb()["VmHWM"],
        }
    )


def prepare_serving(profile_name: str, backbone: str, folder: Path) -> Path:
    """The serving files (template, fp32 trunk), one model version and the device's images,
    written with torch in the parent, as an operator's `export-serving` would."""
    from export.checkpoint import Checkpoint, InputSpec
    from export.template import export_template
    from export.trunk import export_trunk, fp32_trunk_path
    from fedfmx.federation.simulation import load_fleet_dataset
    from fedfmx.learner.model import build_model, state_to_numpy
    from fedfmx.wire.codec import encode_model
    from fedfmx.wire.messages import ModelHeader

    fleet = fleet_of(load_profile(profile_name), "fedfmx", backbone)
    dataset = load_fleet_dataset(fleet)
    names = list(dataset.class_names)
    model = build_model(fleet.network, fleet.routing, len(names), fleet.seed)
    header = ModelHeader(fleet=fleet.name, version=1, class_names=names)
    checkpoint = Checkpoint(fleet, header, InputSpec.of_fleet(fleet), state_to_numpy(model))
    export_template(checkpoint, folder / "serving" / "template.onnx")
    if backbone == "efficientnet_lite0":
        size = fleet.model.trunk_input_size
        export_trunk(checkpoint.input, size, fp32_trunk_path(folder / "serving", size))
    (folder / "version.bin").write_bytes(encode_model(header, checkpoint.weights))
    rows = np.random.default_rng(0).permutation(len(dataset.train_x))[:1024]
    np.save(folder / "images.npy", dataset.train_x[rows])
    np.save(folder / "names.npy", np.array(names)[dataset.train_y[rows]])
    return folder


def measure_serving(profile_name: str, folder: Path) -> dict[str, object]:
    """A serving-only device's life in this process (which must not import torch)."""
    from edge_client.serving_model import ServingModel
    from fedfmx.wire.codec import MAX_MODEL_BYTES, decode_model

    started = time.perf_counter()
    profile = load_profile(profile_name)
    header, weights = decode_model((folder / "version.bin").read_bytes(), max_bytes=MAX_MODEL_BYTES)
    images, names = np.load(folder / "images.npy"), np.load(folder / "names.npy")
    model = ServingModel(folder / "serving", folder / "served", profile, None)
    model_config = model.metadata.model
    pretrained = model_config.backbone == "efficientnet_lite0"
    model.input_size = model_config.trunk_input_size if pretrained else None
    imported_mb = process_memory_mb()["VmRSS"]
    begin = time.perf_counter()
    served = model.refresh(header, weights, images[:512], names[:512])
    refresh_s = time.perf_counter() - begin
    assert served is not None
    logits = model.served().logits
    latencies = []
    for frame in images[512 : 512 + SERVED_FRAMES]:
        begin = time.perf_counter()
        logits(frame[None])
        latencies.append(time.perf_counter() - begin)
    memory = process_memory_mb()
    return {
        "backbone": model_config.backbone,
        "profile": profile.model_dump(),
        "torch_imported": "torch" in sys.modules,
        "rss_after_imports_mb": imported_mb,
        "refresh_s": refresh_s,
        "parity": None if served.parity is None else served.parity.to_json(),
        "batch1_latency_ms_median": float(np.median(latencies) * 1e3),
        "frames": len(latencies),
        "seconds": time.perf_counter() - started,
        "rss_end_mb": memory["VmRSS"],
        "peak_rss_mb": memory["VmHWM"],
        "within_memory_budget": memory["VmHWM"] <= profile.train_memory_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="fedfmx")
    parser.add_argument("--backbone", default="cnn", choices=["cnn", "efficientnet_lite0"])
    parser.add_argument("--profile", action="append", help="profiles to run (default: all)")
    parser.add_argument("--int8-trunk", action="store_true")
    parser.add_argument("--serving-only", action="store_true")
    parser.add_argument("--serving-folder", help=argparse.SUPPRESS)
    parser.add_argument("--torch-free", action="store_true")
    parser.add_argument("--torch-free-folder", help=argparse.SUPPRESS)
    parser.add_argument("--malloc-arena-max", type=int)
    args = parser.parse_args()
    if args.child:
        if args.serving_folder:
            cell = measure_serving(args.child, Path(args.serving_folder))
        elif args.torch_free_folder:
            folder = Path(args.torch_free_folder)
            cell = measure_torch_free(
                args.child, args.method, args.backbone, args.int8_trunk, folder
            )
        else:
            cell = measure(args.child, args.method, args.backbone, args.int8_trunk)
        print(json.dumps(cell))
        return
    env = dict(os.environ)
    if args.malloc_arena_max is not None:
        env["MALLOC_ARENA_MAX"] = str(args.malloc_arena_max)
    results = {}
    names = args.profile or [path.stem for path in sorted(PROFILES_DIR.glob("*.yaml"))]
    with tempfile.TemporaryDirectory(prefix="serving-device-") as scratch:
        for name in names:
            command = [sys.executable, __file__, "--child", name, "--method", args.method]
            command += ["--backbone", args.backbone]
            if args.int8_trunk:
                command.append("--int8-trunk")
            if args.serving_only:
                folder = prepare_serving(name, args.backbone, Path(scratch) / name)
                command += ["--serving-folder", str(folder)]
            if args.torch_free:
                output = run_torch_free(name, args.method, args.backbone, args.int8_trunk)
            else:
                output = subprocess.run(
                    command, check=True, capture_output=True, text=True, env=env
                ).stdout
            results[name] = json.loads(output.strip().splitlines()[-1])
            cell = results[name]
            budget = cell["profile"]["train_memory_mb"]
            speed = (
                f"{cell['refresh_s']:.1f} s to serve a version, "
                f"{cell['batch1_latency_ms_median']:.2f} ms a frame"
                if args.serving_only
                else f"{cell['mean_round_s']:.1f} s per local round"
            )
            print(
                f"{name}: {speed}, peak RSS {cell['peak_rss_mb']:.0f} MB (budget {budget} MB)",
                flush=True,
            )
    document = {
        "benchmark": "device_profiles",
        "machine": f"{platform.platform()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg(),
        "malloc_arena_max": args.malloc_arena_max,
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    default = args.method == "fedfmx" and args.backbone == "cnn"
    stem = "device_profiles" if default else f"device_profiles_{args.method}_{args.backbone}"
    if args.serving_only:
        stem = f"device_profiles_serving_{args.backbone}"
    elif args.torch_free:
        stem = f"device_profiles_torchfree_{args.method}_{args.backbone}"
        stem += "_int8" if args.int8_trunk else ""
    elif args.int8_trunk:
        stem += "_int8"
    if args.malloc_arena_max is not None:
        stem += f"_arena{args.malloc_arena_max}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(document, indent=2))
    _plot(document, RESULTS / f"{stem}.png")


def _plot(document: dict[str, object], path: Path) -> None:
    """Peak RSS per profile against its budget (and the rounds' RSS when there are rounds)."""
    results: dict[str, dict[str, object]] = document["results"]  # type: ignore[assignment]
    names = list(results)
    figure, axis = plt.subplots(figsize=(7, 3.5))
    peaks = [float(results[n]["peak_rss_mb"]) for n in names]  # type: ignore[arg-type]
    budgets = [float(results[n]["profile"]["train_memory_mb"]) for n in names]  # type: ignore[index]
    axis.bar(names, peaks, label="peak RSS")
    axis.scatter(names, budgets, color="k", marker="_", s=400, label="profile budget")
    axis.set_ylabel("MB")
    axis.set_ylim(0, max(peaks) * 1.3)
    axis.legend()
    axis.set_title(path.stem)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
