"""A model version taken as a delta, checked to be the signed full version bit for bit.

Shared by the training device (`edge_client.agent`) and the serving-only device
(`edge_client.serving_device`): the delta's chunks must be the ones the signed manifest names,
it must be against the version the device holds (number and payload hash), and the version it
gives, re-encoded, must be exactly the full version the manifest signs (docs/decisions.md §18).
"""

from __future__ import annotations

from fedfmx.errors import ProtocolError
from fedfmx.federation.aggregation import Arrays
from fedfmx.wire.codec import encode_model
from fedfmx.wire.messages import ModelHeader
from fedfmx.wire.model_delta import decode_delta, payload_digest
from fedfmx.wire.signing import Manifest, assemble_verified, chunk_payload


def full_from_delta(
    manifest: Manifest, body: bytes, held: ModelHeader, held_payload: bytes, held_weights: Arrays
) -> bytes:
    """The full payload of `manifest`'s version from its delta `body` applied to the held
    version; ProtocolError when any check fails (the caller takes the full version)."""
    delta = manifest.delta
    if delta is None:
        raise ProtocolError("the manifest names no delta")
    payload = assemble_verified(delta, chunk_payload(body, delta.chunk_bytes))
    header, weights = decode_delta(payload, held_weights, decoded_bytes=delta.decoded_bytes)
    if header.base_version != held.version or header.base_sha256 != payload_digest(held_payload):
        raise ProtocolError(f"delta is not against the held version {held.version}")
    full = encode_model(
        ModelHeader(fleet=header.fleet, version=header.version, class_names=header.class_names),
        weights,
    )
    try:
        assemble_verified(manifest, chunk_payload(full, manifest.chunk_bytes))
    except ProtocolError:
        raise ProtocolError("the decoded delta is not the signed full version") from None
    return full
