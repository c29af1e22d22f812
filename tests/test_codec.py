"""The update codec: exact where lossless, bounded where lossy, error feedback, strict decoding."""

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from fedfmx.errors import ProtocolError
from fedfmx.wire.codec import (
    decode_model,
    decode_update,
    dequantize_rows,
    encode_model,
    encode_update,
    quantize_rows,
)
from fedfmx.wire.messages import CodecSettings, ModelHeader, UpdateHeader

SHAPES = {"experts.0.w": (3, 4), "router.bias": (2,), "fisher.experts.0.w": (3, 1)}
LIMIT = 1 << 20
PLAIN = CodecSettings()


def _header(codec: CodecSettings = PLAIN, **changes: object) -> UpdateHeader:
    fields: dict[str, object] = dict(
        fleet="f",
        device_id="d",
        round=1,
        base_version=1,
        num_samples=5,
        expert_ids=[0],
        head_classes=[],
        class_counts=[],
        expert_usage=[1.0],
        train_loss=0.1,
        codec=codec,
    )
    fields.update(changes)
    return UpdateHeader.model_validate(fields)


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "experts.0.w": rng.normal(size=(3, 4)).astype(np.float32),
        "router.bias": rng.normal(size=2).astype(np.float32),
        "fisher.experts.0.w": rng.random((3, 1)).astype(np.float32),
    }


def _decode(payload: bytes, bound: float = 100.0) -> tuple[UpdateHeader, dict[str, np.ndarray]]:
    return decode_update(payload, lambda _: SHAPES, max_bytes=LIMIT, norm_bound=bound)


@pytest.mark.parametrize("zstd", [None, 3])
def test_plain_round_trip_is_exact(zstd: int | None) -> None:
    tensors = _tensors()
    header, decoded = _decode(
        encode_update(_header(CodecSettings(zstd_level=zstd)), tensors).payload
    )
    assert header.codec.zstd_level == zstd
    for name, value in tensors.items():
        assert np.array_equal(decoded[name], value)


def test_int8_hand_example() -> None:
    q, scale = quantize_rows(np.array([[1.27, -0.635, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32))
    assert np.allclose(scale, [0.01, 0.0])
    assert q.tolist() == [[127, -64, 0], [0, 0, 0]]  # -0.635/0.01 = -63.5 rounds to even: -64
    assert np.allclose(dequantize_rows(q, scale), [[1.27, -0.64, 0.0], [0.0, 0.0, 0.0]])


def test_int8_error_is_at_most_half_a_step_per_row() -> None:
    tensors = _tensors(3)
    _, decoded = _decode(encode_update(_header(CodecSettings(quantize="int8")), tensors).payload)
    for name, value in tensors.items():
        rows = value.reshape(value.shape[0], -1) if value.ndim > 1 else value.reshape(1, -1)
        step = np.abs(rows).max(axis=1, keepdims=True) / 127
        error = np.abs(decoded[name].reshape(rows.shape) - rows)
        assert np.all(error <= step / 2 + 1e-7), name


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_topk_error_feedback_sends_everything_eventually(quantize: str) -> None:
    codec = CodecSettings(quantize=quantize, topk_fraction=0.25)  # type: ignore[arg-type]
    rng = np.random.default_rng(1)
    residual: dict[str, np.ndarray] = {}
    sent_sum = {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()}
    true_sum = {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()}
    for _ in range(50):
        tensors = {
            name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()
        }
        tensors["fisher.experts.0.w"] = np.abs(tensors["fisher.experts.0.w"])
        encoded = encode_update(_header(codec), tensors, residual)
        residual = encoded.residual
        _, decoded = _decode(encoded.payload)
        for name in SHAPES:
            if not name.startswith("fisher."):
                sent_sum[name] += decoded[name]
                true_sum[name] += tensors[name]
    for name in ("experts.0.w", "router.bias"):
        # what was not sent yet is exactly the residual, and the residual stays bounded
        assert np.allclose(true_sum[name] - sent_sum[name], residual[name], atol=1e-4)
        assert np.abs(residual[name]).max() < 10
        assert np.count_nonzero(decoded[name]) <= int(np.ceil(0.25 * np.prod(SHAPES[name])))
    assert "fisher.experts.0.w" not in residual  # the Fisher is always sent whole


def _reframe(payload: bytes, header_text: bytes) -> bytes:
    (length,) = struct.unpack(">I", payload[4:8])
    return payload[:4] + struct.pack(">I", len(header_text)) + header_text + payload[8 + length :]


def _valid(codec: CodecSettings = PLAIN) -> bytes:
    return encode_update(_header(codec), _tensors()).payload


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda p: p + b"x" * LIMIT, "exceeds"),
        (lambda p: b"NOPE" + p[4:], "bad magic"),
        (lambda p: p[:4] + struct.pack(">I", 10**6) + p[8:], "runs past"),
        (lambda p: _reframe(p, b"{not json"), "invalid header"),
        (lambda p: _reframe(p, _header(expert_ids=[0, 0]).model_dump_json().encode()), "repeat"),
        (
            lambda p: _reframe(p, _header(head_classes=["a"]).model_dump_json().encode()),
            "class_counts",
        ),
        (
            lambda p: (
                _reframe(p, _header(extra_field=1).model_dump_json().encode()) if False else p[:-20]
            ),
            "safetensors",
        ),
    ],
)
def test_rejects_malformed_frames(mangle: object, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        _decode(mangle(_valid()))  # type: ignore[operator]


def test_rejects_unknown_header_fields() -> None:
    text = _header().model_dump_json().encode().replace(b'"fleet"', b'"evil":1,"fleet"')
    with pytest.raises(ProtocolError, match="evil"):
        _decode(_reframe(_valid(), text))


def test_rejects_wrong_names_shapes_and_dtypes() -> None:
    tensors = _tensors()
    with pytest.raises(ProtocolError, match="missing"):
        _decode(
            encode_update(
                _header(), {k: v for k, v in tensors.items() if k != "router.bias"}
            ).payload
        )
    with pytest.raises(ProtocolError, match="extra"):
        _decode(encode_update(_header(), tensors | {"backbone.x": np.zeros(1, np.float32)}).payload)
    with pytest.raises(ProtocolError, match="expected float32"):
        _decode(
            encode_update(_header(), tensors | {"router.bias": np.zeros(3, np.float32)}).payload
        )


def test_rejects_non_finite_negative_fisher_and_large_norm() -> None:
    tensors = _tensors()
    with pytest.raises(ProtocolError, match="non-finite"):
        _decode(
            encode_update(
                _header(), tensors | {"router.bias": np.array([np.nan, 0], np.float32)}
            ).payload
        )
    with pytest.raises(ProtocolError, match="non-negative"):
        _decode(
            encode_update(
                _header(), tensors | {"fisher.experts.0.w": -np.ones((3, 1), np.float32)}
            ).payload
        )
    with pytest.raises(ProtocolError, match="norm"):
        _decode(encode_update(_header(), tensors).payload, bound=0.5)


def test_rejects_a_zstd_bomb() -> None:
    huge = {
        "experts.0.w": np.zeros((3, 4), np.float32),
        "router.bias": np.zeros(2, np.float32),
        "fisher.experts.0.w": np.zeros((3, 1), np.float32),
        "pad": np.zeros(LIMIT * 3, np.float32),
    }
    payload = encode_update(_header(CodecSettings(zstd_level=3)), huge).payload
    assert len(payload) < LIMIT
    with pytest.raises(ProtocolError, match="decompresses beyond"):
        _decode(payload)


def test_rejects_out_of_range_topk_indices() -> None:
    header = _header(CodecSettings(topk_fraction=0.5))
    good = encode_update(header, _tensors()).payload
    (length,) = struct.unpack(">I", good[4:8])
    stored = dict(load_tensors(good[8 + length :]))
    stored["router.bias.idx"] = np.array([7], dtype=np.int32)  # router.bias has 2 entries
    with pytest.raises(ProtocolError, match="indices"):
        _decode(good[: 8 + length] + save_tensors(stored))
    stored["router.bias.idx"] = np.array([1], dtype=np.int32)
    assert _decode(good[: 8 + length] + save_tensors(stored))[1]["router.bias"][0] == 0.0


def test_model_round_trip_and_rejection() -> None:
    header = ModelHeader(fleet="f", version=3, class_names=["a", "b"])
    tensors = {"head.weight": np.ones((2, 4), np.float32)}
    for level in (None, 5):
        decoded_header, decoded = decode_model(
            encode_model(header, tensors, level), max_bytes=LIMIT
        )
        assert decoded_header == header and np.array_equal(
            decoded["head.weight"], tensors["head.weight"]
        )
    bad = encode_model(header, {"head.weight": np.full((2, 4), np.inf, np.float32)})
    with pytest.raises(ProtocolError, match="finite"):
        decode_model(bad, max_bytes=LIMIT)


VALID = [
    _valid(CodecSettings()),
    _valid(CodecSettings(quantize="int8", topk_fraction=0.5, zstd_level=1)),
]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(VALID),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), max_size=6),
    cut=st.integers(0, 10**6),
    noise=st.binary(max_size=64),
)
def test_fuzzed_payloads_never_crash_and_never_pass_malformed(
    base: bytes, flips: list[tuple[int, int]], cut: int, noise: bytes
) -> None:
    data = bytearray(base)
    for position, bit in flips:
        data[position % len(data)] ^= 1 << bit
    mutated = bytes(data[: max(1, cut % (len(data) + 1))]) + noise
    try:
        _, tensors = _decode(mutated)
    except ProtocolError:
        return
    assert set(tensors) == set(SHAPES)
    squares = 0.0
    for name, value in tensors.items():
        assert value.shape == SHAPES[name] and value.dtype == np.float32
        assert np.all(np.isfinite(value))
        if name.startswith("fisher."):
            assert np.all(value >= 0)
        else:
            squares += float(np.square(value).sum())
    assert squares**0.5 <= 100.0


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_are_rejected(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        _decode(data)


def test_a_residual_of_another_shape_is_dropped_not_broadcast() -> None:
    header = _header(CodecSettings(topk_fraction=0.5))
    stale = {"router.bias": np.ones(5, np.float32), "experts.0.w": np.zeros((3, 4), np.float32)}
    encoded = encode_update(header, _tensors(), stale)
    assert encoded.residual["router.bias"].shape == (2,)
    _decode(encoded.payload)
