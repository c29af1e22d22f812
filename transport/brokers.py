"""Local brokers on loopback: a Mosquitto subprocess (tests, demos) and an in-process amqtt one.

`MosquittoBroker` is the real thing (MQTT 5, persistence, restart with the same port and
database for recovery tests). `EmbeddedBroker` needs no system package, so `fedfmx-edge
simulate` runs anywhere; it speaks MQTT 3.1.1 only and keeps sessions in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from types import TracebackType
from typing import Any

from fedfmx.compat import Self, StrEnum
from fedfmx.errors import FedFMXError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


class BrokerChoice(StrEnum):
    """The local broker `simulate` starts: amqtt in-process, or a Mosquitto binary."""

    embedded = "embedded"
    mosquitto = "mosquitto"


_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin")


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago (the broker binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout_s: float) -> bool:
    """Poll until `host:port` accepts TCP connections; False after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return True
        time.sleep(0.02)
    return False


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary; Debian installs it in /usr/sbin, often off a user's PATH."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN_DIRS])
    return shutil.which("mosquitto", path=search)


class MosquittoBroker:
    """A private Mosquitto on 127.0.0.1:<free port> with its own config and persistence dir."""

    def __init__(
        self,
        *,
        allow_anonymous: bool = True,
        extra_config: Sequence[str] = (),
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
        port: int | None = None,
    ) -> None:
        """`port`: one chosen beforehand (a bridge to this broker names it); None: a free one."""
        binary = find_mosquitto()
        if binary is None:
            raise FedFMXError("mosquitto not found: run `sudo apt-get install -y mosquitto`")
        self.binary = binary
        self.host = LOOPBACK
        self.port = port or free_port()
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.directory = Path(tempfile.mkdtemp(prefix="fedfmx-mosquitto-"))
        self.config_path = self.directory / "mosquitto.conf"
        self.log_path = self.directory / "mosquitto.log"
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'true' if allow_anonymous else 'false'}",
            "persistence true",
            f"persistence_location {self.directory}/",
            *extra_config,
        ]
        if os.geteuid() == 0:
            # As root, Mosquitto drops to user `mosquitto`, who cannot write our private
            # persistence directory; a loopback test broker may stay root instead.
            lines.append("user root")
        self.config_path.write_text("\n".join(lines) + "\n")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Launch and return once the listener accepts connections (bounded)."""
        if self.running:
            return
        with self.log_path.open("ab") as sink:
            self._process = subprocess.Popen(
                [self.binary, "-c", str(self.config_path), "-v"],
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            if wait_for_port(self.host, self.port, 0.1):
                log.debug("mosquitto listening on %s", self.url)
                return
        self.stop()
        raise FedFMXError(f"mosquitto did not start on {self.url}: {self._last_log_line()}")

    def stop(self) -> None:
        """SIGTERM (Mosquitto saves its persistence database), SIGKILL after the timeout."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("mosquitto on %s ignored SIGTERM; killing it", self.url)
            process.kill()
            process.wait(timeout=self.stop_timeout_s)

    def restart(self) -> None:
        """Stop and start on the same port with the same persisted sessions and messages."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop and delete the config, log and persistence directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _last_log_line(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1] if lines else "no log output"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EmbeddedBroker:
    """An amqtt broker in a daemon thread with its own event loop, on a free loopback port.

    MQTT 3.1.1 only; sessions and retained messages live in memory and die with it.
    """

    def __init__(
        self,
        *,
        websockets: bool = False,
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        self.host = LOOPBACK
        self.port = free_port()
        self.ws_port = free_port() if websockets else None
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        if self.ws_port is None:
            raise ValueError("this EmbeddedBroker was created without websockets")
        return f"ws://{self.host}:{self.ws_port}/"

    def _config(self) -> dict[str, Any]:
        listeners: dict[str, Any] = {
            "default": {"type": "tcp", "bind": f"{self.host}:{self.port}"},
        }
        if self.ws_port is not None:
            listeners["ws"] = {"type": "ws", "bind": f"{self.host}:{self.ws_port}"}
        return {
            "listeners": listeners,
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }

    def start(self) -> None:
        """Start the loop thread and return once the broker listens (bounded)."""
        if self._thread is not None:
            return
        from amqtt.broker import Broker  # imported here: only simulate/tests need amqtt

        # amqtt logs every refused MQTT 5 probe (see MqttSession.connect) as an error.
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)
        loop = asyncio.new_event_loop()
        launched = threading.Event()
        failure: list[BaseException] = []

        async def launch() -> None:
            try:
                broker = Broker(self._config(), loop=loop)
                await broker.start()
                self._broker = broker
            except Exception as error:  # reported to start()'s caller below
                failure.append(error)
            finally:
                launched.set()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(launch())
            loop.run_forever()
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"amqtt-{self.port}", daemon=True)
        self._thread.start()
        if not launched.wait(self.start_timeout_s) or failure:
            self.stop()
            reason = f": {failure[0]}" if failure else " in time"
            raise FedFMXError(f"embedded amqtt broker did not start on {self.url}{reason}")

    def stop(self) -> None:
        """Shut the broker down and end its thread, each step bounded by `stop_timeout_s`."""
        loop, thread, broker = self._loop, self._thread, self._broker
        self._loop = self._thread = self._broker = None
        if loop is None or thread is None:
            return
        if broker is not None:
            future = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
            try:
                future.result(timeout=self.stop_timeout_s)
            except FutureTimeout:
                log.warning("embedded broker on %s did not shut down in time", self.url)
            except Exception:
                log.exception("embedded broker on %s failed to shut down cleanly", self.url)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=self.stop_timeout_s)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
