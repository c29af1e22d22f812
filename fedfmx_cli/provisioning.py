"""`fedfmx-edge provision`: the fleet's CA, certificates, passwords, ACLs and signing key."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from aggregator.districts.provisioning import DeviceSetup, provision_tree
from aggregator.provisioning import provision as write_credentials
from fedfmx.config import FleetConfig, load_fleet
from fedfmx.errors import ConfigError
from fedfmx_cli.console import one_line_errors


@one_line_errors
def provision(
    out: Annotated[Path, typer.Option(help="Folder for the fleet's credentials.")],
    fleet_file: Annotated[
        Path | None, typer.Option("--fleet", help="Fleet YAML; default: the demo fleet.")
    ] = None,
    devices: Annotated[
        int | None,
        typer.Option(
            min=0, max=100_000, help="Provision device-000 … device-(N-1) (0: with --enrol-port)."
        ),
    ] = None,
    device: Annotated[
        list[str] | None, typer.Option(help="Provision this device id (repeat).")
    ] = None,
    port: Annotated[
        int, typer.Option(min=1, max=65535, help="TLS listener port in mosquitto.conf.")
    ] = 8883,
    broker_host: Annotated[
        str, typer.Option(help="Host name devices and aggregator connect to.")
    ] = "localhost",
    profile: Annotated[str, typer.Option(help="Device profile in the device YAMLs.")] = (
        "raspberry-pi-4"
    ),
    enrol_port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            help="Live enrolment: rights in Mosquitto's dynamic-security plugin, an operator "
            "identity, and a TLS enrolment listener on this port (--devices 0 is allowed).",
        ),
    ] = None,
    districts: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=1000,
            help="A tree: a root broker on --port and this many district brokers on the next "
            "ports, each bridged to the root (mutual TLS, ACL); devices spread over them.",
        ),
    ] = None,
    district_host: Annotated[
        list[str] | None,
        typer.Option(
            help="With --districts: the host of district k's broker (repeat, in order); "
            "default: --broker-host."
        ),
    ] = None,
) -> None:
    """Write a fleet CA, broker and device certificates, passwords, ACL and mosquitto.conf."""
    if (devices is None) == (not device):
        raise ConfigError("give either --devices N or one or more --device ID")
    if districts is not None:
        ids = list(device or []) or [f"device-{index:03d}" for index in range(devices or 0)]
        hosts = list(district_host or [])
        _provision_tree(
            load_fleet(fleet_file), ids, districts, out, port, broker_host, profile, hosts
        )
        return
    if devices == 0 and enrol_port is None:
        raise ConfigError("--devices 0 needs --enrol-port (devices then enrol themselves)")
    ids = list(device or []) or [f"device-{index:03d}" for index in range(devices or 0)]
    fleet = load_fleet(fleet_file)
    written = write_credentials(
        fleet.name,
        ids,
        out,
        port=port,
        max_payload_bytes=fleet.service.broker.max_payload_bytes,
        enrol_port=enrol_port,
        broker_hosts=[broker_host],
    )
    fleet_file, configs = written.write_configs(fleet, f"mqtts://{broker_host}:{port}", profile)
    table = Table(title=f"fleet {fleet.name}: credentials in {written.directory}")
    table.add_column("client")
    table.add_column("certificate")
    table.add_column("password file")
    for name, credentials in written.clients.items():
        table.add_row(name, credentials.cert.name, f"{name}.password")
    Console().print(table)
    Console().print(f"broker: mosquitto -c {written.mosquitto_conf}")
    Console().print(f"aggregator: fedfmx-edge serve --fleet {fleet_file}")
    if configs:
        Console().print(f"devices: fedfmx-edge join --config {configs[0]} (one YAML per device)")
    if enrol_port is not None:
        Console().print(
            f"enrolment: fedfmx-edge devices invite ID --credentials {written.directory}; "
            f"devices enrol on mqtts://{broker_host}:{enrol_port}"
        )


def _provision_tree(
    fleet: FleetConfig,
    ids: list[str],
    districts: int,
    out: Path,
    port: int,
    host: str,
    profile: str,
    district_hosts: list[str],
) -> None:
    """`provision --districts K`: the root's and each district's credentials and configs."""
    if not ids:
        raise ConfigError("--districts needs --devices N or --device ID (no live enrolment)")
    names = [f"district-{k:02d}" for k in range(districts)]
    if len(district_hosts) > districts:
        raise ConfigError(f"{len(district_hosts)} --district-host for {districts} districts")
    members = {name: ids[k::districts] for k, name in enumerate(names)}
    ports = {name: port + 1 + k for k, name in enumerate(names)}
    index = {name: position for position, name in enumerate(ids)}
    sites = dict(zip(names, district_hosts, strict=False))
    tree = provision_tree(
        fleet, members, out, port, ports, host, DeviceSetup(profile, index), sites
    )
    out_console = Console()
    out_console.print(f"root broker: mosquitto -c {tree.root.mosquitto_conf}")
    out_console.print(f"root aggregator: fedfmx-edge serve --fleet {tree.fleet_file}")
    for name in names:
        own = tree.districts[name]
        out_console.print(
            f"{name} ({len(members[name])} devices): mosquitto -c {own.mosquitto_conf}; "
            f"fedfmx-edge serve --district {tree.district_files[name]}"
        )
    first = next(iter(tree.device_files.values()))
    out_console.print(f"devices: fedfmx-edge join --config {first} (one YAML per device)")


def register(app: typer.Typer) -> None:
    app.command()(provision)
