"""Signed messages: a device acts only on what the fleet's aggregator vouches for.

The aggregator signs, with its Ed25519 key, each model manifest (fleet, version, SHA-256 of
every chunk of the encoded model, and of its delta against the previous version when one is
published, with the delta's decoded size) and each round announcement; the device checks the
signature with the fleet's public key. For a model it also checks every chunk hash and that
the version is newer than the one it runs (a replayed old manifest is refused). The signature
covers the message's canonical JSON (pydantic's, fields in declaration order).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key
from pydantic import Field, ValidationError

from fedfmx.errors import ConfigError, ProtocolError
from fedfmx.wire.messages import Message, RoundAnnouncement


def load_signing_key(path: Path | None) -> Ed25519PrivateKey | None:
    """The aggregator's private key (PEM); None: the fleet publishes unsigned manifests."""
    if path is None:
        return None
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise ConfigError(f"{path}: not a readable PEM private key ({error})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: the signing key must be Ed25519")
    return key


def load_verify_key(path: Path | None) -> Ed25519PublicKey | None:
    """The fleet's public key (PEM) a device checks manifests with; None: hashes only."""
    if path is None:
        return None
    try:
        key = load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: not a readable PEM public key ({error})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: the fleet key must be Ed25519")
    return key


class ChunkList(Message):
    """A payload as the chunks that carry it."""

    chunk_bytes: int = Field(gt=0)
    """Size of every chunk but the last (`chunk_payload` cuts the payload the same way)."""
    chunk_sha256: list[str]
    total_bytes: int = Field(ge=0)


class DeltaChunks(ChunkList):
    """The delta a version is also published as (`fedfmx.wire.model_delta`), against
    `base_version`."""

    base_version: int = Field(ge=0)
    decoded_bytes: int = Field(ge=0)
    """Size of the decompressed body: a device stops decompressing there (no zstd bomb)."""


class Manifest(ChunkList):
    """What the aggregator vouches for: one model version, as the chunks that carry it, and
    the chunks of its delta when one is published."""

    fleet: str
    version: int = Field(ge=0)
    delta: DeltaChunks | None = None


class SignedManifest(Message):
    manifest: Manifest
    signature: str
    """Base64 Ed25519 signature over the manifest's canonical JSON; empty when the fleet has
    no signing key (devices then check only the hashes)."""


def chunk_payload(payload: bytes, chunk_bytes: int) -> list[bytes]:
    """The model payload cut into chunks of at most `chunk_bytes`."""
    return [payload[start : start + chunk_bytes] for start in range(0, len(payload), chunk_bytes)]


def _digest(chunk: bytes) -> str:
    return hashlib.sha256(chunk).hexdigest()


def _signature(key: Ed25519PrivateKey | None, message: Message) -> str:
    """Base64 Ed25519 signature of `message`'s canonical JSON; empty without a key."""
    signature = b"" if key is None else key.sign(message.model_dump_json().encode())
    return base64.b64encode(signature).decode()


def _check_signature(
    public_key: Ed25519PublicKey | None, signature: str, message: Message, what: str
) -> None:
    """ProtocolError unless `signature` is the fleet key's over `message` (no key: no check)."""
    if public_key is None:
        return
    try:
        public_key.verify(
            base64.b64decode(signature, validate=True), message.model_dump_json().encode()
        )
    except (InvalidSignature, ValueError):
        raise ProtocolError(f"{what} signature does not verify with the fleet key") from None


def _chunk_fields(chunks: Sequence[bytes]) -> dict[str, object]:
    return {
        "chunk_bytes": max(1, len(chunks[0]) if chunks else 1),
        "chunk_sha256": [_digest(chunk) for chunk in chunks],
        "total_bytes": sum(len(chunk) for chunk in chunks),
    }


@dataclass(frozen=True)
class DeltaPayload:
    """A delta to name in a manifest: its chunks (cut by `chunk_payload`) and what it states."""

    chunks: Sequence[bytes]
    base_version: int
    decoded_bytes: int


def sign_manifest(
    key: Ed25519PrivateKey | None,
    fleet: str,
    version: int,
    chunks: Sequence[bytes],
    delta: DeltaPayload | None = None,
) -> SignedManifest:
    """The manifest of `chunks` (cut by `chunk_payload`) and of the version's delta, signed
    unless `key` is None."""
    delta_chunks = None
    if delta is not None:
        delta_chunks = DeltaChunks.model_validate(
            _chunk_fields(delta.chunks)
            | {"base_version": delta.base_version, "decoded_bytes": delta.decoded_bytes}
        )
    manifest = Manifest.model_validate(
        _chunk_fields(chunks) | {"fleet": fleet, "version": version, "delta": delta_chunks}
    )
    return SignedManifest(manifest=manifest, signature=_signature(key, manifest))


def verify_manifest(
    text: bytes, public_key: Ed25519PublicKey | None, fleet: str, running_version: int | None
) -> Manifest:
    """Parse and check a signed manifest; ProtocolError says why it is refused.

    `public_key` None (a fleet without signing) skips only the signature check.
    """
    try:
        signed = SignedManifest.model_validate_json(text)
    except ValidationError:
        raise ProtocolError("manifest is malformed") from None
    _check_signature(public_key, signed.signature, signed.manifest, "manifest")
    manifest = signed.manifest
    if manifest.fleet != fleet:
        raise ProtocolError(f"manifest is for fleet {manifest.fleet!r}, not {fleet!r}")
    if running_version is not None and manifest.version <= running_version:
        raise ProtocolError(
            f"manifest version {manifest.version} is not newer than the running {running_version}"
        )
    return manifest


class SignedAnnouncement(Message):
    """What the round topic carries: the announcement and the aggregator's signature of it."""

    announcement: RoundAnnouncement
    signature: str
    """Base64 Ed25519 signature over the announcement's canonical JSON; empty when the fleet
    has no signing key."""


def sign_announcement(
    key: Ed25519PrivateKey | None, announcement: RoundAnnouncement
) -> SignedAnnouncement:
    return SignedAnnouncement(announcement=announcement, signature=_signature(key, announcement))


def verify_announcement(
    text: bytes, public_key: Ed25519PublicKey | None, fleet: str
) -> RoundAnnouncement:
    """Parse and check a signed round announcement; ProtocolError says why it is refused.

    Unsigned rounds could be announced by anyone who can publish on the round topic (a broker
    without ACLs): a device with the fleet key acts only on the aggregator's own.
    """
    try:
        signed = SignedAnnouncement.model_validate_json(text)
    except ValidationError as error:
        count = error.error_count()
        raise ProtocolError(f"malformed round announcement ({count} errors)") from None
    _check_signature(public_key, signed.signature, signed.announcement, "round announcement")
    if signed.announcement.fleet != fleet:
        raise ProtocolError(f"round announcement for fleet {signed.announcement.fleet!r}")
    return signed.announcement


def assemble_verified(manifest: ChunkList, chunks: Sequence[bytes]) -> bytes:
    """Join the chunks only if each one is the chunk the manifest names."""
    if len(chunks) != len(manifest.chunk_sha256):
        raise ProtocolError(f"expected {len(manifest.chunk_sha256)} chunks, got {len(chunks)}")
    for index, (chunk, expected) in enumerate(zip(chunks, manifest.chunk_sha256, strict=True)):
        if _digest(chunk) != expected:
            raise ProtocolError(f"chunk {index} does not match the signed manifest")
    payload = b"".join(chunks)
    if len(payload) != manifest.total_bytes or any(
        len(chunk) != manifest.chunk_bytes for chunk in chunks[:-1]
    ):
        raise ProtocolError("model size does not match the signed manifest")
    return payload
