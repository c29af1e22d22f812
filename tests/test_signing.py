"""Signed model manifests: tampering, foreign keys, other fleets and replays are refused."""

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedfmx.errors import ProtocolError
from fedfmx.wire.signing import (
    DeltaPayload,
    assemble_verified,
    chunk_payload,
    sign_manifest,
    verify_manifest,
)

KEY = Ed25519PrivateKey.generate()
PAYLOAD = bytes(range(256)) * 40  # 10,240 bytes
CHUNKS = chunk_payload(PAYLOAD, 4096)


def _signed(version: int = 5, key: Ed25519PrivateKey = KEY) -> bytes:
    return sign_manifest(key, "city", version, CHUNKS).model_dump_json().encode()


def test_a_signed_model_verifies_and_reassembles() -> None:
    assert [len(c) for c in CHUNKS] == [4096, 4096, 2048]
    manifest = verify_manifest(_signed(), KEY.public_key(), "city", running_version=4)
    assert assemble_verified(manifest, CHUNKS) == PAYLOAD


def test_a_tampered_chunk_is_refused() -> None:
    manifest = verify_manifest(_signed(), KEY.public_key(), "city", running_version=None)
    evil = [CHUNKS[0], CHUNKS[1][:-1] + b"\x00", CHUNKS[2]]
    with pytest.raises(ProtocolError, match="chunk 1 does not match"):
        assemble_verified(manifest, evil)
    with pytest.raises(ProtocolError, match="expected 3 chunks"):
        assemble_verified(manifest, CHUNKS[:2])


def test_a_tampered_manifest_or_foreign_key_is_refused() -> None:
    edited = _signed().replace(b'"version":5', b'"version":6')
    with pytest.raises(ProtocolError, match="does not verify"):
        verify_manifest(edited, KEY.public_key(), "city", running_version=None)
    other = Ed25519PrivateKey.generate()
    with pytest.raises(ProtocolError, match="does not verify"):
        verify_manifest(_signed(key=other), KEY.public_key(), "city", running_version=None)
    with pytest.raises(ProtocolError, match="malformed"):
        verify_manifest(b"{}", KEY.public_key(), "city", running_version=None)


def test_replays_and_other_fleets_are_refused() -> None:
    with pytest.raises(ProtocolError, match="not newer than the running 5"):
        verify_manifest(_signed(version=5), KEY.public_key(), "city", running_version=5)
    with pytest.raises(ProtocolError, match="fleet 'city', not 'harbour'"):
        verify_manifest(_signed(), KEY.public_key(), "harbour", running_version=None)


def test_the_signature_covers_the_delta_the_manifest_names() -> None:
    delta = DeltaPayload(chunk_payload(PAYLOAD[:5000], 4096), base_version=4, decoded_bytes=9000)
    signed = sign_manifest(KEY, "city", 5, CHUNKS, delta).model_dump_json().encode()
    manifest = verify_manifest(signed, KEY.public_key(), "city", running_version=4)
    assert manifest.delta is not None and manifest.delta.base_version == 4
    assert assemble_verified(manifest.delta, delta.chunks) == PAYLOAD[:5000]
    for edit in (b'"decoded_bytes":9000', b'"base_version":4'):
        tampered = signed.replace(edit, edit[:-1] + b"1")
        assert tampered != signed
        with pytest.raises(ProtocolError, match="does not verify"):
            verify_manifest(tampered, KEY.public_key(), "city", running_version=None)
