"""Update and model codec: what travels between devices and the aggregator, and its validation.

Wire layout (both directions)::

    MAGIC (4 bytes) | header length (u32, big-endian) | header JSON (utf-8) | body

`MAGIC` is `FMXU` for an update, `FMXM` for a model. The body is a safetensors file, zstd-
compressed when the header's codec says so (a model body is compressed when it starts with the
zstd frame magic). Nothing is ever pickled.

An update's tensors are encoded per `UpdateHeader.codec`:

- plain: `<name>` float32, as given;
- `quantize="fp16"`: `<name>` float16 (half the bytes; relative rounding ≤ 2⁻¹¹; Fisher
  summaries stay float32);
- `quantize="int8"`: symmetric per row, `q = round(x / s)`, `s = max|row| / 127`, stored as
  `<name>.q` (int8, same shape) and `<name>.scale` (float32, one per row; a 1-D tensor is one
  row); decoding gives `q·s`, within `s/2` of `x`;
- `topk_fraction=f` (not for `fisher.*` nor `stats.*`): of `x + r` (r the error-feedback
  residual kept on the device) only the `k = max(1, ceil(f·n))` largest magnitudes travel, as
  `<name>.idx` (int32 flat indices, increasing) and `<name>.v` (float32 or fp16, or int8 with
  one `<name>.scale`);
  the new residual is `x + r − decoded`, so what is not sent now is sent later.

`decode_update` checks everything before the caller sees a tensor: sizes, magic, header schema,
compression bomb, safetensors framing, the exact set of names, dtypes and shapes the receiver
expects for this header, index ranges, finite scales and values, non-negative Fisher values and
the L2 norm bound. Anything else is a `ProtocolError` with a one-line reason.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import zstandard
from pydantic import BaseModel, ValidationError
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from fedfmx.errors import ProtocolError
from fedfmx.federation.aggregation import FISHER_PREFIX, is_delta
from fedfmx.wire.messages import CodecSettings, ModelHeader, UpdateHeader

UPDATE_MAGIC = b"FMXU"
MODEL_MAGIC = b"FMXM"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
DECOMPRESSION_FACTOR = 8
"""A body may decompress to at most this many times the payload limit (zip-bomb guard)."""

Arrays = dict[str, np.ndarray]
ExpectedShapes = Callable[[UpdateHeader], Mapping[str, tuple[int, ...]]]


MAX_MODEL_BYTES = 256 * 1024 * 1024
"""Largest encoded model anyone decodes (a hostile size field cannot make us allocate more)."""


@dataclass(frozen=True)
class EncodedUpdate:
    payload: bytes
    residual: Arrays
    """Error-feedback residual to keep on the device (empty unless top-k is on)."""


def frame(magic: bytes, header: BaseModel, body: bytes) -> bytes:
    text = header.model_dump_json().encode()
    return magic + struct.pack(">I", len(text)) + text + body


def _rows(x: np.ndarray) -> np.ndarray:
    """View as [rows, columns]: the first dimension is the row, a vector is one row."""
    if x.ndim <= 1:
        return x.reshape(1, x.size)
    return x.reshape(x.shape[0], int(np.prod(x.shape[1:])))


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: `q = round(x/s)`, `s = max|row|/127` (0 for an all-zero row)."""
    rows = _rows(x).astype(np.float32)
    scale = (np.abs(rows).max(axis=1, initial=0.0) / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)[:, None]
    q = np.clip(np.rint(rows / safe), -127, 127).astype(np.int8)
    return q.reshape(x.shape), scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (_rows(q).astype(np.float32) * scale[:, None]).reshape(q.shape)


def _plain_dtype(codec: CodecSettings, name: str) -> type:
    """The dtype of values stored without int8 quantisation (Fisher values, often below fp16's
    range, stay float32)."""
    fp16 = codec.quantize == "fp16" and not name.startswith(FISHER_PREFIX)
    return np.float16 if fp16 else np.float32


def topk_count(fraction: float, size: int) -> int:
    return max(1, math.ceil(fraction * size)) if size else 0


def _encode_tensor(
    name: str, x: np.ndarray, codec: CodecSettings, residual: np.ndarray | None
) -> tuple[Arrays, np.ndarray | None]:
    """Stored parts of one tensor, and its new residual (None when top-k does not apply)."""
    x = np.asarray(x, dtype=np.float32)
    if codec.topk_fraction is None or not is_delta(name):
        if codec.quantize == "int8":
            q, scale = quantize_rows(x)
            return {f"{name}.q": q, f"{name}.scale": scale}, None
        return {name: np.ascontiguousarray(x, dtype=_plain_dtype(codec, name))}, None
    # a residual of another shape belongs to rows that no longer line up (the head grew): drop it
    fits = residual is not None and residual.shape == x.shape
    target = (x + residual if fits else x).ravel()
    k = topk_count(codec.topk_fraction, target.size)
    index = np.sort(np.argpartition(-np.abs(target), k - 1)[:k]).astype(np.int32)
    parts: Arrays = {f"{name}.idx": index}
    if codec.quantize == "int8":
        q, scale = quantize_rows(target[index])
        parts |= {f"{name}.v": q, f"{name}.scale": scale}
        sent = dequantize_rows(q, scale)
    else:
        parts[f"{name}.v"] = target[index].astype(_plain_dtype(codec, name))
        sent = parts[f"{name}.v"].astype(np.float32)
    decoded = np.zeros_like(target)
    decoded[index] = sent
    return parts, (target - decoded).reshape(x.shape)


def encode_update(
    header: UpdateHeader,
    tensors: Mapping[str, np.ndarray],
    residual: Mapping[str, np.ndarray] | None = None,
) -> EncodedUpdate:
    """Encode an update with the codec its header names; returns the new residual too."""
    stored: Arrays = {}
    new_residual: Arrays = {}
    for name, value in tensors.items():
        parts, left = _encode_tensor(name, value, header.codec, (residual or {}).get(name))
        stored |= parts
        if left is not None:
            new_residual[name] = left
    body = save_tensors(stored)
    if header.codec.zstd_level is not None:
        body = zstandard.ZstdCompressor(level=header.codec.zstd_level).compress(body)
    return EncodedUpdate(frame(UPDATE_MAGIC, header, body), new_residual)


def unframe(payload: bytes, magic: bytes, max_bytes: int) -> tuple[bytes, bytes]:
    if len(payload) > max_bytes:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    if len(payload) < 8 or payload[:4] != magic:
        raise ProtocolError(f"not a {magic.decode()} payload (bad magic)")
    (length,) = struct.unpack(">I", payload[4:8])
    if length > len(payload) - 8:
        raise ProtocolError(f"header length {length} runs past the payload")
    return payload[8 : 8 + length], payload[8 + length :]


def _decompress(body: bytes, max_bytes: int) -> bytes:
    return decompress_bounded(body, DECOMPRESSION_FACTOR * max_bytes)


def decompress_bounded(body: bytes, limit: int) -> bytes:
    """Decompress a zstd body, refusing one that grows beyond `limit` bytes.

    A frame that declares its size (every frame zstandard writes does) is refused above the
    limit before anything is allocated, and decompressed into exactly that size (a frame that
    holds more than it declares is an error). One that does not is read through a stream of
    at most `limit + 1` bytes, so a bomb never costs more memory than that.
    """
    try:
        declared = zstandard.frame_content_size(body)
        if declared > limit:
            raise ProtocolError(f"body decompresses beyond {limit} bytes")
        if declared >= 0:
            return zstandard.ZstdDecompressor().decompress(body)
        data = zstandard.ZstdDecompressor().stream_reader(body).read(limit + 1)
    except zstandard.ZstdError as error:
        raise ProtocolError(f"zstd body is corrupt: {error}") from None
    if len(data) > limit:
        raise ProtocolError(f"body decompresses beyond {limit} bytes")
    return data


def load_body(body: bytes) -> Arrays:
    try:
        return dict(load_tensors(body))
    except Exception as error:  # safetensors raises several types for malformed input
        raise ProtocolError(f"body is not valid safetensors: {type(error).__name__}") from None


Header = TypeVar("Header", bound=BaseModel)


def parse_header(text: bytes, model: type[Header]) -> Header:
    try:
        return model.model_validate_json(text)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "header"
        raise ProtocolError(f"invalid header: {where}: {first['msg']}") from None


def expect_tensor(stored: Arrays, name: str, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    value = stored[name]
    if value.dtype != dtype or value.shape != shape:
        want = f"{np.dtype(dtype).name}{list(shape)}"
        raise ProtocolError(f"{name}: expected {want}, got {value.dtype.name}{list(value.shape)}")
    return value


def _parts(name: str, codec: CodecSettings) -> set[str]:
    if codec.topk_fraction is None or not is_delta(name):
        return {f"{name}.q", f"{name}.scale"} if codec.quantize == "int8" else {name}
    sparse = {f"{name}.idx", f"{name}.v"}
    return sparse | {f"{name}.scale"} if codec.quantize == "int8" else sparse


def checked_scale(stored: Arrays, name: str, rows: int) -> np.ndarray:
    scale = expect_tensor(stored, f"{name}.scale", np.float32, (rows,))
    if not np.all(np.isfinite(scale)) or np.any(scale < 0):
        raise ProtocolError(f"{name}: scales must be finite and non-negative")
    return scale


def _decode_tensor(
    stored: Arrays, name: str, shape: tuple[int, ...], codec: CodecSettings
) -> np.ndarray:
    size = int(np.prod(shape))
    if codec.topk_fraction is None or not is_delta(name):
        if codec.quantize != "int8":
            return expect_tensor(stored, name, _plain_dtype(codec, name), shape).astype(np.float32)
        q = expect_tensor(stored, f"{name}.q", np.int8, shape)
        return dequantize_rows(q, checked_scale(stored, name, _rows(q).shape[0]))
    k = topk_count(codec.topk_fraction, size)
    index = expect_tensor(stored, f"{name}.idx", np.int32, (k,))
    if k and (index[0] < 0 or index[-1] >= size or np.any(np.diff(index) <= 0)):
        raise ProtocolError(f"{name}: top-k indices out of range or not strictly increasing")
    if codec.quantize == "int8":
        values = dequantize_rows(
            expect_tensor(stored, f"{name}.v", np.int8, (k,)), checked_scale(stored, name, 1)
        )
    else:
        values = expect_tensor(stored, f"{name}.v", _plain_dtype(codec, name), (k,)).astype(
            np.float32
        )
    dense = np.zeros(size, dtype=np.float32)
    dense[index] = values
    return dense.reshape(shape)


def decode_update(
    payload: bytes, expected_shapes: ExpectedShapes, *, max_bytes: int, norm_bound: float
) -> tuple[UpdateHeader, Arrays]:
    """Validate and decode an update; ProtocolError with the reason for anything malformed."""
    text, body = unframe(payload, UPDATE_MAGIC, max_bytes)
    header = parse_header(text, UpdateHeader)
    if len(set(header.expert_ids)) != len(header.expert_ids):
        raise ProtocolError("expert ids repeat")
    if (
        len(header.class_counts) != len(header.head_classes)
        or min(header.class_counts, default=0) < 0
    ):
        raise ProtocolError("class_counts must give one non-negative count per head class")
    if header.codec.zstd_level is not None:
        body = _decompress(body, max_bytes)
    stored = load_body(body)
    try:
        shapes = dict(expected_shapes(header))
    except ProtocolError:
        raise
    except Exception as error:
        raise ProtocolError(f"header does not fit this model: {error}") from None
    wanted = set().union(*(_parts(name, header.codec) for name in shapes)) if shapes else set()
    if set(stored) != wanted:
        extra, missing = sorted(set(stored) - wanted), sorted(wanted - set(stored))
        raise ProtocolError(
            f"tensor names differ from the header: extra {extra[:3]}, missing {missing[:3]}"
        )
    codec = header.codec
    dense = {
        name: tuple(shape)
        for name, shape in shapes.items()
        if codec.quantize == "int8" and (codec.topk_fraction is None or not is_delta(name))
    }
    decoded = _dequantize_all(stored, dense) if dense else {}
    tensors = {
        name: decoded[name] if name in dense else _decode_tensor(stored, name, tuple(shape), codec)
        for name, shape in shapes.items()
    }
    norm = _checked_norm(tensors)
    if norm > norm_bound:
        raise ProtocolError(f"update norm {norm:.3g} exceeds the bound {norm_bound:.3g}")
    return header, tensors


def _dequantize_all(stored: Arrays, shapes: Mapping[str, tuple[int, ...]]) -> Arrays:
    """`q·s` for many int8 tensors at once (the default wire codec), as views of one float32
    buffer: one scale check, one concatenation and one multiply instead of a few numpy calls per
    tensor (an update has dozens of small tensors, and those calls were most of its decoding).
    Bit-identical to `dequantize_rows` tensor by tensor; the same checks and reasons."""
    quantized, scales, rows_of, columns_of = [], [], [], []
    for name, shape in shapes.items():
        q = expect_tensor(stored, f"{name}.q", np.int8, shape)
        rows = shape[0] if len(shape) > 1 else 1
        quantized.append(q.reshape(-1))
        scales.append(expect_tensor(stored, f"{name}.scale", np.float32, (rows,)))
        rows_of.append(rows)
        columns_of.append(q.size // rows if rows else 0)
    scale = np.concatenate(scales)
    if not (np.isfinite(scale).all() and (scale >= 0).all()):
        for name, part in zip(shapes, scales, strict=True):
            checked_scale({f"{name}.scale": part}, name, part.shape[0])  # raises with the name
    flat = np.concatenate(quantized).astype(np.float32)
    with np.errstate(over="ignore"):  # an overflow is refused as non-finite right after
        flat *= np.repeat(scale, np.repeat(columns_of, rows_of))
    decoded: Arrays = {}
    start = 0
    for (name, shape), q in zip(shapes.items(), quantized, strict=True):
        decoded[name] = flat[start : start + q.size].reshape(shape)
        start += q.size
    return decoded


def _checked_norm(tensors: Mapping[str, np.ndarray]) -> float:
    """`‖δ‖₂` over the delta tensors (as `delta_norm`), after checking every value is finite
    and every Fisher value non-negative; ProtocolError naming the first tensor that is not.

    One float64 sum of squares over all deltas at once: squares of float32 values cannot overflow
    float64, so the norm is finite exactly when every delta value is; the other tensors
    (Fisher summaries, statistics) are checked together the same way."""
    deltas = [v.reshape(-1) for name, v in tensors.items() if is_delta(name)]
    fisher = [v.reshape(-1) for name, v in tensors.items() if name.startswith(FISHER_PREFIX)]
    others = [v.reshape(-1) for name, v in tensors.items() if not is_delta(name)]
    flat = np.concatenate(deltas) if deltas else np.zeros(0, dtype=np.float32)
    squares = float(np.square(flat, dtype=np.float64).sum())
    rest = np.concatenate(others) if others else np.zeros(0, dtype=np.float32)
    negative = bool(fisher) and bool((np.concatenate(fisher) < 0).any())
    if math.isfinite(squares) and np.isfinite(rest).all() and not negative:
        return math.sqrt(squares)
    raise ProtocolError(next(f for f in (_value_fault(n, v) for n, v in tensors.items()) if f))


def _value_fault(name: str, value: np.ndarray) -> str | None:
    """Why one decoded tensor is refused (None: it is not)."""
    if not np.all(np.isfinite(value)):
        return f"{name}: non-finite values"
    if name.startswith(FISHER_PREFIX) and np.any(value < 0):
        return f"{name}: Fisher values must be non-negative"
    return None


def encode_model(
    header: ModelHeader, tensors: Mapping[str, np.ndarray], zstd_level: int | None = None
) -> bytes:
    """A model version: full float32 weights, optionally zstd-compressed."""
    body = save_tensors(
        {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in tensors.items()}
    )
    if zstd_level is not None:
        body = zstandard.ZstdCompressor(level=zstd_level).compress(body)
    return frame(MODEL_MAGIC, header, body)


def decode_model(payload: bytes, *, max_bytes: int) -> tuple[ModelHeader, Arrays]:
    """Validate and decode a model version (shapes are the caller's to check)."""
    text, body = unframe(payload, MODEL_MAGIC, max_bytes)
    header = parse_header(text, ModelHeader)
    if body[:4] == ZSTD_MAGIC:
        body = _decompress(body, max_bytes)
    tensors = load_body(body)
    for name, value in tensors.items():
        if value.dtype != np.float32 or not np.all(np.isfinite(value)):
            raise ProtocolError(f"model tensor {name}: must be finite float32")
    return header, tensors
