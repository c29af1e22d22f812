"""`fedfmx-edge simulate --districts K`: the whole tree of aggregators on one machine.

K + 1 Mosquitto brokers on loopback (the root's and one per district, each district's bridged
to the root's over mutual TLS with the credentials `provision_tree` writes), K district
aggregators as `fedfmx-edge serve --district` processes, the root aggregator here, and the
fleet's devices as `fedfmx-edge join` processes, device `i` in district `i mod K`. Each device
keeps its client index, so it trains on exactly the data it has in the flat run: with the
mean merge the final model is the flat run's, up to the order of float64 additions.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from aggregator.districts.provisioning import DeviceSetup, ProvisionedTree, provision_tree
from aggregator.districts.root import open_root
from aggregator.service import ServiceHooks
from aggregator.state import RoundTotals
from fedfmx.config import FleetConfig, load_fleet
from fedfmx.data.datasets import ImageDataset
from fedfmx.errors import ConfigError
from fedfmx.federation.simulation import RoundLog, SimulationResult, device_id, task_evaluator
from fedfmx_cli.fleet_simulation import _device_profile, _spawn, round_log, run_to_the_end
from transport import MosquittoBroker, free_port

LOCALHOST = "127.0.0.1"


def district_name(index: int) -> str:
    return f"district-{index:02d}"


def spread_devices(num_devices: int, districts: int) -> dict[str, list[str]]:
    """Device `i` in district `i mod K`."""
    return {
        district_name(k): [device_id(i) for i in range(num_devices) if i % districts == k]
        for k in range(districts)
    }


@contextmanager
def tree_brokers(
    tree: ProvisionedTree, ports: dict[str | None, int], extra: Sequence[str] = ()
) -> Iterator[dict[str | None, MosquittoBroker]]:
    """Start the root's broker (key None) and every district's, bridged; stop them after.
    `extra`: more mosquitto.conf lines for every broker (a benchmark's limits)."""
    brokers: dict[str | None, MosquittoBroker] = {}
    with ExitStack() as stack:
        for name in [None, *tree.districts]:
            broker = MosquittoBroker(
                allow_anonymous=False,
                extra_config=[*extra, *tree.broker_settings(name)],
                port=ports[name],
            )
            stack.callback(broker.close)
            broker.start()
            brokers[name] = broker
        yield brokers


def write_tree(
    fleet: FleetConfig, districts: int, workdir: Path
) -> tuple[ProvisionedTree, dict[str | None, int], list[Path]]:
    """Provision the tree under `workdir`; its ports and one device YAML per device."""
    if districts < 1 or districts > fleet.protocol.num_clients:
        raise ConfigError(
            f"--districts {districts}: between 1 and the fleet's {fleet.protocol.num_clients} "
            "devices"
        )
    members = spread_devices(fleet.protocol.num_clients, districts)
    ports: dict[str | None, int] = {None: free_port(), **{d: free_port() for d in members}}
    service = fleet.service.model_copy(update={"state_path": workdir / "root.sqlite"})
    fleet = fleet.model_copy(update={"service": service})
    setup = DeviceSetup(
        profile=str(_device_profile(fleet, workdir)),
        client_index={name: int(name.rsplit("-", 1)[1]) for d in members.values() for name in d},
        state_root=workdir / "devices",
        serve_predictions=False,  # as the flat run's devices
    )
    tree = provision_tree(
        fleet, members, workdir / "tree", ports[None], {d: ports[d] for d in members}, LOCALHOST,
        setup,
    )  # fmt: skip
    configs = list(tree.device_files.values())
    return tree, ports, configs


def run_tree_over_mqtt(
    fleet: FleetConfig,
    dataset: ImageDataset,
    districts: int,
    workdir: Path | None = None,
    on_round: Callable[[RoundLog], None] | None = None,
    interrupted: threading.Event | None = None,
) -> SimulationResult:
    """Run every round of `fleet` through a tree of `districts` district aggregators."""
    if fleet.data.simulated_source == "folder":
        raise ConfigError("--districts runs partition fleets only")
    interrupted = interrupted or threading.Event()
    started = time.perf_counter()
    root_dir = (workdir or Path(tempfile.mkdtemp(prefix="fedfmx-tree-"))).resolve()
    root_dir.mkdir(parents=True, exist_ok=True)
    logs = root_dir / "logs"
    logs.mkdir(exist_ok=True)
    try:
        tree, ports, configs = write_tree(fleet, districts, root_dir)
        rooted = load_fleet(tree.fleet_file)
        with tree_brokers(tree, ports):

            def closed(totals: RoundTotals) -> None:
                if on_round is not None:
                    on_round(round_log(totals))

            hooks = ServiceHooks(evaluate=task_evaluator(rooted, dataset), on_round=closed)
            root = open_root(rooted, root_dir / "root.sqlite", hooks)
            try:
                root.start()
                processes = {
                    path.stem: _spawn(path, logs, ("serve", "--district"))
                    for path in tree.district_files.values()
                }
                processes |= {c.stem: _spawn(c, logs) for c in configs}
                result = run_to_the_end(root, processes, logs, interrupted, rooted, dataset)
                result.wall_time_s = time.perf_counter() - started
            finally:
                root.session.close()
                root.assignments.close()
                root.state.close()
    finally:
        if workdir is None:
            shutil.rmtree(root_dir, ignore_errors=True)
    return result
