"""Credentials and broker configs for a tree: a root broker and one bridged broker per district.

Each broker is provisioned as a flat fleet's is (`provision`: its own CA, server certificate,
ACL, mutual TLS), so a district's devices and aggregator connect to their district exactly as
they would to a flat fleet's broker. On top of that:

- the root's CA issues each district a client certificate (CN = the district id), and the
  root's ACL lets district `<id>` write only its `districts/<id>/partial` and `.../status` and
  read only its `districts/<id>/round` and the fleet's `model/#`;
- each district broker's mosquitto.conf gains a bridge `connection` to the root over mutual TLS
  with that certificate, forwarding its partial and status up, and the root's announcement for
  it (mapped onto the district's own `round` topic) and the model versions down.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from aggregator.districts.config import DistrictConfig, save_district_config
from aggregator.provisioning import AGGREGATOR, ProvisionedFleet, provision
from edge_client.config import DeviceConfig, PartitionSource, save_device_config
from fedfmx.config import DistrictsConfig, FleetConfig
from transport.district_topics import DistrictTopic, district_prefix, district_topic
from transport.topics import fleet_prefix, mqtt_client_id


def district_acl_lines(fleet: str, district: str) -> list[str]:
    """What district `<id>` (its bridge's certificate CN) may do on the root's broker."""
    return [
        f"user {district}",
        f"topic write {district_topic(fleet, district, DistrictTopic.PARTIAL)}",
        f"topic write {district_topic(fleet, district, DistrictTopic.STATUS)}",
        f"topic read {district_topic(fleet, district, DistrictTopic.ROUND)}",
        f"topic read {fleet_prefix(fleet)}/model/#",
    ]


def bridge_lines(
    fleet: str, district: str, root_host: str, root_port: int, root: ProvisionedFleet
) -> list[str]:
    """The district broker's bridge to the root (mosquitto.conf `connection` block).

    `try_private` (Mosquitto to Mosquitto) keeps the retained flag of what the root forwards,
    so model versions and announcements are retained on the district broker too; a
    persistent bridge session (`cleansession false`) queues QoS 1 messages while either
    broker is down.
    """
    credentials = root.clients[district]
    own = district_prefix(fleet, district)
    return [
        f"connection {mqtt_client_id(fleet, district + '-bridge')}",
        f"address {root_host}:{root_port}",
        f"remote_clientid {mqtt_client_id(fleet, district + '-bridge')}",
        f"local_clientid {mqtt_client_id(fleet, district + '-bridge-local')}",
        "try_private true",
        "cleansession false",
        "notifications false",
        "restart_timeout 1 10",
        f"bridge_cafile {root.ca_cert}",
        f"bridge_certfile {credentials.cert}",
        f"bridge_keyfile {credentials.key}",
        f"topic {DistrictTopic.ROUND.value} in 1 {fleet_prefix(fleet)}/ {own}",
        f"topic {fleet_prefix(fleet)}/model/# in 1",
        f"topic {DistrictTopic.PARTIAL.value} out 1 {own} {own}",
        f"topic {DistrictTopic.STATUS.value} out 1 {own} {own}",
    ]


@dataclass(frozen=True)
class DeviceSetup:
    """How the device YAMLs of a tree are written."""

    profile: str = "raspberry-pi-4"
    client_index: Mapping[str, int] = field(default_factory=dict)
    """A device's partition of the fleet's data set (default: its position)."""
    state_root: Path | None = None
    """Device state folders go here (default: beside each YAML)."""
    serve_predictions: bool = True


@dataclass(frozen=True)
class ProvisionedTree:
    root: ProvisionedFleet
    districts: dict[str, ProvisionedFleet]
    fleet_file: Path
    """The root's fleet YAML (with its `districts` section); districts read it too."""
    district_files: dict[str, Path]
    """One district YAML per district (`fedfmx-edge serve --district`)."""
    device_files: dict[str, Path]
    """One device YAML per device (`fedfmx-edge join --config`), on its district's broker."""

    def broker_settings(self, name: str | None = None) -> list[str]:
        """The root's (None) or a district's mosquitto.conf minus listener and persistence."""
        return (self.root if name is None else self.districts[name]).broker_settings()


def provision_tree(
    fleet: FleetConfig,
    devices: Mapping[str, Sequence[str]],
    directory: Path,
    root_port: int,
    district_ports: Mapping[str, int],
    host: str = "127.0.0.1",
    device_setup: DeviceSetup = DeviceSetup(),
    district_hosts: Mapping[str, str] | None = None,
) -> ProvisionedTree:
    """Write the root's and every district's credentials, broker configs (with bridges),
    the root fleet YAML, the district YAMLs and the device YAMLs under `directory`.
    `devices`: district id -> its device ids (each gets a client certificate of its
    district's CA); a device's partition is its position in the fleet's list of devices
    (the districts' lists one after the other, unless `device_setup.client_index` says).
    `host` is the root broker's address; `district_hosts` each district broker's (default:
    `host`, a tree on one machine)."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = fleet.service.broker.max_payload_bytes
    ids = list(devices)
    root = provision(
        fleet.name, ids, directory / "root", port=root_port, max_payload_bytes=payload,
        broker_hosts=[host],
    )  # fmt: skip
    with root.acl_file.open("a") as acl:
        for district in ids:
            acl.write("\n" + "\n".join(district_acl_lines(fleet.name, district)) + "\n")
    service = fleet.service.model_copy(
        update={
            "broker": root.broker_section(AGGREGATOR, f"mqtts://{host}:{root_port}"),
            "signing_key": root.signing_key,
        }
    )
    districts_section = (fleet.districts or DistrictsConfig(ids=ids)).model_copy(
        update={"ids": ids}
    )
    rooted = fleet.model_copy(update={"service": service, "districts": districts_section})
    fleet_file = directory / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump(rooted.model_dump(mode="json"), sort_keys=False))
    districts: dict[str, ProvisionedFleet] = {}
    district_files: dict[str, Path] = {}
    device_files: dict[str, Path] = {}
    order = [name for members in devices.values() for name in members]
    for district, members in devices.items():
        port = district_ports[district]
        site = (district_hosts or {}).get(district, host)
        own = provision(
            fleet.name, list(members), directory / district, port=port,
            max_payload_bytes=payload, broker_hosts=[site],
        )  # fmt: skip
        with own.mosquitto_conf.open("a") as conf:
            conf.write("\n".join(bridge_lines(fleet.name, district, host, root_port, root)) + "\n")
        districts[district] = own
        district_files[district] = save_district_config(
            DistrictConfig(
                district=district,
                fleet_file=fleet_file,
                broker=own.broker_section(AGGREGATOR, f"mqtts://{site}:{port}"),
                state_path=directory / district / "district.sqlite",
                fleet_public_key=root.verify_key,
            ),
            directory / district / f"{district}.yaml",
        )
        url = f"mqtts://{site}:{port}"
        for name in members:
            index = device_setup.client_index.get(name, order.index(name))
            config = DeviceConfig(
                device_id=name,
                fleet_file=fleet_file,
                broker=own.broker_section(name, url),
                profile=device_setup.profile,
                data=PartitionSource(client_index=index),
                state_dir=device_setup.state_root / name
                if device_setup.state_root
                else directory / district / f"state-{name}",
                fleet_public_key=root.verify_key,
                serve_predictions=device_setup.serve_predictions,
            )
            device_files[name] = save_device_config(config, directory / district / f"{name}.yaml")
    return ProvisionedTree(root, districts, fleet_file, district_files, device_files)
