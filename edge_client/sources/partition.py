"""The simulation's source: this device's share of a fleet data set, as the seeded plan deals it.

The stand-in for a camera when a whole fleet runs on one machine: the device loads the data
set once, keeps its own rows only, and receives them round by round (`fedfmx.data.stream`).
"""

from __future__ import annotations

from edge_client.config import PartitionSource
from fedfmx.config import FleetConfig
from fedfmx.data.fleet_data import load_fleet_dataset, own_partition
from fedfmx.data.stream import ArraySamples, OwnRowsStream
from fedfmx.errors import ConfigError


def open_partition(
    source: PartitionSource, fleet: FleetConfig
) -> tuple[ArraySamples, OwnRowsStream]:
    """This device's rows (a compact copy) and its stream over them."""
    if source.path is not None:
        data = fleet.data.model_copy(update={"path": source.path})
        fleet = fleet.model_copy(update={"data": data})
    index = source.client_index
    if index >= fleet.protocol.num_clients:
        raise ConfigError(
            f"data.client_index {index} outside the fleet's {fleet.protocol.num_clients} clients"
        )
    return own_partition(fleet, load_fleet_dataset(fleet), index)
