"""systemd's notify protocol reaches the socket: READY=1, WATCHDOG=1 when due, STOPPING=1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet_helpers import device_yaml, small_fleet, stop_and_expect_stopping, write_fleet

from fedfmx_cli.systemd import SystemdNotifier
from transport import MosquittoBroker


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    try:
        yield sock, path
    finally:
        sock.close()


def _received(sock: socket.socket) -> list[str]:
    messages = []
    sock.settimeout(0.2)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except TimeoutError:
        return messages


def test_ready_watchdog_and_stopping_reach_the_notify_socket(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
    assert notifier.watchdog_interval_s == 1.0
    notifier.heartbeat()  # first turn of a main loop: ready, then the first ping
    notifier.heartbeat()  # within the interval: nothing more
    notifier.stopping()
    assert _received(sock) == ["READY=1", "WATCHDOG=1", "STOPPING=1"]


def test_a_ready_status_line_travels_in_the_same_datagram(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    SystemdNotifier({"NOTIFY_SOCKET": path}).ready("fleet city, model version 3")
    assert _received(sock) == ["READY=1\nSTATUS=fleet city, model version 3"]


def test_abstract_socket_names_start_with_a_nul_byte() -> None:
    name = f"fedfmx-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        SystemdNotifier({"NOTIFY_SOCKET": f"@{name}"}).notify("WATCHDOG=1")
        assert sock.recv(64) == b"WATCHDOG=1"


def test_outside_systemd_or_with_a_dead_socket_nothing_breaks(tmp_path: Path) -> None:
    assert not SystemdNotifier({}).notify("READY=1")
    broken = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    broken.heartbeat()
    assert not broken.notify("WATCHDOG=1")


def test_a_watchdog_meant_for_another_process_is_not_fed() -> None:
    notifier = SystemdNotifier(
        {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    )
    assert notifier.watchdog_interval_s is None


def test_join_notifies_ready_and_feeds_the_watchdog_from_its_loop(
    mosquitto_broker: MosquittoBroker, notify_socket: tuple[socket.socket, str], tmp_path: Path
) -> None:
    """A real `fedfmx-edge join` waiting for rounds (no aggregator): READY=1 once connected,
    WATCHDOG=1 while its loop turns, STOPPING=1 on SIGTERM."""
    sock, path = notify_socket
    sock.settimeout(60)
    fleet_file = write_fleet(tmp_path, small_fleet(mosquitto_broker.url))
    config = device_yaml(tmp_path, fleet_file, 0, mosquitto_broker.url)
    environment = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="400000")
    process = subprocess.Popen(
        [sys.executable, "-m", "fedfmx_cli", "join", "--config", str(config)],
        env=environment,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert sock.recv(4096) == b"READY=1"
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert sock.recv(4096) == b"WATCHDOG=1"
        stop_and_expect_stopping(process, sock)
    finally:
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in (process.stderr.read() if process.stderr else "")
