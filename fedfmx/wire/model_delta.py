"""Model versions on the downlink as a delta against the version a device holds.

Wire layout::

    DELTA_MAGIC `FMXD` | header length (u32, big-endian) | DeltaHeader JSON | zstd(safetensors)

Each tensor of the new version travels in one of three forms (`DeltaHeader.tensors`):

- `int8`: `<name>.q` (int8) and `<name>.scale` (float32, one per row) of `d = new − base`,
  symmetric per row (`fedfmx.wire.codec.quantize_rows`); decoded `new := base + q·s`, in float32;
- `xor`: `<name>.x` (uint32): the bits of `new` XOR the bits of `base`, lossless (the
  closed-form methods' statistics and head, where int8 costs accuracy: benchmarks/README);
- `full`: `<name>` float32, when the base has no tensor of that name and shape.

A base with fewer rows (the head grew a row per new class) is zero-padded to the new shape.

The aggregator *defines* the published version as `base + decoded(delta)` (`publishable`):
the full version carries exactly those bits, so a device that applies the delta and one that
takes the full version hold the same model, and the device can check the delta's result
against the signed manifest of the full version bit for bit. The rounding of one round's
delta (≤ s/2 per value) is not fed back: the next round's merge starts from the published
version itself, which every device and the aggregator share.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import zstandard
from safetensors.numpy import save as save_tensors

from fedfmx.errors import ProtocolError
from fedfmx.wire.codec import (
    MAX_MODEL_BYTES,
    checked_scale,
    decompress_bounded,
    dequantize_rows,
    expect_tensor,
    frame,
    load_body,
    parse_header,
    quantize_rows,
    unframe,
)
from fedfmx.wire.messages import DeltaHeader, DeltaKind, DeltaTensor

DELTA_MAGIC = b"FMXD"

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Publishable:
    """A merged version as it is published: its weights and the delta parts that define them."""

    weights: Arrays
    tensors: list[DeltaTensor]
    parts: Arrays


@dataclass(frozen=True)
class EncodedDelta:
    payload: bytes
    base_version: int
    decoded_bytes: int
    """Size of the decompressed body (the signed manifest caps decompression at it)."""


def _aligned(base: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """The base tensor in the new tensor's shape (zero rows appended), or None if it has none."""
    if base is None or base.ndim != len(shape) or base.dtype != np.float32:
        return None
    if base.shape == shape:
        return base
    if base.ndim and base.shape[1:] == shape[1:] and base.shape[0] <= shape[0]:
        padded = np.zeros(shape, dtype=np.float32)
        padded[: base.shape[0]] = base
        return padded
    return None


def _apply_int8(base: np.ndarray, q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """`base + q·s` in float32: the one formula both ends evaluate, so both get the same bits."""
    return (base + dequantize_rows(q, scale)).astype(np.float32, copy=False)


def _apply_xor(base: np.ndarray, bits: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(base).view(np.uint32) ^ bits).view(np.float32)


def publishable(
    base: Mapping[str, np.ndarray], merged: Mapping[str, np.ndarray], lossless: bool
) -> Publishable:
    """The version to publish for `merged`, starting from `base`, and its delta parts.

    `lossless`: every tensor with a base travels as `xor` (the published version is `merged`
    exactly); otherwise as `int8` (the published version is `base + q·s`).
    """
    weights: Arrays = {}
    tensors: list[DeltaTensor] = []
    parts: Arrays = {}
    kind: DeltaKind
    for name, value in merged.items():
        new = np.ascontiguousarray(value, dtype=np.float32)
        aligned = _aligned(base.get(name), new.shape)
        if aligned is None:
            kind, parts[name], weights[name] = "full", new, new
        elif lossless:
            bits = new.view(np.uint32) ^ np.ascontiguousarray(aligned).view(np.uint32)
            kind, parts[f"{name}.x"], weights[name] = "xor", bits, new
        else:
            q, scale = quantize_rows(new - aligned)
            parts[f"{name}.q"], parts[f"{name}.scale"] = q, scale
            kind, weights[name] = "int8", _apply_int8(aligned, q, scale)
        tensors.append(DeltaTensor(name=name, kind=kind, shape=list(new.shape)))
    return Publishable(weights, tensors, parts)


def payload_digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def encode_delta(
    header: DeltaHeader, parts: Mapping[str, np.ndarray], zstd_level: int
) -> EncodedDelta:
    body = save_tensors(dict(parts))
    compressed = zstandard.ZstdCompressor(level=zstd_level).compress(body)
    return EncodedDelta(frame(DELTA_MAGIC, header, compressed), header.base_version, len(body))


def _part_names(tensor: DeltaTensor) -> set[str]:
    if tensor.kind == "int8":
        return {f"{tensor.name}.q", f"{tensor.name}.scale"}
    if tensor.kind == "xor":
        return {f"{tensor.name}.x"}
    return {tensor.name}


def _decode_tensor(
    tensor: DeltaTensor, stored: Arrays, base: Mapping[str, np.ndarray]
) -> np.ndarray:
    name, shape = tensor.name, tuple(tensor.shape)
    if tensor.kind == "full":
        return expect_tensor(stored, name, np.float32, shape)
    aligned = _aligned(base.get(name), shape)
    if aligned is None:
        raise ProtocolError(f"delta tensor {name}: the held version has no base for it")
    if tensor.kind == "xor":
        return _apply_xor(aligned, expect_tensor(stored, f"{name}.x", np.uint32, shape))
    q = expect_tensor(stored, f"{name}.q", np.int8, shape)
    rows = q.shape[0] if q.ndim > 1 else 1
    return _apply_int8(aligned, q, checked_scale(stored, name, rows))


def decode_delta(
    payload: bytes, base: Mapping[str, np.ndarray], *, decoded_bytes: int
) -> tuple[DeltaHeader, Arrays]:
    """Validate a delta and apply it to `base`; ProtocolError with the reason otherwise.

    `decoded_bytes` is the body size the signed manifest states: decompression stops there.
    """
    if decoded_bytes > MAX_MODEL_BYTES:
        raise ProtocolError(f"delta claims {decoded_bytes} decoded bytes, over {MAX_MODEL_BYTES}")
    text, body = unframe(payload, DELTA_MAGIC, MAX_MODEL_BYTES)
    header = parse_header(text, DeltaHeader)
    stored = load_body(decompress_bounded(body, decoded_bytes))
    names = [t.name for t in header.tensors]
    if len(set(names)) != len(names):
        raise ProtocolError("delta names a tensor twice")
    wanted = set().union(*(_part_names(t) for t in header.tensors)) if names else set()
    if set(stored) != wanted:
        extra, missing = sorted(set(stored) - wanted), sorted(wanted - set(stored))
        raise ProtocolError(
            f"delta parts differ from its header: extra {extra[:3]}, missing {missing[:3]}"
        )
    weights = {t.name: _decode_tensor(t, stored, base) for t in header.tensors}
    for name, value in weights.items():
        if not np.all(np.isfinite(value)):
            raise ProtocolError(f"delta tensor {name}: the result is not finite")
    return header, weights
