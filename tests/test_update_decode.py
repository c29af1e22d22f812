"""The aggregator's fast update decoding (all int8 tensors at once, one check over all values,
zstd frames of declared size) gives the same tensors and the same refusals as tensor by tensor."""

import struct

import numpy as np
import pytest
import zstandard
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from fedfmx.errors import ProtocolError
from fedfmx.wire.codec import decode_update, decompress_bounded, dequantize_rows, encode_update
from fedfmx.wire.messages import CodecSettings, UpdateHeader
from tests.test_codec import _header as codec_header

INT8 = CodecSettings(quantize="int8", zstd_level=3)
SHAPES = {
    "backbone.conv.weight": (4, 2, 3, 3),
    "backbone.conv.bias": (4,),
    "experts.0.fc1.weight": (5, 6),
    "fisher.experts.0.fc1.weight": (5, 1),
    "experts.0.fc1.bias": (5,),
    "fisher.experts.0.fc1.bias": (5,),
    "head.rows": (0, 6),
}
LIMIT = 1 << 20


def _header() -> UpdateHeader:
    return codec_header(INT8, round=0, base_version=0)


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        name: (np.abs if name.startswith("fisher.") else np.asarray)(
            rng.normal(size=shape).astype(np.float32)
        )
        for name, shape in SHAPES.items()
    }


def _decode(payload: bytes) -> dict[str, np.ndarray]:
    return decode_update(payload, lambda _: SHAPES, max_bytes=LIMIT, norm_bound=1e6)[1]


def _with_stored(payload: bytes, **replaced: np.ndarray) -> bytes:
    """The payload with some stored parts replaced (uncompressed body, same header)."""
    (length,) = struct.unpack(">I", payload[4:8])
    body = zstandard.ZstdDecompressor().decompress(payload[8 + length :])
    stored = dict(load_tensors(body))
    stored.update({name.replace("__", "."): value for name, value in replaced.items()})
    return payload[: 8 + length] + zstandard.ZstdCompressor().compress(save_tensors(stored))


def test_int8_tensors_decode_bit_for_bit_as_row_by_row() -> None:
    payload = encode_update(_header(), _tensors()).payload
    (length,) = struct.unpack(">I", payload[4:8])
    stored = dict(load_tensors(zstandard.ZstdDecompressor().decompress(payload[8 + length :])))
    decoded = _decode(payload)
    assert list(decoded) == list(SHAPES)
    for name, shape in SHAPES.items():
        expected = dequantize_rows(stored[f"{name}.q"], stored[f"{name}.scale"])
        assert decoded[name].shape == shape and decoded[name].dtype == np.float32
        assert np.array_equal(decoded[name], expected)


def test_a_bad_scale_or_value_is_refused_naming_its_tensor() -> None:
    payload = encode_update(_header(), _tensors()).payload
    bad_scale = np.array([1.0, np.nan, 1.0, 1.0, 1.0], np.float32)
    with pytest.raises(ProtocolError, match=r"^experts\.0\.fc1\.weight: scales must be finite"):
        _decode(_with_stored(payload, experts__0__fc1__weight__scale=bad_scale))
    with pytest.raises(ProtocolError, match=r"^backbone\.conv\.bias: scales must be finite"):
        _decode(_with_stored(payload, backbone__conv__bias__scale=-np.ones(1, np.float32)))
    # finite scales whose product with q overflows float32: caught as a non-finite value
    huge = np.full(1, 3e38, np.float32)
    with pytest.raises(ProtocolError, match=r"^experts\.0\.fc1\.bias: non-finite values"):
        _decode(_with_stored(payload, experts__0__fc1__bias__scale=huge))
    with pytest.raises(ProtocolError, match=r"^fisher\.experts\.0\.fc1\.bias: non-finite"):
        _decode(
            _with_stored(payload, fisher__experts__0__fc1__bias__scale=np.full(1, 3e38, np.float32))
        )


def test_negative_fisher_values_are_refused_naming_the_tensor() -> None:
    tensors = _tensors() | {"fisher.experts.0.fc1.bias": -np.ones(5, np.float32)}
    with pytest.raises(ProtocolError, match=r"^fisher\.experts\.0\.fc1\.bias: Fisher values"):
        _decode(encode_update(_header(), tensors).payload)


def test_a_zstd_frame_is_held_to_its_declared_size_and_the_limit() -> None:
    data = bytes(range(256)) * 64
    frame = zstandard.ZstdCompressor().compress(data)
    assert decompress_bounded(frame, len(data)) == data
    with pytest.raises(ProtocolError, match="decompresses beyond"):
        decompress_bounded(frame, len(data) - 1)  # refused from its header, nothing allocated
    lying = bytearray(frame)
    assert lying[4] & 0xC0 == 0x40  # a 2-byte content size field (size - 256) follows
    lying[5:7] = b"\0\0"  # now declares 256 bytes
    with pytest.raises(ProtocolError, match="corrupt"):
        decompress_bounded(bytes(lying), len(data))
    undeclared = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    assert decompress_bounded(undeclared, len(data)) == data  # streamed
    with pytest.raises(ProtocolError, match="decompresses beyond"):
        decompress_bounded(undeclared, len(data) - 1)
    with pytest.raises(ProtocolError, match="corrupt"):
        decompress_bounded(b"\x28\xb5\x2f\xfd\xff", len(data))
