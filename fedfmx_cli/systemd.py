"""systemd's notify protocol (sd_notify(3)), for `serve` and `join` as `Type=notify` services.

The protocol is one datagram of `KEY=VALUE` lines to the unix socket named in $NOTIFY_SOCKET
(a leading `@` means the abstract namespace). READY=1 once the service works, WATCHDOG=1 at
least every $WATCHDOG_USEC (systemd restarts a service that goes quiet), STOPPING=1 on the way
out. Outside systemd ($NOTIFY_SOCKET unset) every call does nothing. A failing socket is
logged once and never stops the service.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends READY/WATCHDOG/STOPPING to systemd; `heartbeat()` is cheap to call every tick."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        watched = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_interval_s = int(usec) / 1e6 / 4 if watched else None
        """systemd's own advice: ping at least twice per period; a quarter leaves margin."""
        self._ready = False
        self._last_ping = 0.0
        self._failed = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *lines: str) -> bool:
        """Send `lines` as one notification; False outside systemd or when it failed."""
        if not self.address or self._failed:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as error:
            self._failed = True
            log.warning("systemd notify socket %s: %s (no more notifications)", self.address, error)
            return False
        return True

    def ready(self, status: str = "") -> None:
        self._ready = True
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def heartbeat(self) -> None:
        """From a main loop: READY=1 on the first call, then WATCHDOG=1 when one is due."""
        if not self._ready:
            self.ready()
        if self.watchdog_interval_s is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_interval_s:
            self._last_ping = now
            self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1")
