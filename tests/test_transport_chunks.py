"""Chunk framing and reassembly: any order, duplicates, corruption, limits, eviction."""

from __future__ import annotations

import hashlib
import os
import random

import pytest

from fedfmx.errors import ProtocolError
from transport.chunks import (
    CHUNK_HEADER_SIZE,
    Reassembler,
    chunk_count,
    decode_chunk,
    new_message_id,
    split_message,
)


def _payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def test_every_chunk_fits_the_limit_header_included() -> None:
    payload = _payload(10_000)
    chunks = split_message(payload, 1_000)
    assert (
        len(chunks) == chunk_count(len(payload), 1_000) == -(-10_000 // (1_000 - CHUNK_HEADER_SIZE))
    )
    assert all(len(c) <= 1_000 for c in chunks)
    assert [decode_chunk(c).index for c in chunks] == list(range(len(chunks)))


def test_reassembles_in_any_order_exactly_once() -> None:
    payload = _payload(50_000, seed=1)
    chunks = split_message(payload, 4_096)
    random.Random(2).shuffle(chunks)
    reassembler = Reassembler()
    results = [reassembler.feed(c, "t") for c in chunks]
    assert results[:-1] == [None] * (len(chunks) - 1)
    assert results[-1] == payload
    assert reassembler.partials() == []


def test_duplicates_change_nothing_before_or_after_completion() -> None:
    payload = _payload(20_000, seed=3)
    chunks = split_message(payload, 2_048)
    reassembler = Reassembler()
    delivered = [
        m for c in chunks + chunks[:3] + chunks + chunks if (m := reassembler.feed(c)) is not None
    ]
    assert delivered == [payload]


def test_empty_message_is_one_chunk() -> None:
    chunks = split_message(b"", 256)
    assert len(chunks) == 1
    assert Reassembler().feed(chunks[0]) == b""


def test_same_message_id_on_another_origin_is_another_message() -> None:
    mid = new_message_id()
    chunks = split_message(b"hello", 256, message_id=mid)
    reassembler = Reassembler()
    assert reassembler.feed(chunks[0], "a") == b"hello"
    assert reassembler.feed(chunks[0], "b") == b"hello"
    assert reassembler.feed(chunks[0], "a") is None


def test_flipped_bit_is_rejected_and_the_message_still_completes_from_a_resend() -> None:
    payload = _payload(9_000, seed=4)
    chunks = split_message(payload, 1_024)
    corrupt = bytearray(chunks[2])
    corrupt[-1] ^= 0x01
    reassembler = Reassembler()
    with pytest.raises(ProtocolError, match="crc32"):
        reassembler.feed(bytes(corrupt))
    results = [reassembler.feed(c) for c in chunks]
    assert results[-1] == payload


@pytest.mark.parametrize(
    "garbage",
    [b"", b"short", os.urandom(CHUNK_HEADER_SIZE + 10), b"XXXX" + bytes(CHUNK_HEADER_SIZE)],
)
def test_garbage_is_a_protocol_error(garbage: bytes) -> None:
    with pytest.raises(ProtocolError):
        Reassembler().feed(garbage)


def test_hash_mismatch_drops_the_partial() -> None:
    mid = new_message_id()
    good = split_message(b"a" * 600, 256, message_id=mid)
    forged = split_message(b"b" * 600, 256, message_id=mid)
    # A forged chunk that claims the good message's hash: re-frame its body under that header.
    fake = decode_chunk(forged[1])
    header = decode_chunk(good[1])
    swapped = type(header)(
        header.message_id,
        header.index,
        header.count,
        header.total_length,
        header.message_sha256,
        fake.body,
    ).encode()
    reassembler = Reassembler()
    for chunk in [good[0], swapped, *good[2:-1]]:
        assert reassembler.feed(chunk) is None
    with pytest.raises(ProtocolError, match="sha256"):
        reassembler.feed(good[-1])
    assert reassembler.missing(mid) is None
    assert [reassembler.feed(c) for c in good][-1] == b"a" * 600


def test_chunks_that_disagree_on_their_message_are_rejected() -> None:
    mid = new_message_id()
    first = split_message(b"x" * 1_000, 256, message_id=mid)
    other = split_message(b"y" * 2_000, 256, message_id=mid)
    reassembler = Reassembler()
    reassembler.feed(first[0])
    with pytest.raises(ProtocolError, match="disagrees"):
        reassembler.feed(other[1])


def test_reports_missing_indices_for_a_resend() -> None:
    payload = _payload(5_000, seed=5)
    mid = new_message_id()
    chunks = split_message(payload, 1_000, message_id=mid)
    reassembler = Reassembler()
    for index in (0, 2, 5):
        reassembler.feed(chunks[index], "up")
    missing = reassembler.missing(mid, "up")
    assert missing == (1, 3, 4)
    [partial] = reassembler.partials()
    assert (partial.origin, partial.message_id, partial.missing) == ("up", mid, missing)
    resent = split_message(payload, 1_000, message_id=mid)
    results = [reassembler.feed(resent[i], "up") for i in missing]
    assert results[-1] == payload
    assert reassembler.missing(mid, "up") == ()
    assert reassembler.missing(new_message_id(), "up") is None


def test_oversized_message_is_refused_before_buffering() -> None:
    chunks = split_message(_payload(5_000), 1_000)
    reassembler = Reassembler(max_message_bytes=4_000)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        reassembler.feed(chunks[0])
    assert reassembler.partials() == []


def test_a_full_table_evicts_the_idlest_partial_instead_of_refusing() -> None:
    now = [0.0]
    reassembler = Reassembler(max_messages=2, max_per_origin=2, clock=lambda: now[0])
    first = [split_message(_payload(3_000, seed=s), 1_000) for s in range(3)]
    reassembler.feed(first[0][0], origin="a")
    now[0] = 1.0
    reassembler.feed(first[1][0], origin="b")
    now[0] = 2.0
    reassembler.feed(first[2][0], origin="c")  # evicts a's partial, the idlest
    assert len(reassembler.partials()) == 2
    assert reassembler.missing(decode_chunk(first[0][0]).message_id, "a") is None
    assert [reassembler.feed(c, origin="c") for c in first[2][1:]][-1] == _payload(3_000, seed=2)


def test_junk_first_chunks_never_lock_a_sender_out() -> None:
    """Issue 13 item 5: four never-completed first chunks once filled a device's slots for
    `max_age_s`; now the genuine message takes the idlest slot and completes."""
    now = [0.0]
    reassembler = Reassembler(max_messages=64, max_per_origin=4, clock=lambda: now[0])
    for seed in range(10):
        now[0] += 1.0
        reassembler.feed(split_message(_payload(3_000, seed=seed), 1_000)[0], origin="dev")
    assert len(reassembler.partials()) == 4
    genuine = split_message(_payload(2_500, seed=99), 1_000)
    delivered = [reassembler.feed(c, origin="dev") for c in genuine]
    assert delivered[-1] == _payload(2_500, seed=99)


def test_forgotten_message_is_delivered_again() -> None:
    chunks = split_message(_payload(1_500, seed=3), 1_000)
    reassembler = Reassembler()
    assert [reassembler.feed(c) for c in chunks][-1] == _payload(1_500, seed=3)
    assert [reassembler.feed(c) for c in chunks] == [None, None]  # a duplicate
    reassembler.forget(decode_chunk(chunks[0]).message_id)
    assert [reassembler.feed(c) for c in chunks][-1] == _payload(1_500, seed=3)


def test_stale_partials_are_evicted_by_idle_time() -> None:
    now = [0.0]
    reassembler = Reassembler(max_age_s=10.0, clock=lambda: now[0])
    slow = split_message(_payload(3_000, seed=7), 1_000)
    idle = split_message(_payload(3_000, seed=8), 1_000)
    reassembler.feed(slow[0])
    reassembler.feed(idle[0])
    now[0] = 8.0
    reassembler.feed(slow[1])
    now[0] = 12.0
    assert [mid for _, mid in reassembler.evict_stale()] == [decode_chunk(idle[0]).message_id]
    assert [reassembler.feed(c) for c in slow[2:]][-1] == _payload(3_000, seed=7)


def test_message_id_must_be_16_bytes_and_limit_must_leave_room() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        split_message(b"x", 256, message_id=b"short")
    with pytest.raises(ValueError, match="no room"):
        split_message(b"x", CHUNK_HEADER_SIZE)


def test_header_carries_the_whole_message_hash() -> None:
    payload = _payload(3_000, seed=9)
    chunk = decode_chunk(split_message(payload, 1_000)[1])
    assert chunk.message_sha256 == hashlib.sha256(payload).digest()
    assert (chunk.index, chunk.count, chunk.total_length) == (1, 4, 3_000)
