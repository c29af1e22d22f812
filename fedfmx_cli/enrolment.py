"""`fedfmx-edge enrol` on a device; `fedfmx-edge devices list|invite|approve|revoke` for the
operator, on the running broker (aggregator.enrolment, edge_client.enrolment)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedfmx_cli.console import one_line_errors

if TYPE_CHECKING:
    from aggregator.dynsec import DynamicSecurity
    from aggregator.enrolment import FleetAuthority
    from transport import MqttSession

devices = typer.Typer(no_args_is_help=True, help="Enrol, approve and revoke devices live.")

Credentials = Annotated[
    Path,
    typer.Option(help="The provisioned folder (fleet CA, operator certificate, fleet.yaml)."),
]
BrokerUrl = Annotated[
    str | None, typer.Option(help="The broker's mutual-TLS url; default: fleet.yaml's.")
]
DeviceId = Annotated[str, typer.Argument(help="The device id (its certificate CN).")]


@contextmanager
def _operator(
    credentials: Path, url: str | None
) -> Iterator[tuple[FleetAuthority, MqttSession, DynamicSecurity]]:
    from aggregator.enrolment import FleetAuthority, connect

    authority = FleetAuthority.load(credentials)
    session, control = connect(authority, url)
    try:
        yield authority, session, control
    finally:
        session.close()


@devices.command("list")
@one_line_errors
def list_devices(credentials: Credentials, broker_url: BrokerUrl = None) -> None:
    """Devices the broker grants rights to, and enrolments invited or pending."""
    from aggregator.enrolment import fleet_devices

    with _operator(credentials, broker_url) as (authority, session, control):
        entries = fleet_devices(session, control, authority.fleet.name)
    table = Table(title=f"fleet {authority.fleet.name}: devices on the broker")
    for column in ("device", "state", "detail"):
        table.add_column(column)
    for entry in entries:
        table.add_row(entry.device_id, entry.state, entry.detail)
    Console().print(table)


@devices.command()
@one_line_errors
def invite(device: DeviceId, credentials: Credentials, broker_url: BrokerUrl = None) -> None:
    """Issue a one-time enrolment token for DEVICE (give it to whoever installs the device)."""
    from aggregator.enrolment import invite as issue

    with _operator(credentials, broker_url) as (authority, _, control):
        token = issue(control, authority.fleet.name, device)
    typer.echo(f"token for {device}: {token}")
    typer.echo(
        f"on the device: fedfmx-edge enrol --device-id {device} --fleet-name "
        f"{authority.fleet.name} --enrol-url mqtts://<broker>:<enrol port> --ca ca.crt "
        f"--token {token} --out /etc/fedfmx"
    )


@devices.command()
@one_line_errors
def approve(
    device: DeviceId,
    credentials: Credentials,
    broker_url: BrokerUrl = None,
    ack_wait: Annotated[float, typer.Option(help="Seconds to wait for the device.")] = 15.0,
) -> None:
    """Sign DEVICE's pending request with the fleet CA and grant its rights on the broker."""
    from aggregator.enrolment import approve as grant

    with _operator(credentials, broker_url) as (authority, session, control):
        approval = grant(session, control, authority, device, ack_wait)
    typer.echo(f"{device} approved (certificate serial {approval.serial:x})")
    if not approval.collected:
        typer.echo(
            f"{device} has not collected its certificate yet: it does when it runs `enrol` "
            "again (its token stays valid until then)"
        )


@devices.command()
@one_line_errors
def revoke(device: DeviceId, credentials: Credentials, broker_url: BrokerUrl = None) -> None:
    """Remove DEVICE's rights now: the broker disconnects it, and it can do nothing more."""
    from aggregator.enrolment import revoke as withdraw

    with _operator(credentials, broker_url) as (authority, session, control):
        withdraw(session, control, authority.fleet.name, device)
    typer.echo(f"{device} revoked: disconnected, no rights on the broker")


@one_line_errors
def enrol(
    device_id: Annotated[str, typer.Option(help="This device's id (its certificate CN).")],
    fleet_name: Annotated[str, typer.Option(help="The fleet's name.")],
    enrol_url: Annotated[
        str, typer.Option(help="The broker's enrolment listener, e.g. mqtts://broker:8884.")
    ],
    ca: Annotated[Path, typer.Option(help="The fleet CA certificate (verifies the broker).")],
    token: Annotated[str, typer.Option(help="The one-time token from `devices invite`.")],
    out: Annotated[Path, typer.Option(help="Folder for the key, certificate and device.yaml.")],
    profile: Annotated[str, typer.Option(help="Device profile.")] = "raspberry-pi-4",
    client_index: Annotated[int, typer.Option(help="Data partition (fleet_partition).")] = 0,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the approval.")] = 600.0,
) -> None:
    """Make this device's key and certificate request, send it, and wait for the approval."""
    from edge_client.enrolment import EnrolmentSettings
    from edge_client.enrolment import enrol as request

    settings = EnrolmentSettings(
        device_id, fleet_name, enrol_url, ca, token, out, profile, client_index
    )
    config = request(settings, wait, announce=typer.echo)
    typer.echo(f"enrolled: fedfmx-edge join --config {config}")


def register(app: typer.Typer) -> None:
    app.command()(enrol)
    app.add_typer(devices, name="devices")
