"""Signed model manifests: a device loads a model only if the fleet's aggregator vouches for it.

The aggregator signs a manifest (fleet, version, SHA-256 of every chunk of the encoded model)
with its Ed25519 key; the device checks the signature with the fleet's public key, every chunk
hash, and that the version is newer than the one it runs (a replayed old manifest is refused).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key
from pydantic import Field, ValidationError

from fedfmx.errors import ConfigError, ProtocolError
from fedfmx.messages import Message


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


class Manifest(Message):
    """What the aggregator vouches for: one model version, as the chunks that carry it."""

    fleet: str
    version: int = Field(ge=0)
    chunk_bytes: int = Field(gt=0)
    """Size of every chunk but the last (`chunk_payload` cuts the payload the same way)."""
    chunk_sha256: list[str]
    total_bytes: int = Field(ge=0)


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


def sign_manifest(
    key: Ed25519PrivateKey | None, fleet: str, version: int, chunks: Sequence[bytes]
) -> SignedManifest:
    """The manifest of `chunks` (cut by `chunk_payload`), signed unless `key` is None."""
    manifest = Manifest(
        fleet=fleet,
        version=version,
        chunk_bytes=max(1, len(chunks[0]) if chunks else 1),
        chunk_sha256=[_digest(chunk) for chunk in chunks],
        total_bytes=sum(len(chunk) for chunk in chunks),
    )
    signature = b"" if key is None else key.sign(manifest.model_dump_json().encode())
    return SignedManifest(manifest=manifest, signature=base64.b64encode(signature).decode())


def verify_manifest(
    text: bytes, public_key: Ed25519PublicKey | None, fleet: str, running_version: int | None
) -> Manifest:
    """Parse and check a signed manifest; ProtocolError says why it is refused.

    `public_key` None (a fleet without signing) skips only the signature check.
    """
    try:
        signed = SignedManifest.model_validate_json(text)
        signature = base64.b64decode(signed.signature, validate=True)
    except (ValidationError, ValueError):
        raise ProtocolError("manifest is malformed") from None
    try:
        if public_key is not None:
            public_key.verify(signature, signed.manifest.model_dump_json().encode())
    except InvalidSignature:
        raise ProtocolError("manifest signature does not verify with the fleet key") from None
    manifest = signed.manifest
    if manifest.fleet != fleet:
        raise ProtocolError(f"manifest is for fleet {manifest.fleet!r}, not {fleet!r}")
    if running_version is not None and manifest.version <= running_version:
        raise ProtocolError(
            f"manifest version {manifest.version} is not newer than the running {running_version}"
        )
    return manifest


def assemble_verified(manifest: Manifest, chunks: Sequence[bytes]) -> bytes:
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
