"""A device's health as its retained status reports it: memory, disk, data source."""

from __future__ import annotations

import shutil
from pathlib import Path

import psutil


def existing_parent(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (a state_dir not created yet)."""
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_disk_mb(path: Path) -> float:
    """Free space on the file system holding `path` (or where it will be created)."""
    return shutil.disk_usage(existing_parent(path)).free / 2**20


def process_rss_mb() -> float:
    """This process's resident memory now."""
    return float(psutil.Process().memory_info().rss) / 2**20


def source_state(rows_held: int) -> str:
    """`ok` while the source holds samples of the device's current task for it, `empty`
    before any arrived."""
    return "ok" if rows_held > 0 else "empty"
