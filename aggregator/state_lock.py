"""One process at a time on an aggregator state file: `serve` holds it, `rollback` needs it.

An advisory `flock` on `<state>.lock`, held for the life of the process (the kernel releases
it when the process dies, so a crash never leaves a stale lock).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedfmx.errors import ConfigError


@contextmanager
def exclusive_state(state_path: Path, holder: str) -> Iterator[None]:
    """Hold the state's lock while the block runs; ConfigError when another process has it."""
    state_path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = state_path.with_name(state_path.name + ".lock")
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{state_path} is in use by another process (a running `serve`?): "
                f"stop it before {holder}"
            ) from None
        yield
    finally:
        os.close(descriptor)
