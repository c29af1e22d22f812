"""`MqttSession`: the one typed door to MQTT for the aggregator and the device.

It moves named binary messages between topics and knows nothing about models. What it adds
to paho-mqtt (always `CallbackAPIVersion.VERSION2`):

- every `publish` is chunked below the broker's limit (`transport.chunks`) and waits, bounded,
  for the PUBACK of every chunk; subscribers get whole, hash-verified messages, once each;
- QoS 1 everywhere, persistent sessions, a Last Will, MQTT 5 with a fall-back to 3.1.1;
- reconnects with exponential back-off and jitter, so a fleet does not reconnect in lockstep;
- handlers run on a worker thread, so a slow handler never starves paho's keep-alives.

paho keeps unacknowledged QoS 1 messages in memory only and re-sends them after a reconnect;
`unacknowledged()` says what is still in flight. A process restart loses them: a device
persists its pending uploads itself and re-publishes them with the same `message_id`
(optionally only the chunks the receiver reports missing), which the receiver deduplicates.
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.matcher import MQTTMatcher
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel, ConfigDict, Field

from fedfmx.compat import Self
from fedfmx.config import BrokerConfig
from fedfmx.errors import ConfigError, FedFMXError, ProtocolError
from transport.chunks import (
    CHUNK_HEADER_SIZE,
    Chunk,
    PartialMessage,
    Reassembler,
    decode_chunk,
    new_message_id,
    split_message,
)

log = logging.getLogger(__name__)


class _QuietWhileReconnecting(logging.Filter):
    """paho logs "Client is not connected" as an error on every loop tick while it waits to
    reconnect; the session already said once that the connection was lost."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Client is not connected")


_PAHO_LOG = logging.getLogger(f"{__name__}.paho")
_PAHO_LOG.addFilter(_QuietWhileReconnecting())

Handler = Callable[[str, bytes], None]
"""Receives (topic, whole message). For a spread retained body the topic is its base topic.
A handler that cannot take a message now raises `DeliveryDeferred`."""


class DeliveryDeferred(Exception):
    """Raised by a handler that did not take a message (throttled, say): the session forgets
    the message id, so the sender's re-send with the same id is delivered again instead of
    being dropped as a duplicate."""


ProtocolChoice = Literal["auto", "5", "3.1.1"]

_QOS = 1
_PACKET_HEADROOM = 32
"""PUBLISH bytes besides topic and payload: fixed header, packet id, v5 properties, margin."""
_UNSUPPORTED_PROTOCOL = {1, 0x84}
"""CONNACK codes meaning "unsupported protocol version" in MQTT 3.1.1 and 5."""
_SPREAD_TOPIC_DIGITS = 10
_V5_PROBE_S = 2.0
"""How long "auto" waits for an MQTT 5 CONNACK before trying 3.1.1."""
_SESSION_TAKEN_OVER = 0x8E
"""MQTT 5 DISCONNECT reason: another client connected with our client id."""


class TlsSettings(BaseModel):
    """Broker TLS: CA to verify the broker; client certificate and key for mutual TLS."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ca_file: Path | None = None
    """None trusts the system's CA store."""
    cert_file: Path | None = None
    key_file: Path | None = None


class LastWill(BaseModel):
    """What the broker publishes (raw, QoS 1) if this client vanishes without DISCONNECT."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    topic: str
    payload: bytes
    retain: bool = True


class SessionSettings(BaseModel):
    """Everything a session needs; embed it in a service's config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    """mqtt://host:port, mqtts://host:port, ws://host:port/path or wss://host:port/path."""
    client_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    username: str | None = None
    password: str | None = None
    protocol: ProtocolChoice = "auto"
    """"auto" tries MQTT 5 and falls back to 3.1.1 (amqtt) when the broker refuses it."""
    tls: TlsSettings | None = None
    will: LastWill | None = None
    persistent: bool = True
    """Broker keeps subscriptions and queued QoS 1 messages while this client is away."""
    session_expiry_s: int = Field(default=7 * 24 * 3600, ge=0)
    """MQTT 5 only: how long the broker keeps a persistent session after a disconnect."""
    keepalive_s: int = Field(default=30, ge=5)
    max_payload_bytes: int = Field(default=128 * 1024, gt=CHUNK_HEADER_SIZE)
    """Largest chunk (header included); the broker's announced maximum lowers it."""
    connect_timeout_s: float = Field(default=10.0, gt=0)
    ack_timeout_s: float = Field(default=30.0, gt=0)
    """Default bound on waiting for PUBACKs and SUBACKs."""
    reconnect_min_delay_s: int = Field(default=1, ge=1)
    reconnect_max_delay_s: int = Field(default=60, ge=1)
    inbox_size: int = Field(default=10_000, ge=1)
    """Received packets waiting for the handler thread; when full, paho's thread waits."""
    inbox_put_timeout_s: float = Field(default=10.0, gt=0)
    max_message_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    max_partial_messages: int = Field(default=64, ge=1)
    partial_max_age_s: float = Field(default=300.0, gt=0)


def session_settings(
    broker: BrokerConfig, client_id: str, will: LastWill | None = None
) -> SessionSettings:
    """A service's session from the broker section of its YAML (password read from its file)."""
    password = None
    if broker.password_file is not None:
        try:
            password = broker.password_file.read_text().strip()
        except OSError as error:
            raise ConfigError(
                f"broker password file {broker.password_file}: {error.strerror}"
            ) from None
    tls = None
    if broker.ca_file or broker.cert_file or broker.key_file:
        tls = TlsSettings(
            ca_file=broker.ca_file, cert_file=broker.cert_file, key_file=broker.key_file
        )
    return SessionSettings(
        url=broker.url,
        client_id=client_id,
        username=broker.username,
        password=password,
        protocol=broker.protocol,
        tls=tls,
        will=will,
        max_payload_bytes=broker.max_payload_bytes,
    )


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    websockets: bool
    path: str


_SCHEMES = {
    "mqtt": (1883, False, False),
    "mqtts": (8883, True, False),
    "ws": (80, False, True),
    "wss": (443, True, True),
}


def parse_broker_url(url: str) -> BrokerAddress:
    """Split a broker URL; an unknown scheme or missing host is a ConfigError."""
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES or not parts.hostname:
        raise ConfigError(
            f"broker url {url!r}: expected mqtt://, mqtts://, ws:// or wss:// with a host"
        )
    default_port, tls, websockets = _SCHEMES[parts.scheme]
    try:
        port = parts.port or default_port
    except ValueError:
        raise ConfigError(f"broker url {url!r}: invalid port") from None
    return BrokerAddress(parts.hostname, port, tls, websockets, parts.path or "/mqtt")


@dataclass(frozen=True)
class PendingPublish:
    """A published message some of whose chunks the broker has not acknowledged yet."""

    topic: str
    message_id: bytes
    chunk_indices: tuple[int, ...]


@dataclass
class _Outgoing:
    topic: str
    message_id: bytes
    waiting: set[int] = field(default_factory=set)
    rejected: str | None = None


@dataclass
class _Subscription:
    topic_filter: str
    handler: Handler
    raw: bool
    reassembler: Reassembler
    guard: bool = False
    """A `guard_retained` subscription: it also sees retained messages being cleared."""


_RESTORE_INTERVAL_S = 0.2
"""A guarded retained message is restored at most this often per topic."""


def _check_publish_topic(topic: str) -> None:
    if not topic or "+" in topic or "#" in topic:
        raise ValueError(f"cannot publish to {topic!r}: empty or wildcard topic")


class MqttSession:
    """A QoS 1 MQTT client that publishes and delivers whole messages of any size.

    Subscribe before or after `connect()`; subscriptions are (re)sent whenever the broker has
    no session for us. `raw=True` subscriptions skip chunk framing (status and Last Will).
    """

    def __init__(self, settings: SessionSettings) -> None:
        self.settings = settings
        self.address = parse_broker_url(settings.url)
        if settings.tls is not None and not self.address.tls:
            raise ConfigError(f"tls options need an mqtts:// or wss:// url, got {settings.url}")
        self.protocol: Literal["5", "3.1.1"] | None = None
        """The protocol the broker accepted; None until connected."""
        self._client: mqtt.Client | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._subscriptions: dict[str, _Subscription] = {}
        self._matcher: MQTTMatcher | None = None
        """The subscriptions as paho's topic trie, built on the first packet after a change
        (matching each packet against each filter built a trie per filter per packet)."""
        self._confirmed: set[str] = set()
        self._refused: dict[str, str] = {}
        self._suback_waiting: dict[int, str] = {}
        self._early_subacks: dict[int, list[ReasonCode]] = {}
        self._outgoing: dict[bytes, _Outgoing] = {}
        self._puback_waiting: dict[int, tuple[bytes, int]] = {}
        self._early_pubacks: dict[int, ReasonCode] = {}
        self._connack: tuple[bool, str] | None = None
        self._connected = threading.Event()
        self._closing = threading.Event()
        self._attempt = 0
        """Reconnect attempts since the last connection that held for a keep-alive period:
        a connection that keeps dropping at once (a client id taken over) backs off too."""
        self._connected_at: float | None = None
        self._broker_max_packet: int | None = None
        self._reconnect_hooks: list[Callable[[], None]] = []
        self._idle_hooks: list[Callable[[], None]] = []
        self._ever_connected = False
        self._inbox: queue.Queue[Callable[[], None]] = queue.Queue(settings.inbox_size)
        self._worker: threading.Thread | None = None
        self._guard_filters: list[str] = []
        self._retained: dict[str, deque[bytes]] = {}
        """Guarded topic -> the last packets this session retained there (newest last)."""
        self._restored_at: dict[str, float] = {}

    # -- connection -------------------------------------------------------------------------

    def connect(self, timeout_s: float | None = None) -> None:
        """Connect (bounded) and keep reconnecting in the background until `close()`.

        Raises FedFMXError when the broker refuses us or is unreachable within the timeout.
        """
        if self._client is not None:
            return
        self._closing.clear()
        budget = timeout_s or self.settings.connect_timeout_s
        deadline = time.monotonic() + budget
        choices: Sequence[Literal["5", "3.1.1"]] = (
            ("5", "3.1.1") if self.settings.protocol == "auto" else (self.settings.protocol,)
        )
        for position, version in enumerate(choices):
            last = position == len(choices) - 1
            # amqtt never answers an MQTT 5 CONNECT that has properties: probe briefly.
            attempt_end = deadline if last else min(deadline, time.monotonic() + _V5_PROBE_S)
            client = self._build_client(version)
            with self._lock:
                self._connack = None
            self._client = client
            self._start(client, version)
            with self._lock:
                self._changed.wait_for(
                    lambda: self._connack is not None, max(0.0, attempt_end - time.monotonic())
                )
                outcome = self._connack or (False, "no CONNACK")
            if outcome[0]:
                self.protocol = version
                self._start_worker()
                self._await_subscriptions(deadline)
                log.info(
                    "connected to %s as %s (MQTT %s)",
                    self.settings.url,
                    self.settings.client_id,
                    version,
                )
                return
            self._client = None
            self._stop(client)
            if last and outcome[1] == "no CONNACK":
                raise FedFMXError(
                    f"no connection to {self.settings.url} within {budget:g} s: "
                    "is the broker running and reachable?"
                )
            if last or outcome[1] not in ("unsupported", "no CONNACK"):
                raise FedFMXError(
                    f"broker {self.settings.url} refused {self.settings.client_id}: {outcome[1]}"
                )
            log.info(
                "%s did not accept MQTT %s (%s); trying %s",
                self.settings.url,
                version,
                outcome[1],
                choices[position + 1],
            )

    def _await_subscriptions(self, deadline: float) -> None:
        """Let the SUBACKs of subscriptions made before connect() arrive (bounded)."""
        with self._lock:
            done = self._changed.wait_for(
                lambda: all(
                    f in self._confirmed or f in self._refused for f in self._subscriptions
                ),
                max(0.0, deadline - time.monotonic()),
            )
        if not done:
            log.warning(
                "some subscriptions are not acknowledged yet; they are re-sent on the "
                "next connection"
            )

    def _build_client(self, version: Literal["5", "3.1.1"]) -> mqtt.Client:
        s = self.settings
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            clean_session=None if version == "5" else not s.persistent,
            protocol=mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311,
            transport="websockets" if self.address.websockets else "tcp",
        )
        client.enable_logger(_PAHO_LOG)
        if self.address.websockets:
            client.ws_set_options(path=self.address.path)
        if self.address.tls:
            tls = s.tls or TlsSettings()
            try:
                client.tls_set(
                    ca_certs=None if tls.ca_file is None else str(tls.ca_file),
                    certfile=None if tls.cert_file is None else str(tls.cert_file),
                    keyfile=None if tls.key_file is None else str(tls.key_file),
                )
            except (OSError, ValueError, ssl.SSLError) as error:
                files = ", ".join(str(f) for f in (tls.ca_file, tls.cert_file, tls.key_file) if f)
                raise ConfigError(
                    f"TLS files for {s.url} ({files}): not readable PEM ({error})"
                ) from None
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.will is not None:
            _check_publish_topic(s.will.topic)
            client.will_set(s.will.topic, s.will.payload, qos=_QOS, retain=s.will.retain)
        client.connect_timeout = min(5.0, s.connect_timeout_s)
        client.reconnect_delay_set(s.reconnect_min_delay_s, s.reconnect_max_delay_s)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        return client

    def _start(self, client: mqtt.Client, version: Literal["5", "3.1.1"]) -> None:
        s = self.settings
        a = self.address
        if version == "5":
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = s.session_expiry_s if s.persistent else 0
            client.connect_async(
                a.host, a.port, s.keepalive_s, clean_start=not s.persistent, properties=properties
            )
        else:
            client.connect_async(a.host, a.port, s.keepalive_s)
        client.loop_start()

    @staticmethod
    def _stop(client: mqtt.Client) -> None:
        """Disconnect cleanly (no Last Will) and end paho's thread.

        loop_stop joins that thread; it exits within paho's 1 s loop tick plus at most one
        bounded connect attempt (`connect_timeout`), so this wait is bounded.
        """
        client.disconnect()
        client.loop_stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        """True once connected (e.g. after a broker restart); False after `timeout_s`."""
        return self._connected.wait(timeout_s)

    def close(self) -> None:
        """Disconnect cleanly (the broker does not publish the Last Will) and stop threads."""
        self._closing.set()
        client, self._client = self._client, None
        if client is not None:
            pending = self.unacknowledged()
            if pending:
                log.warning(
                    "closing with %d unacknowledged message(s): %s",
                    len(pending),
                    ", ".join(f"{p.topic} {p.message_id.hex()}" for p in pending),
                )
            self._stop(client)
        self._connected.clear()
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.join(timeout=self.settings.ack_timeout_s)
            if worker.is_alive():
                log.warning("a message handler is still running after close()")

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- paho callbacks (paho's network thread: keep them short, never call a handler) -----

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            code = reason_code.value
            reason = "unsupported" if code in _UNSUPPORTED_PROTOCOL else str(reason_code)
            log.warning("broker refused connection: %s", reason_code)
            with self._lock:
                self._connack = (False, reason)
                self._changed.notify_all()
            return
        max_packet = getattr(properties, "MaximumPacketSize", None)
        with self._lock:
            self._connected_at = time.monotonic()
            self._broker_max_packet = max_packet
            if not flags.session_present:
                self._confirmed.clear()
            self._suback_waiting.clear()
            missing = [f for f in self._subscriptions if f not in self._confirmed]
        # SUBACKs are handled on this same thread, so registering after sending cannot race.
        sent = [(client.subscribe(f, qos=_QOS)[1], f) for f in missing]
        with self._lock:
            self._suback_waiting.update((mid, f) for mid, f in sent if mid is not None)
            self._connack = (True, "connected")
            self._changed.notify_all()
        self._connected.set()
        if self._ever_connected:
            self._inbox.put(self._republish_retained)  # a restarted broker may have lost them
            for hook in self._reconnect_hooks:
                self._inbox.put(hook)
        self._ever_connected = True
        log.info(
            "session %s up (session present: %s, broker max packet: %s, resubscribed %d)",
            self.settings.client_id,
            flags.session_present,
            max_packet,
            len(missing),
        )

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        log.debug("connection attempt to %s failed", self.settings.url)
        self._schedule_reconnect(client)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        if self._closing.is_set() or client is not self._client:
            return  # our own close, or a probe connection being dropped
        with self._lock:
            if self._connack is None:
                # Closed before any CONNACK: some brokers answer an unknown protocol this way.
                self._connack = (False, "unsupported")
                self._changed.notify_all()
            stable = (
                self._connected_at is not None
                and time.monotonic() - self._connected_at >= self.settings.keepalive_s
            )
            if stable:
                self._attempt = 0  # back-off restarts only after a connection that held
        if reason_code.value == _SESSION_TAKEN_OVER:
            log.error(
                "another client connected to %s with our client id %s: two processes share "
                "this identity; backing off",
                self.settings.url,
                self.settings.client_id,
            )
        else:
            log.warning(
                "session %s lost its connection (%s); reconnecting",
                self.settings.client_id,
                reason_code,
            )
        self._schedule_reconnect(client)

    def _schedule_reconnect(self, client: mqtt.Client) -> None:
        """Exponential back-off with equal jitter, fed to paho as its next (only) delay."""
        s = self.settings
        with self._lock:
            self._attempt += 1
            attempt = self._attempt
        ceiling = min(s.reconnect_max_delay_s, s.reconnect_min_delay_s * 2 ** min(attempt - 1, 20))
        delay = random.randint(max(1, ceiling // 2), max(1, ceiling))
        client.reconnect_delay_set(delay, delay)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._lock:
            topic_filter = self._suback_waiting.pop(mid, None)
            if topic_filter is None:
                self._early_subacks[mid] = reason_codes
            else:
                self._settle_subscription_locked(topic_filter, reason_codes)

    def _settle_subscription_locked(self, topic_filter: str, codes: list[ReasonCode]) -> None:
        failures = [str(code) for code in codes if code.is_failure]
        if failures:
            self._refused[topic_filter] = ", ".join(failures)
            log.error("broker refused subscription %s: %s", topic_filter, failures[0])
        else:
            self._confirmed.add(topic_filter)
        self._changed.notify_all()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._lock:
            chunk = self._puback_waiting.pop(mid, None)
            if chunk is None:
                self._early_pubacks[mid] = reason_code
            else:
                self._settle_chunk_locked(*chunk, reason_code)

    def _settle_chunk_locked(self, message_id: bytes, index: int, reason: ReasonCode) -> None:
        entry = self._outgoing.get(message_id)
        if entry is None:
            return
        if reason.is_failure:
            entry.rejected = str(reason)
            log.error(
                "broker rejected chunk %d of %s on %s: %s",
                index,
                message_id.hex(),
                entry.topic,
                reason,
            )
        entry.waiting.discard(index)
        if not entry.waiting and entry.rejected is None:
            del self._outgoing[message_id]
        self._changed.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            if self._matcher is None:
                self._matcher = MQTTMatcher()
                for order, sub in enumerate(self._subscriptions.values()):
                    self._matcher[sub.topic_filter] = (order, sub)
            targets = [
                sub
                for _, sub in sorted(self._matcher.iter_match(message.topic), key=lambda m: m[0])
                if message.payload or sub.guard  # empty: a retained message being cleared
            ]
        for sub in targets:
            try:
                self._inbox.put(
                    functools.partial(self._deliver, sub, message.topic, bytes(message.payload)),
                    timeout=self.settings.inbox_put_timeout_s,
                )
            except queue.Full:
                log.error(
                    "handler queue full for %s; dropped a packet on %s",
                    sub.topic_filter,
                    message.topic,
                )

    # -- receiving ----------------------------------------------------------------------------

    def subscribe(
        self,
        topic_filter: str,
        handler: Handler,
        *,
        raw: bool = False,
        timeout_s: float | None = None,
        _guard: bool = False,
    ) -> None:
        """Deliver every whole message matching `topic_filter` to `handler(topic, message)`.

        `raw=True` delivers each packet's payload as is (no chunk framing). When connected,
        waits (bounded) for the SUBACK; raises FedFMXError if the broker refuses it.
        """
        sub = _Subscription(
            topic_filter,
            handler,
            raw,
            Reassembler(
                max_messages=self.settings.max_partial_messages,
                max_message_bytes=self.settings.max_message_bytes,
                max_age_s=self.settings.partial_max_age_s,
            ),
            guard=_guard,
        )
        with self._lock:
            self._subscriptions[topic_filter] = sub
            self._matcher = None
            self._confirmed.discard(topic_filter)
            self._refused.pop(topic_filter, None)
        client = self._client
        if client is None or not self.connected:
            return
        _, mid = client.subscribe(topic_filter, qos=_QOS)
        if mid is None:
            return  # the connection dropped meanwhile; on_connect re-sends it
        deadline = time.monotonic() + (timeout_s or self.settings.ack_timeout_s)
        with self._lock:
            early = self._early_subacks.pop(mid, None)
            if early is None:
                self._suback_waiting[mid] = topic_filter
            else:
                self._settle_subscription_locked(topic_filter, early)
            done = self._changed.wait_for(
                lambda: topic_filter in self._confirmed or topic_filter in self._refused,
                max(0.0, deadline - time.monotonic()),
            )
            refusal = self._refused.get(topic_filter)
        if refusal is not None:
            raise FedFMXError(f"broker refused subscription to {topic_filter}: {refusal}")
        if not done:
            log.warning("no SUBACK for %s yet; it is re-sent on the next connection", topic_filter)

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop delivering `topic_filter` (fire and forget: nothing waits on an UNSUBACK)."""
        with self._lock:
            self._subscriptions.pop(topic_filter, None)
            self._matcher = None
            self._confirmed.discard(topic_filter)
        client = self._client
        if client is not None:
            client.unsubscribe(topic_filter)

    def guard_retained(self, topic_filter: str) -> None:
        """Keep the retained messages this session publishes under `topic_filter` in place.

        On a broker without ACLs anyone may overwrite or clear a retained message; a round
        announcement or model manifest replaced by junk would leave every device that joins
        later waiting for nothing. A guarded topic is watched: a message there that is not
        one of ours is answered by publishing ours again (logged, at most every 0.2 s per
        topic), and after every reconnection all of them are published again, since a
        restarted broker may have lost them.
        """
        with self._lock:
            self._guard_filters.append(topic_filter)
        self.subscribe(topic_filter, self._restore_retained, raw=True, _guard=True)

    def _remember_retained_locked(self, topic: str, packet: bytes) -> None:
        if not any(mqtt.topic_matches_sub(f, topic) for f in self._guard_filters):
            return
        if not packet:
            self._retained.pop(topic, None)  # we cleared it ourselves
            return
        self._retained.setdefault(topic, deque(maxlen=3)).append(packet)

    def _restore_retained(self, topic: str, payload: bytes) -> None:
        now = time.monotonic()
        with self._lock:
            recent = self._retained.get(topic)
            if recent is None or payload in recent:
                return
            if now - self._restored_at.get(topic, -math.inf) < _RESTORE_INTERVAL_S:
                return
            self._restored_at[topic] = now
            ours = recent[-1]
        log.warning(
            "retained message on %s is not ours (%d bytes, another client?): publishing ours again",
            topic,
            len(payload),
        )
        self._send(topic, new_message_id(), {0: (topic, ours)}, True, None, None, wait=False)

    def _republish_retained(self) -> None:
        with self._lock:
            packets = [(topic, recent[-1]) for topic, recent in self._retained.items()]
        for topic, packet in packets:
            self._send(topic, new_message_id(), {0: (topic, packet)}, True, None, None, wait=False)

    def on_reconnect(self, hook: Callable[[], None]) -> None:
        """Call `hook` on the handler thread after every reconnection (e.g. to say "online"
        again: the broker may have published our Last Will while we were away)."""
        self._reconnect_hooks.append(hook)

    def on_idle(self, hook: Callable[[], None]) -> None:
        """Call `hook` on the handler thread whenever no received packet is waiting for it
        (and at least every 0.2 s): a handler can batch work, say one SQLite commit for
        every update that came in a burst, and finish it before the thread falls idle."""
        self._idle_hooks.append(hook)

    def incomplete_messages(self) -> list[PartialMessage]:
        """Messages being assembled with their missing chunks, to ask senders to re-send."""
        with self._lock:
            subs = list(self._subscriptions.values())
        return [partial for sub in subs for partial in sub.reassembler.partials()]

    def _start_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(
                target=self._work, name=f"mqtt-handlers-{self.settings.client_id}", daemon=True
            )
            self._worker.start()

    def _work(self) -> None:
        while not self._closing.is_set():
            try:
                work = self._inbox.get(timeout=0.2)
            except queue.Empty:
                self._run_idle_hooks()
                continue
            try:
                work()
            except Exception:
                log.exception("session %s: a reconnect hook failed", self.settings.client_id)
            if self._inbox.empty():
                self._run_idle_hooks()

    def _run_idle_hooks(self) -> None:
        for hook in self._idle_hooks:
            try:
                hook()
            except Exception:
                log.exception("session %s: an idle hook failed", self.settings.client_id)

    def _deliver(self, sub: _Subscription, topic: str, payload: bytes) -> None:
        message_id: bytes | None = None
        if sub.raw:
            message: bytes | None = payload
        else:
            try:
                chunk = decode_chunk(payload)
                topic = _chunk_origin(topic, chunk)
                message = sub.reassembler.feed_chunk(chunk, topic)
                message_id = chunk.message_id
            except ProtocolError as error:
                log.warning("rejected a packet on %s: %s", topic, error)
                return
        if message is None:
            return
        try:
            sub.handler(topic, message)
        except DeliveryDeferred:
            if message_id is not None:
                sub.reassembler.forget(message_id, topic)
        except Exception:
            log.exception("handler for %s failed on a message from %s", sub.topic_filter, topic)

    # -- sending ------------------------------------------------------------------------------

    def chunk_limit(self, topic: str) -> int:
        """Largest chunk for `topic`: the configured size, or less if the broker said so."""
        limit = self.settings.max_payload_bytes
        if self._broker_max_packet is not None:
            overhead = _PACKET_HEADROOM + len(topic.encode())
            limit = min(limit, self._broker_max_packet - overhead)
        return limit

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        message_id: bytes | None = None,
        only_chunks: Iterable[int] | None = None,
        timeout_s: float | None = None,
        wait: bool = True,
    ) -> bytes:
        """Publish one message as QoS 1 chunks on `topic`; its message id once all are acked.

        `wait=False` returns once the chunks are handed to paho (which re-sends them until
        acknowledged): for small messages the sender does not need to block on.

        A retained message must fit one chunk (a topic retains only its last packet): use
        `publish_retained_chunks` for larger ones. Re-send a message's missing chunks with its
        `message_id` and `only_chunks`. Raises TimeoutError when PUBACKs are still missing
        after the timeout; the chunks stay queued in paho and go out again after a reconnect.
        """
        _check_publish_topic(topic)
        mid = message_id or new_message_id()
        chunks = split_message(payload, self.chunk_limit(topic), message_id=mid)
        if retain and len(chunks) > 1:
            raise ValueError(
                f"retained message on {topic} needs {len(chunks)} chunks; "
                "use publish_retained_chunks"
            )
        packets = {i: (topic, chunk) for i, chunk in enumerate(chunks)}
        return self._send(topic, mid, packets, retain, only_chunks, timeout_s, wait)

    def publish_retained_chunks(
        self,
        base_topic: str,
        payload: bytes,
        *,
        message_id: bytes | None = None,
        only_chunks: Iterable[int] | None = None,
        timeout_s: float | None = None,
    ) -> int:
        """Publish a large retained message as chunk `i` on `<base_topic>/<i>`; the chunk count.

        A late subscriber to `<base_topic>/+` receives every chunk and gets the whole message
        with topic `base_topic`. Clear old versions with `clear_retained` on each chunk topic.
        """
        _check_publish_topic(base_topic)
        mid = message_id or new_message_id()
        longest = f"{base_topic}/{'9' * _SPREAD_TOPIC_DIGITS}"
        chunks = split_message(payload, self.chunk_limit(longest), message_id=mid, spread=True)
        packets = {i: (f"{base_topic}/{i}", chunk) for i, chunk in enumerate(chunks)}
        self._send(base_topic, mid, packets, True, only_chunks, timeout_s)
        return len(chunks)

    def publish_raw(
        self, topic: str, payload: bytes, *, retain: bool = False, timeout_s: float | None = None
    ) -> None:
        """Publish one unframed QoS 1 packet (status, interop); it must fit one packet."""
        _check_publish_topic(topic)
        if len(payload) > self.chunk_limit(topic):
            raise ValueError(
                f"raw payload of {len(payload)} bytes exceeds {self.chunk_limit(topic)} on {topic}"
            )
        self._send(topic, new_message_id(), {0: (topic, payload)}, retain, None, timeout_s)

    def clear_retained(self, topic: str, timeout_s: float | None = None) -> None:
        """Delete the retained message on `topic` (an empty retained packet)."""
        self.publish_raw(topic, b"", retain=True, timeout_s=timeout_s)

    def unacknowledged(self) -> list[PendingPublish]:
        """Messages with chunks the broker has not acknowledged (paho re-sends them)."""
        with self._lock:
            return [
                PendingPublish(e.topic, e.message_id, tuple(sorted(e.waiting)))
                for e in self._outgoing.values()
                if e.waiting
            ]

    def flush(self, timeout_s: float) -> bool:
        """Wait until every publish is acknowledged (e.g. after a reconnect); False on timeout."""
        with self._lock:
            return self._changed.wait_for(
                lambda: not any(e.waiting for e in self._outgoing.values()), timeout_s
            )

    def _send(
        self,
        topic: str,
        message_id: bytes,
        packets: dict[int, tuple[str, bytes]],
        retain: bool,
        only_chunks: Iterable[int] | None,
        timeout_s: float | None,
        wait: bool = True,
    ) -> bytes:
        client = self._client
        if client is None:
            raise FedFMXError(f"cannot publish to {topic}: session not connected (call connect)")
        indices = sorted(set(packets if only_chunks is None else only_chunks))
        unknown = [i for i in indices if i not in packets]
        if unknown:
            raise ValueError(f"chunks {unknown} do not exist; the message has {len(packets)}")
        timeout = timeout_s or self.settings.ack_timeout_s
        deadline = time.monotonic() + timeout
        with self._lock:
            entry = self._outgoing.setdefault(message_id, _Outgoing(topic, message_id))
            entry.waiting.update(indices)
            if retain:
                for index in indices:
                    self._remember_retained_locked(*packets[index])
        for index in indices:
            chunk_topic, packet = packets[index]
            info = client.publish(chunk_topic, packet, qos=_QOS, retain=retain)
            with self._lock:
                early = self._early_pubacks.pop(info.mid, None)
                if early is None:
                    self._puback_waiting[info.mid] = (message_id, index)
                else:
                    self._settle_chunk_locked(message_id, index, early)
        if not wait:
            return message_id
        with self._lock:
            self._changed.wait_for(
                lambda: not entry.waiting or entry.rejected is not None,
                max(0.0, deadline - time.monotonic()),
            )
            rejected, waiting = entry.rejected, len(entry.waiting)
            if rejected is not None:
                self._outgoing.pop(message_id, None)
        if rejected is not None:
            raise FedFMXError(f"broker rejected publish to {topic}: {rejected}")
        if waiting:
            raise TimeoutError(
                f"{waiting} of {len(indices)} chunk(s) to {topic} unacknowledged after "
                f"{timeout:g} s; they stay queued and are re-sent after a reconnect"
            )
        return message_id


def _chunk_origin(topic: str, chunk: Chunk) -> str:
    """The message's topic: a spread chunk must sit at `<base>/<its index>`; base is returned."""
    if not chunk.spread:
        return topic
    base, _, last = topic.rpartition("/")
    if not base or last != str(chunk.index):
        raise ProtocolError(f"spread chunk {chunk.index} arrived on {topic}, not <base>/<index>")
    return base
