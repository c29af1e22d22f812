"""The district role's own YAML: which district, its broker, its state and the fleet's files.

A district serves its devices on its own broker (`broker`), which a Mosquitto bridge joins to
the root's; everything fleet-wide (model, codec, robustness, rounds) is the root's fleet YAML
(`fleet_file`). Relative paths are read relative to the YAML's own folder.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field

from edge_client.config import _resolve
from fedfmx.config import BrokerConfig, Section, read_yaml, validate_document


class DistrictConfig(Section):
    district: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    """Its id: one of the root fleet's `districts.ids`, the CN of its bridge's certificate."""
    fleet_file: Path
    broker: BrokerConfig
    """The district's own broker, where its devices connect."""
    state_path: Path
    """The district's SQLite state (its devices, the open round's updates, its partials)."""
    fleet_public_key: Path | None = None
    """The root's Ed25519 verify key: announcements and models are taken only if signed."""
    report_interval_s: float = Field(default=2.0, gt=0)
    """How often the district re-tells the root its devices (when they changed)."""
    partial_resend_s: float = Field(default=10.0, gt=0)
    """A partial is sent again this often until the root's announcement says the round closed
    (the root counts it once; a bridge that was down loses nothing)."""


def load_district_config(path: Path) -> DistrictConfig:
    """Read and validate a district YAML; relative paths become relative to its folder."""
    config = validate_document(DistrictConfig, read_yaml(path, "district config"), str(path))
    base = path.resolve().parent
    broker = config.broker.model_copy(
        update={
            name: _resolve(getattr(config.broker, name), base)
            for name in ("password_file", "ca_file", "cert_file", "key_file")
        }
    )
    return config.model_copy(
        update={
            "broker": broker,
            "fleet_file": _resolve(config.fleet_file, base),
            "state_path": _resolve(config.state_path, base),
            "fleet_public_key": _resolve(config.fleet_public_key, base),
        }
    )


def save_district_config(config: DistrictConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path
