"""`fedfmx-edge doctor`: is this device ready to join its fleet? One line per check.

Each check returns a `Finding` (ok / warn / fail, and what it saw); a failure says what to
fix. The checks run in order and never raise: an unexpected error inside one check becomes that
check's failure line, so an operator always reads the whole list and no traceback.

Clock skew is measured against the aggregator, the clock that sets round deadlines: the doctor
publishes a `ClockProbe` on `clients/<id>/clock`, the aggregator answers with its time, and
skew = aggregator_unix - (t0 + t1) / 2 within ±(t1 - t0) / 2 (t0/t1: send and receive times
here). MQTT carries no broker time; an aggregator that is not running leaves a warning.
"""

from __future__ import annotations

import os
import platform
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil
from pydantic import ValidationError

from edge_client.config import DeviceConfig, PartitionSource, load_device_config
from edge_client.health import existing_parent, free_disk_mb
from edge_client.stream_config import CameraSourceConfig, FolderSourceConfig
from fedfmx.errors import FedFMXError
from fedfmx.wire.messages import ClockProbe
from transport import MqttSession, TopicKind, client_topic, session_settings

Verdict = Literal["ok", "warn", "fail"]

MAX_SKEW_S = 2.0
"""Beyond this, deadlines and certificate validity start to disagree between machines."""
MIN_FREE_MB = 200.0
LOW_FREE_MB = 1024.0
CLOCK_WAIT_S = 5.0
CONNECT_S = 5.0
ONNX_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


@dataclass(frozen=True)
class Finding:
    check: str
    verdict: Verdict
    detail: str

    def line(self) -> str:
        return f"{self.verdict.upper():<4}  {self.check:<10} {self.detail}"


def check_python() -> Finding:
    """Which interpreter runs the device (pip refuses one older than requires-python)."""
    return Finding("python", "ok", f"{platform.python_version()} ({sys.executable})")


def check_torch(use_gpu: bool) -> Finding:
    import torch

    cuda = torch.version.cuda
    build = f"CUDA {cuda} build" if cuda else "CPU build"
    detail = f"torch {torch.__version__}, {build}"
    if use_gpu and not torch.cuda.is_available():
        return Finding("torch", "warn", f"{detail}; the profile asks for a GPU and none is usable")
    if cuda and not use_gpu:
        return Finding(
            "torch",
            "warn",
            f"{detail} on a CPU-only profile: GBs of unused CUDA libraries "
            "(reinstall with scripts/setup.sh --device)",
        )
    return Finding("torch", "ok", detail)


def check_onnxruntime(provider: str, serving: bool) -> Finding:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    build = "GPU build" if "CUDAExecutionProvider" in available else "CPU build"
    detail = f"onnxruntime {onnxruntime.__version__}, {build}, providers {', '.join(available)}"
    wanted = ONNX_PROVIDERS[provider]
    if wanted not in available:
        verdict: Verdict = "fail" if serving else "warn"
        return Finding("onnx", verdict, f"{detail}; the profile's {wanted} is missing")
    return Finding("onnx", "ok", detail)


def check_profile(config: DeviceConfig) -> Finding:
    from fedfmx.profiles import load_profile

    profile = load_profile(config.profile)
    cores = os.cpu_count() or 1
    memory_mb = psutil.virtual_memory().total / 2**20
    detail = (
        f"{profile.name}: {profile.threads} threads of {cores} cores, "
        f"{profile.train_memory_mb} MB budget of {memory_mb:.0f} MB"
    )
    if profile.threads > cores or profile.train_memory_mb > memory_mb:
        return Finding("profile", "fail", f"{detail}: the profile asks for more than this machine")
    if profile.threads == cores:
        return Finding("profile", "warn", f"{detail}: no core left for capture and MQTT")
    return Finding("profile", "ok", detail)


def check_data(config: DeviceConfig) -> Finding:
    """The device's data source opens: its fleet partition loads, its folder is readable, or
    its camera yields a frame within the open timeout."""
    source = config.data
    if isinstance(source, FolderSourceConfig):
        return _check_folder(source)
    if isinstance(source, CameraSourceConfig):
        return _check_camera(source)
    return _check_partition(config, source)


def _check_partition(config: DeviceConfig, source: PartitionSource) -> Finding:
    from fedfmx.config import load_fleet
    from fedfmx.federation.simulation import load_fleet_dataset

    fleet = load_fleet(config.fleet_file)
    if source.path is not None:
        fleet = fleet.model_copy(
            update={"data": fleet.data.model_copy(update={"path": source.path})}
        )
    clients = fleet.protocol.num_clients
    if source.client_index >= clients:
        return Finding(
            "data", "fail", f"client_index {source.client_index} outside {clients} clients"
        )
    dataset = load_fleet_dataset(fleet)
    return Finding(
        "data",
        "ok",
        f"{fleet.data.dataset}: {len(dataset.train_y)} training rows, partition "
        f"{source.client_index} of {clients}",
    )


def _check_folder(source: FolderSourceConfig) -> Finding:
    folder = source.path
    if not folder.is_dir() or not os.access(folder, os.R_OK | os.X_OK):
        return Finding("data", "fail", f"folder {folder}: not a readable directory")
    classes = [p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    detail = f"folder {folder}: {len(classes)} class folders"
    return Finding("data", "ok" if classes else "warn", detail)


def _check_camera(source: CameraSourceConfig) -> Finding:
    from edge_client.sources.camera import CameraSource

    camera = CameraSource(source)
    camera.start()
    try:
        frames = camera.poll(source.open_timeout_s + source.read_timeout_s)
        health = camera.health()
    finally:
        camera.close()
    if frames:
        shape = "x".join(str(n) for n in frames[0].pixels.shape)
        return Finding("data", "ok", f"camera {source.url}: a {shape} frame")
    return Finding(
        "data", "fail", f"camera {source.url}: no frame ({health.state}: {health.detail})"
    )


def check_disk(state_dir: Path) -> Finding:
    where = existing_parent(state_dir)
    free_mb = free_disk_mb(where)
    detail = f"{free_mb:.0f} MB free under {where}"
    if not os.access(where, os.W_OK):
        return Finding("disk", "fail", f"{detail}, but it is not writable by this user")
    if free_mb < MIN_FREE_MB:
        return Finding("disk", "fail", f"{detail}: under {MIN_FREE_MB:.0f} MB")
    if free_mb < LOW_FREE_MB:
        return Finding("disk", "warn", f"{detail}: under {LOW_FREE_MB:.0f} MB")
    return Finding("disk", "ok", detail)


def _tls_words(config: DeviceConfig) -> str:
    broker = config.broker
    if not broker.url.startswith(("mqtts://", "wss://")):
        return "no TLS"
    return "mutual TLS" if broker.cert_file else "TLS"


def check_broker_and_clock(config: DeviceConfig, fleet_name: str) -> list[Finding]:
    """Connect as `<device>-doctor` (the running agent keeps its own session), then probe
    the aggregator's clock."""
    client_id = f"{config.device_id}-doctor"[-64:]
    session = MqttSession(session_settings(config.broker, client_id))
    topic = client_topic(fleet_name, config.device_id, TopicKind.CLOCK)
    probe = ClockProbe(probe_id=secrets.token_hex(16))
    answers: list[tuple[ClockProbe, float]] = []
    arrived = threading.Event()

    def on_clock(_: str, message: bytes) -> None:
        try:
            answer = ClockProbe.model_validate_json(message)
        except ValidationError:
            return
        if answer.probe_id == probe.probe_id and answer.aggregator_unix is not None:
            answers.append((answer, time.time()))
            arrived.set()

    try:
        started = time.monotonic()
        try:
            session.connect(timeout_s=CONNECT_S)
        except FedFMXError as error:
            return [Finding("broker", "fail", str(error))]
        found = [
            Finding(
                "broker",
                "ok",
                f"{config.broker.url} over MQTT {session.protocol}, {_tls_words(config)}, "
                f"connected in {time.monotonic() - started:.2f} s",
            )
        ]
        try:
            session.subscribe(topic, on_clock, raw=True)
        except FedFMXError:
            return [
                *found,
                Finding(
                    "clock",
                    "warn",
                    f"the broker refuses this device {topic} (an ACL from before `doctor`: "
                    "provision again); skew not measured",
                ),
            ]
        sent = time.time()
        session.publish_raw(topic, probe.model_dump_json().encode())
        if not arrived.wait(CLOCK_WAIT_S):
            return [
                *found,
                Finding(
                    "clock",
                    "warn",
                    f"no aggregator answered within {CLOCK_WAIT_S:g} s (is `serve` running? "
                    f"may this device read {topic}? an ACL from before `doctor` needs "
                    "provisioning again); skew not measured",
                ),
            ]
        answer, received = answers[0]
        assert answer.aggregator_unix is not None
        skew = answer.aggregator_unix - (sent + received) / 2
        bound = (received - sent) / 2
        detail = f"aggregator clock {skew:+.3f} s from ours (±{bound:.3f} s)"
        if abs(skew) - bound > MAX_SKEW_S:
            return [*found, Finding("clock", "fail", f"{detail}: over {MAX_SKEW_S:g} s; run NTP")]
        return [*found, Finding("clock", "ok", detail)]
    finally:
        session.close()


def _guarded(name: str, check: Callable[[], Finding | list[Finding]]) -> list[Finding]:
    try:
        result = check()
    except FedFMXError as error:
        return [Finding(name, "fail", str(error))]
    except ImportError as error:
        return [Finding(name, "fail", f"cannot import: {error}")]
    except Exception as error:  # a diagnostic reports any failure as its line, never raises
        return [Finding(name, "fail", f"{type(error).__name__}: {error}")]
    return result if isinstance(result, list) else [result]


def diagnose(config_path: Path) -> list[Finding]:
    """Every check for the device described by `config_path`, in order."""
    findings = [check_python()]
    try:
        config = load_device_config(config_path)
    except FedFMXError as error:
        return [*findings, Finding("config", "fail", str(error))]
    findings.append(Finding("config", "ok", f"{config_path}: device {config.device_id}"))
    profile_gpu, provider = _profile_needs(config)
    findings += _guarded("torch", lambda: check_torch(profile_gpu))
    findings += _guarded("onnx", lambda: check_onnxruntime(provider, config.serves))
    findings += _guarded("profile", lambda: check_profile(config))
    findings += _guarded("data", lambda: check_data(config))
    findings += _guarded("disk", lambda: check_disk(config.state_dir))
    findings += _guarded("broker", lambda: check_broker_and_clock(config, _fleet_name(config)))
    return findings


def _profile_needs(config: DeviceConfig) -> tuple[bool, str]:
    """(use_gpu, inference provider) of the device's profile; CPU when it cannot be read
    (the profile check then reports why)."""
    try:
        from fedfmx.profiles import load_profile

        profile = load_profile(config.profile)
    except (FedFMXError, ImportError):
        return False, "cpu"
    return profile.use_gpu, profile.inference_provider


def _fleet_name(config: DeviceConfig) -> str:
    from fedfmx.config import load_fleet

    return load_fleet(config.fleet_file).name
