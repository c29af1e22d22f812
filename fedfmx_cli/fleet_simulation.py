"""`fedfmx-edge simulate` over MQTT: a broker, the aggregator, and N devices as OS processes.

Everything a real deployment has, on one machine: each device is its own `fedfmx-edge join`
process with its own YAML, MQTT client and state directory; the aggregator runs here with a
SQLite state file and a fresh Ed25519 signing key; the broker is an embedded amqtt, a local
Mosquitto, or a URL. The results are read back from the aggregator's state, so they are what
an operator would see with `fedfmx-edge status`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from aggregator.provisioning import ProvisionedFleet, provision, signing_key_files
from aggregator.service import Aggregator, ServiceHooks, open_aggregator
from aggregator.state import RoundTotals
from edge_client.config import DeviceConfig, PartitionSource, save_device_config
from edge_client.stream_config import FolderSourceConfig
from fedfmx.config import FleetConfig, load_fleet
from fedfmx.data.datasets import ImageDataset
from fedfmx.errors import ConfigError, FedFMXError
from fedfmx.federation.simulation import (
    RoundLog,
    SimulationResult,
    device_id,
    make_plan,
    task_evaluator,
)
from fedfmx.profiles import load_profile
from fedfmx_cli.stream_demo import FolderFeeder
from transport import EmbeddedBroker, MosquittoBroker
from transport.brokers import BrokerChoice
from transport.session import ProtocolChoice

DEVICE_EXIT_S = 30.0
"""How long devices get to exit by themselves after the last round closed."""
DEVICE_STOP_S = 10.0
"""How long devices get to stop after SIGTERM before they are killed."""
FOLDER_SETTLE_S = 0.3
FEED_GRACE_S = 1.5
"""After the feeder copies a round's images, the next round waits this long, so that devices
read them in time (a watched folder reads a file once it has settled)."""


@dataclass(frozen=True)
class MqttRun:
    """How to run the fleet over MQTT."""

    broker: BrokerChoice = BrokerChoice.embedded
    broker_url: str | None = None
    """Connect to this broker instead of starting one."""
    workdir: Path | None = None
    """Keep YAMLs, states and device logs here; None: a temporary folder, removed afterwards."""
    secure: bool = False
    """Provision a CA, certificates, ACL and signing key on the fly and run a local Mosquitto
    with mutual TLS and ACLs (`fedfmx-edge provision`'s files)."""


@contextmanager
def _broker(
    run: MqttRun, credentials: ProvisionedFleet | None
) -> Iterator[tuple[str, ProtocolChoice]]:
    """The broker's url, and the protocol to speak (amqtt knows MQTT 3.1.1 only)."""
    if run.broker_url is not None:
        yield run.broker_url, "auto"
        return
    broker: MosquittoBroker | EmbeddedBroker
    if credentials is not None:
        broker = MosquittoBroker(allow_anonymous=False, extra_config=credentials.broker_settings())
    elif run.broker is BrokerChoice.mosquitto:
        broker = MosquittoBroker()
    else:
        broker = EmbeddedBroker()
    broker.start()
    try:
        if credentials is not None:
            yield f"mqtts://{broker.host}:{broker.port}", "auto"
        else:
            yield broker.url, "auto" if isinstance(broker, MosquittoBroker) else "3.1.1"
    finally:
        broker.stop()
        if isinstance(broker, MosquittoBroker):
            broker.close()


def _write_yaml(path: Path, document: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _device_profile(fleet: FleetConfig, workdir: Path) -> Path:
    """A generic-x86 profile that shares this machine's cores and limits nothing the fleet sets,
    so the devices learn exactly as the in-process engine's do."""
    base = load_profile("generic-x86")
    threads = max(1, (os.cpu_count() or 1) // fleet.protocol.num_clients)
    profile = base.model_copy(
        update={
            "name": "simulated",
            "description": f"a simulated device sharing this machine ({threads} threads)",
            "threads": threads,
            "max_experts_per_round": fleet.fedfmx.max_experts_per_round,
            "batch_size": fleet.training.batch_size,
            "exemplars_per_class": fleet.training.exemplars_per_class,
        }
    )
    return _write_yaml(workdir / "simulated-device.yaml", profile.model_dump(mode="json"))


def _prepare(
    fleet: FleetConfig,
    url: str,
    protocol: ProtocolChoice,
    workdir: Path,
    credentials: ProvisionedFleet | None,
) -> tuple[FleetConfig, list[Path]]:
    """The fleet as the aggregator runs it, and one YAML per device, all under `workdir`."""
    service = fleet.service.model_copy(update={"state_path": workdir / "aggregator.sqlite"})
    fleet = fleet.model_copy(update={"service": service})
    profile = str(_device_profile(fleet, workdir))
    if credentials is not None:
        fleet_file, configs = credentials.write_configs(fleet, url, profile)
        return load_fleet(fleet_file), configs
    private_key, public_key = signing_key_files(workdir)
    broker = fleet.service.broker.model_copy(update={"url": url, "protocol": protocol})
    service = fleet.service.model_copy(update={"broker": broker, "signing_key": private_key})
    fleet = fleet.model_copy(update={"service": service})
    fleet_file = _write_yaml(workdir / "fleet.yaml", fleet.model_dump(mode="json"))
    configs = [
        save_device_config(
            DeviceConfig(
                device_id=device_id(index),
                fleet_file=fleet_file,
                broker=broker,
                profile=profile,
                data=_device_source(fleet, workdir, index),
                state_dir=workdir / "devices" / device_id(index),
                fleet_public_key=public_key,
                serve_predictions=False,  # folder devices see no unlabelled frames
            ),
            workdir / f"{device_id(index)}.yaml",
        )
        for index in range(fleet.protocol.num_clients)
    ]
    return fleet, configs


def _device_folder(workdir: Path, index: int) -> Path:
    return workdir / "devices" / device_id(index) / "labelled"


def _device_source(
    fleet: FleetConfig, workdir: Path, index: int
) -> PartitionSource | FolderSourceConfig:
    if fleet.data.simulated_source == "folder":
        return FolderSourceConfig(path=_device_folder(workdir, index), settle_s=FOLDER_SETTLE_S)
    return PartitionSource(client_index=index)


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: Linux sends it SIGTERM when `simulate` dies, even by SIGKILL,
    so no device outlives the run that started it."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(
    config: Path, logs: Path, command: tuple[str, ...] = ("join", "--config")
) -> subprocess.Popen[bytes]:
    """`fedfmx-edge <command> <config>` as a child process logging to `<config stem>.log`."""
    with (logs / f"{config.stem}.log").open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "fedfmx_cli", *command, str(config)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )


def _last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "(no output)"


class _DeviceWatch:
    """Stops the run when a device process fails, naming it and its last log line."""

    def __init__(
        self,
        processes: dict[str, subprocess.Popen[bytes]],
        logs: Path,
        interrupted: threading.Event,
    ) -> None:
        self.processes = processes
        self.logs = logs
        self.interrupted = interrupted
        self.stop = threading.Event()
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self.stop.wait(0.5):
            if self.interrupted.is_set():
                self.failure = "stopped by a signal"
                self.stop.set()
                return
            for name, process in self.processes.items():
                code = process.poll()
                if code not in (None, 0):
                    self.failure = (
                        f"device {name} exited with status {code}: "
                        f"{_last_line(self.logs / f'{name}.log')}"
                    )
                    self.stop.set()
                    return

    def finish(self, completed: bool) -> None:
        """After a completed run, let devices exit by themselves (they stop once the last
        round is closed); otherwise, or when they do not, stop them: SIGTERM, then SIGKILL."""
        if completed:
            give_up = time.monotonic() + DEVICE_EXIT_S
            for process in self.processes.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=max(0.0, give_up - time.monotonic()))
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        give_up = time.monotonic() + DEVICE_STOP_S
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.0, give_up - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.stop.set()


def _result(fleet: FleetConfig, dataset: ImageDataset, aggregator: Aggregator) -> SimulationResult:
    plan = make_plan(fleet, dataset)
    state = aggregator.state
    evaluations = state.evaluations()
    result = SimulationResult(
        method=fleet.method,
        config=fleet.model_dump(mode="json"),
        class_order=[dataset.class_names[c] for task in plan.tasks for c in task],
        accuracy_matrix=[e.per_task for e in evaluations],
        seen_accuracy=[e.seen for e in evaluations],
        uplink_bytes=0,
        downlink_bytes=0,
        final_model=aggregator.keeper.model,
    )
    for totals in state.round_totals():
        log = round_log(totals)
        result.rounds.append(log)
        result.uplink_bytes += log.uplink_bytes
        result.downlink_bytes += log.downlink_bytes
    return result


def run_to_the_end(
    aggregator: Aggregator,
    processes: dict[str, subprocess.Popen[bytes]],
    logs: Path,
    interrupted: threading.Event,
    fleet: FleetConfig,
    dataset: ImageDataset,
) -> SimulationResult:
    """Drive the started aggregator until the schedule is done, watching `processes` (a
    failing one stops the run, named); then stop them all and read the results back."""
    watch = _DeviceWatch(processes, logs, interrupted)
    completed = False
    try:
        completed = aggregator.run(watch.stop)
    finally:
        watch.finish(completed)
    if not completed:
        raise FedFMXError(watch.failure or "the simulation was stopped")
    return _result(fleet, dataset, aggregator)


def round_log(totals: RoundTotals) -> RoundLog:
    return RoundLog(
        totals.round,
        totals.task,
        totals.updates,
        totals.uplink_bytes,
        totals.downlink_bytes,
        totals.mean_loss,
    )


def run_over_mqtt(
    fleet: FleetConfig,
    dataset: ImageDataset,
    run: MqttRun,
    on_round: Callable[[RoundLog], None] | None = None,
    interrupted: threading.Event | None = None,
) -> SimulationResult:
    """Run every task and round of `fleet` through a broker, with one process per device.

    Setting `interrupted` (SIGTERM, say) stops the run: every process it started is stopped.
    """
    interrupted = interrupted or threading.Event()
    started = time.perf_counter()
    # absolute: the YAMLs written below hold paths that are read relative to their own folder
    workdir = (run.workdir or Path(tempfile.mkdtemp(prefix="fedfmx-simulate-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    credentials = None
    if run.secure and fleet.data.simulated_source == "folder":
        raise ConfigError("--secure runs partition fleets only; drop it for a folder fleet")
    if run.secure:
        ids = [device_id(index) for index in range(fleet.protocol.num_clients)]
        credentials = provision(
            fleet.name,
            ids,
            workdir / "credentials",
            max_payload_bytes=fleet.service.broker.max_payload_bytes,
        )
    try:
        with _broker(run, credentials) as (url, protocol):
            fleet, configs = _prepare(fleet, url, protocol, workdir, credentials)
            feeder = None
            if fleet.data.simulated_source == "folder":
                folders = [_device_folder(workdir, k) for k in range(len(configs))]
                feeder = FolderFeeder(fleet, dataset, folders)
                feeder.deliver(0)

            def closed(totals: RoundTotals) -> None:
                if feeder is not None and feeder.deliver(totals.round + 1):
                    time.sleep(FEED_GRACE_S)
                if on_round is not None:
                    on_round(round_log(totals))

            hooks = ServiceHooks(evaluate=task_evaluator(fleet, dataset), on_round=closed)
            aggregator = open_aggregator(fleet, workdir / "aggregator.sqlite", hooks)
            try:
                aggregator.start()
                devices = {c.stem: _spawn(c, logs) for c in configs}
                result = run_to_the_end(aggregator, devices, logs, interrupted, fleet, dataset)
                result.wall_time_s = time.perf_counter() - started
            finally:
                aggregator.session.close()
                aggregator.state.close()
    finally:
        if run.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return result
