"""Chunked framing of one logical message, and its bounded, idempotent reassembly.

Brokers cap packet sizes (AWS IoT 128 KB, Azure 64-256 KB, Mosquitto 2.1 ~2 MB), so every
message travels as one or more chunks. Each chunk carries a fixed binary header:

    magic "FXC1" | flags u8 | message id 16 B | index u32 | count u32 | total length u64 |
    sha256 of the whole message 32 B | crc32 of header-before-crc + body u32

QoS 1 delivers duplicates and chunks may arrive in any order; the `Reassembler` returns each
message exactly once, only when its sha256 verifies, with bounded memory. Pure: no MQTT here.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from fedfmx.errors import ProtocolError

log = logging.getLogger(__name__)

CHUNK_MAGIC = b"FXC1"
_HEADER = struct.Struct(">4sB16sIIQ32sI")
CHUNK_HEADER_SIZE = _HEADER.size
"""Bytes of framing in every chunk (73)."""
MESSAGE_ID_SIZE = 16
FLAG_SPREAD = 0x01
"""Chunk `i` was published on its own topic `<base>/<i>` (retained chunked bodies)."""
_KNOWN_FLAGS = FLAG_SPREAD


@dataclass(frozen=True)
class Chunk:
    """One decoded chunk: where it sits in its message and what the whole must hash to."""

    message_id: bytes
    index: int
    count: int
    total_length: int
    message_sha256: bytes
    body: bytes
    spread: bool = False

    def encode(self) -> bytes:
        """Header + body, the crc covering both so a flipped bit anywhere is caught."""
        flags = FLAG_SPREAD if self.spread else 0
        head = _HEADER.pack(
            CHUNK_MAGIC,
            flags,
            self.message_id,
            self.index,
            self.count,
            self.total_length,
            self.message_sha256,
            0,
        )[:-4]
        crc = zlib.crc32(self.body, zlib.crc32(head))
        return head + struct.pack(">I", crc) + self.body


def new_message_id() -> bytes:
    """A fresh random id: re-publishing equal content must not look like a duplicate."""
    return uuid.uuid4().bytes


def chunk_count(payload_length: int, max_chunk_bytes: int) -> int:
    """How many chunks of at most `max_chunk_bytes` (header included) a payload needs."""
    body = _body_capacity(max_chunk_bytes)
    return max(1, -(-payload_length // body))


def _body_capacity(max_chunk_bytes: int) -> int:
    body = max_chunk_bytes - CHUNK_HEADER_SIZE
    if body < 1:
        raise ValueError(
            f"max_chunk_bytes={max_chunk_bytes} leaves no room for data "
            f"(the chunk header takes {CHUNK_HEADER_SIZE} bytes)"
        )
    return body


def split_message(
    payload: bytes,
    max_chunk_bytes: int,
    *,
    message_id: bytes | None = None,
    spread: bool = False,
) -> list[bytes]:
    """Encoded chunks, each at most `max_chunk_bytes` long; list position = chunk index.

    Pass the same `message_id` (and chunk size) to re-send chunks of a message the receiver has
    partly seen: it fills the gaps and ignores what it already holds.
    """
    mid = new_message_id() if message_id is None else message_id
    if len(mid) != MESSAGE_ID_SIZE:
        raise ValueError(f"message_id must be {MESSAGE_ID_SIZE} bytes, got {len(mid)}")
    body = _body_capacity(max_chunk_bytes)
    digest = hashlib.sha256(payload).digest()
    count = chunk_count(len(payload), max_chunk_bytes)
    view = memoryview(payload)
    return [
        Chunk(
            message_id=mid,
            index=index,
            count=count,
            total_length=len(payload),
            message_sha256=digest,
            body=bytes(view[index * body : (index + 1) * body]),
            spread=spread,
        ).encode()
        for index in range(count)
    ]


def decode_chunk(data: bytes) -> Chunk:
    """Parse and check one chunk; anything malformed is a ProtocolError, never another crash."""
    if len(data) < CHUNK_HEADER_SIZE:
        raise ProtocolError(f"chunk of {len(data)} bytes is shorter than its header")
    magic, flags, mid, index, count, total, digest, crc = _HEADER.unpack_from(data)
    if magic != CHUNK_MAGIC:
        raise ProtocolError(f"not a fedfmx chunk (magic {magic!r})")
    body = data[CHUNK_HEADER_SIZE:]
    if zlib.crc32(body, zlib.crc32(data[: CHUNK_HEADER_SIZE - 4])) != crc:
        raise ProtocolError(f"chunk {index} of message {mid.hex()} fails its crc32")
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(f"chunk {index} of message {mid.hex()} has unknown flags {flags:#x}")
    if count < 1 or index >= count:
        raise ProtocolError(f"chunk index {index} outside its count {count}")
    if count > max(1, total) or len(body) > total:
        raise ProtocolError(f"chunk {index}/{count} inconsistent with total length {total}")
    return Chunk(mid, index, count, total, digest, bytes(body), bool(flags & FLAG_SPREAD))


@dataclass(frozen=True)
class PartialMessage:
    """A message still being assembled: what a receiver can ask its sender to re-send."""

    origin: str
    message_id: bytes
    count: int
    missing: tuple[int, ...]


@dataclass
class _Partial:
    count: int
    total_length: int
    message_sha256: bytes
    last_activity: float
    bodies: dict[int, bytes] = field(default_factory=dict)
    stored_bytes: int = 0

    def missing(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.count) if i not in self.bodies)


class Reassembler:
    """Collects chunks per (origin, message id) and yields each verified message once.

    Bounded: at most `max_messages` partial messages, at most `max_per_origin` of them from one
    origin, each at most `max_message_bytes`; a new message that finds the slots full evicts the
    idlest partial (of its own origin first), so a flood of first chunks costs the flooder its
    own slots and never locks out a genuine new message; partials idle for `max_age_s` go too.
    The ids of the last `remembered_ids` completed messages are kept so that a late duplicate
    is ignored rather than delivered twice.
    Thread-safe, so another thread can ask what is missing while chunks are fed.
    """

    def __init__(
        self,
        *,
        max_messages: int = 64,
        max_per_origin: int = 4,
        max_message_bytes: int = 64 * 1024 * 1024,
        max_age_s: float = 300.0,
        remembered_ids: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_messages = max_messages
        self.max_per_origin = max_per_origin
        self.max_message_bytes = max_message_bytes
        self.max_age_s = max_age_s
        self._remembered_ids = remembered_ids
        self._clock = clock
        self._partials: dict[tuple[str, bytes], _Partial] = {}
        self._completed: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._lock = threading.Lock()

    def feed(self, data: bytes, origin: str = "") -> bytes | None:
        """Decode and add one encoded chunk; see `feed_chunk`."""
        return self.feed_chunk(decode_chunk(data), origin)

    def feed_chunk(self, chunk: Chunk, origin: str = "") -> bytes | None:
        """Add a chunk from `origin` (e.g. its topic); the whole message when this completes it.

        Returns None while incomplete and for duplicates. Raises ProtocolError for a chunk that
        contradicts its message, exceeds the limits, or completes a message whose hash fails
        (that partial is dropped so a re-send starts clean).
        """
        key = (origin, chunk.message_id)
        with self._lock:
            now = self._clock()
            self._evict_stale_locked(now)
            if key in self._completed:
                self._completed.move_to_end(key)
                return None
            partial = self._partials.get(key)
            if partial is None:
                partial = self._start_locked(key, chunk, now)
            elif (chunk.count, chunk.total_length, chunk.message_sha256) != (
                partial.count,
                partial.total_length,
                partial.message_sha256,
            ):
                raise ProtocolError(
                    f"chunk {chunk.index} of message {chunk.message_id.hex()} from {origin!r} "
                    "disagrees with earlier chunks on count, length or hash"
                )
            partial.last_activity = now
            if chunk.index in partial.bodies:
                return None
            if partial.stored_bytes + len(chunk.body) > partial.total_length:
                raise ProtocolError(
                    f"message {chunk.message_id.hex()} from {origin!r} grows past its declared "
                    f"{partial.total_length} bytes"
                )
            partial.bodies[chunk.index] = chunk.body
            partial.stored_bytes += len(chunk.body)
            if len(partial.bodies) < partial.count:
                return None
            del self._partials[key]
            message = b"".join(partial.bodies[i] for i in range(partial.count))
            if (
                len(message) != partial.total_length
                or hashlib.sha256(message).digest() != partial.message_sha256
            ):
                raise ProtocolError(
                    f"message {chunk.message_id.hex()} from {origin!r} fails its sha256; dropped"
                )
            self._remember_locked(key)
            return message

    def _start_locked(self, key: tuple[str, bytes], chunk: Chunk, now: float) -> _Partial:
        """Open a partial for a new message, evicting the idlest partial of its origin (or of
        everyone) when the slots are full: junk that never completes cannot lock a sender out,
        and an evicted genuine message is simply re-sent by its sender."""
        if chunk.total_length > self.max_message_bytes:
            raise ProtocolError(
                f"message {chunk.message_id.hex()} of {chunk.total_length} bytes exceeds the "
                f"limit of {self.max_message_bytes}"
            )
        origin = key[0]
        same_origin = [k for k in self._partials if k[0] == origin]
        if len(same_origin) >= self.max_per_origin:
            self._evict_idlest_locked(same_origin, f"{self.max_per_origin} from {origin!r}")
        elif len(self._partials) >= self.max_messages:
            self._evict_idlest_locked(list(self._partials), f"{self.max_messages} in all")
        partial = _Partial(chunk.count, chunk.total_length, chunk.message_sha256, now)
        self._partials[key] = partial
        return partial

    def _evict_idlest_locked(self, keys: list[tuple[str, bytes]], limit: str) -> None:
        idlest = min(keys, key=lambda k: self._partials[k].last_activity)
        partial = self._partials.pop(idlest)
        log.warning(
            "evicted message %s from %r (%d of %d chunks): partial-message limit (%s) reached",
            idlest[1].hex(),
            idlest[0],
            len(partial.bodies),
            partial.count,
            limit,
        )

    def forget(self, message_id: bytes, origin: str = "") -> None:
        """Treat a delivered message as never seen, so a re-send of it is delivered again
        (its receiver could not take it: throttled, say)."""
        with self._lock:
            self._completed.pop((origin, message_id), None)

    def _remember_locked(self, key: tuple[str, bytes]) -> None:
        self._completed[key] = None
        while len(self._completed) > self._remembered_ids:
            self._completed.popitem(last=False)

    def _evict_stale_locked(self, now: float) -> list[tuple[str, bytes]]:
        stale = [k for k, p in self._partials.items() if now - p.last_activity > self.max_age_s]
        for origin, mid in stale:
            partial = self._partials.pop((origin, mid))
            log.warning(
                "evicted message %s from %r: %d of %d chunks after %.0f s idle",
                mid.hex(),
                origin,
                len(partial.bodies),
                partial.count,
                self.max_age_s,
            )
        return stale

    def evict_stale(self) -> list[tuple[str, bytes]]:
        """Drop partials idle longer than `max_age_s`; their (origin, message id) keys."""
        with self._lock:
            return self._evict_stale_locked(self._clock())

    def missing(self, message_id: bytes, origin: str = "") -> tuple[int, ...] | None:
        """Chunk indices still missing; () once delivered, None for a message never seen."""
        key = (origin, message_id)
        with self._lock:
            if key in self._completed:
                return ()
            partial = self._partials.get(key)
            return None if partial is None else partial.missing()

    def partials(self) -> list[PartialMessage]:
        """Every message in assembly with its missing indices, to request re-sends."""
        with self._lock:
            return [
                PartialMessage(origin, mid, p.count, p.missing())
                for (origin, mid), p in self._partials.items()
            ]
