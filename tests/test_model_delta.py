"""The downlink delta: it reproduces the published version bit for bit, and refuses anything
that is not exactly what the aggregator made (wrong base, tampered parts, a zstd bomb)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zstandard

from fedfmx.config import FleetConfig, load_fleet
from fedfmx.errors import ProtocolError
from fedfmx.federation.rounds import GlobalModel, RoundKeeper
from fedfmx.federation.simulation import initial_model
from fedfmx.wire.codec import MAX_MODEL_BYTES, encode_model, encode_update
from fedfmx.wire.messages import DeltaHeader, ModelHeader, UpdateHeader
from fedfmx.wire.model_delta import (
    DELTA_MAGIC,
    decode_delta,
    encode_delta,
    payload_digest,
    publishable,
)

FLEETS = Path(__file__).parent.parent / "device_configs" / "fleets"
RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def fleet() -> FleetConfig:
    return load_fleet(FLEETS / "ci-digits.yaml")


def _moved(weights: dict[str, np.ndarray], new_rows: int = 2) -> dict[str, np.ndarray]:
    """A merged version: every tensor moved a little, the head grown by `new_rows` rows."""
    merged = {
        name: (value + 0.01 * RNG.standard_normal(value.shape)).astype(np.float32)
        for name, value in weights.items()
    }
    head = merged["head.weight"]
    grown = RNG.standard_normal((new_rows, head.shape[1])).astype(np.float32)
    merged["head.weight"] = np.concatenate([head, grown])
    merged["extra.bias"] = RNG.standard_normal(5).astype(np.float32)  # no base at all
    return merged


def _header(
    fleet: FleetConfig, base_payload: bytes, tensors: list, classes: list[str]
) -> DeltaHeader:
    return DeltaHeader(
        fleet=fleet.name,
        version=1,
        base_version=0,
        base_sha256=payload_digest(base_payload),
        class_names=classes,
        tensors=tensors,
    )


def _base(fleet: FleetConfig) -> GlobalModel:
    model = initial_model(fleet)
    weights = dict(model.weights)
    weights["head.weight"] = RNG.standard_normal((2, weights["head.weight"].shape[1])).astype(
        np.float32
    )
    return GlobalModel(0, weights, ["0", "1"], model.expert_usage)


@pytest.mark.parametrize("lossless", [False, True])
def test_delta_reproduces_the_published_version_bit_for_bit(
    fleet: FleetConfig, lossless: bool
) -> None:
    base = _base(fleet)
    merged = _moved(base.weights)
    published = publishable(base.weights, merged, lossless)
    kinds = {t.name: t.kind for t in published.tensors}
    assert kinds["extra.bias"] == "full" and kinds["head.weight"] == ("xor" if lossless else "int8")
    base_payload = encode_model(
        ModelHeader(fleet=fleet.name, version=0, class_names=[]), base.weights
    )
    classes = ["0", "1", "2", "3"]
    delta = encode_delta(
        _header(fleet, base_payload, published.tensors, classes), published.parts, 3
    )
    header, decoded = decode_delta(delta.payload, base.weights, decoded_bytes=delta.decoded_bytes)
    assert header.class_names == classes and decoded.keys() == merged.keys()
    for name, value in decoded.items():
        assert value.dtype == np.float32 and value.shape == merged[name].shape
        assert value.tobytes() == published.weights[name].tobytes(), name
        if lossless:
            assert value.tobytes() == merged[name].tobytes(), name
    full = ModelHeader(fleet=fleet.name, version=1, class_names=classes)
    assert encode_model(full, decoded) == encode_model(full, published.weights)
    if not lossless:  # int8 rounding: within half a step (max |d| / 127) of the merge
        for name, value in base.weights.items():
            if name != "head.weight":
                step = float(np.abs(merged[name] - value).max()) / 127
                assert np.abs(decoded[name] - merged[name]).max() <= step / 2 + 1e-6, name
        assert len(delta.payload) < len(encode_model(full, published.weights)) / 2


def test_a_delta_refuses_a_held_version_that_is_not_its_base(fleet: FleetConfig) -> None:
    base = _base(fleet)
    published = publishable(base.weights, _moved(base.weights), lossless=False)
    delta = encode_delta(_header(fleet, b"base", published.tensors, ["0"]), published.parts, 3)
    other = dict(base.weights)
    other["head.weight"] = np.zeros((9, other["head.weight"].shape[1]), np.float32)
    with pytest.raises(ProtocolError, match="no base for it"):
        decode_delta(delta.payload, other, decoded_bytes=delta.decoded_bytes)
    missing = {k: v for k, v in base.weights.items() if k != "head.weight"}
    with pytest.raises(ProtocolError, match="no base for it"):
        decode_delta(delta.payload, missing, decoded_bytes=delta.decoded_bytes)


def test_a_zstd_bomb_or_an_oversize_claim_is_refused_before_it_is_decoded(
    fleet: FleetConfig,
) -> None:
    base = _base(fleet)
    header = _header(fleet, b"base", [], ["0"])
    bomb = DELTA_MAGIC + _framed(
        header, zstandard.ZstdCompressor(level=19).compress(bytes(1 << 26))
    )
    assert len(bomb) < 10_000  # 64 MiB of zeros in a few KB
    with pytest.raises(ProtocolError, match="decompresses beyond 4096 bytes"):
        decode_delta(bomb, base.weights, decoded_bytes=4096)
    with pytest.raises(ProtocolError, match="over"):
        decode_delta(bomb, base.weights, decoded_bytes=MAX_MODEL_BYTES + 1)


def _framed(header: DeltaHeader, body: bytes) -> bytes:
    text = header.model_dump_json().encode()
    return len(text).to_bytes(4, "big") + text + body


def test_tampered_or_mislabelled_parts_are_refused(fleet: FleetConfig) -> None:
    base = _base(fleet)
    published = publishable(base.weights, _moved(base.weights), lossless=False)
    header = _header(fleet, b"base", published.tensors, ["0"])
    cases = {
        "parts differ": {**published.parts, "junk": np.zeros(3, np.float32)},
        "expected int8": {
            **published.parts,
            "head.weight.q": published.parts["head.weight.q"].astype(np.int16),
        },
        "scales must be finite": {
            **published.parts,
            "head.weight.scale": np.full_like(published.parts["head.weight.scale"], np.nan),
        },
    }
    for reason, parts in cases.items():
        delta = encode_delta(header, parts, 3)
        with pytest.raises(ProtocolError, match=reason):
            decode_delta(delta.payload, base.weights, decoded_bytes=delta.decoded_bytes)
    with pytest.raises(ProtocolError, match="bad magic"):
        decode_delta(b"FMXM" + bytes(20), base.weights, decoded_bytes=100)
    good = encode_delta(header, published.parts, 3).payload
    with pytest.raises(ProtocolError):
        decode_delta(good[:-50], base.weights, decoded_bytes=10**6)


def _update(fleet: FleetConfig, model: GlobalModel, device: str) -> bytes:
    """A plausible update: the head rows and router of `model` moved a little."""
    router = {n: v for n, v in model.weights.items() if n.startswith("router.")}
    tensors = {n: 0.01 * RNG.standard_normal(v.shape).astype(np.float32) for n, v in router.items()}
    tensors["head.rows"] = RNG.standard_normal((2, model.weights["head.weight"].shape[1])).astype(
        np.float32
    )
    header = UpdateHeader(
        fleet=fleet.name, device_id=device, round=0, base_version=model.version, num_samples=10,
        expert_ids=[], head_classes=["a", "b"], class_counts=[5, 5],
        expert_usage=[0.0] * len(model.expert_usage), train_loss=1.0,
    )  # fmt: skip
    return encode_update(header, tensors).payload


def test_the_keeper_publishes_base_plus_decoded_delta_and_only_when_it_merged(
    fleet: FleetConfig,
) -> None:
    first = initial_model(fleet)
    keeper = RoundKeeper(fleet, first)
    assert keeper.delta_payload() is None  # version 0 has no base
    base_payload = keeper.device_payload()
    keeper.open_round(0, ["device-000"], 0.0)
    keeper.accept(_update(fleet, first, "device-000"))
    model = keeper.close_round()
    delta = keeper.delta_payload()
    assert delta is not None and delta.base_version == 0
    header, decoded = decode_delta(delta.payload, first.weights, decoded_bytes=delta.decoded_bytes)
    assert header.base_sha256 == payload_digest(base_payload)
    full = keeper.device_payload()
    assert encode_model(keeper.model_header(), decoded) == full  # the full version's exact bytes
    assert model.class_names == header.class_names == ["a", "b"]
    # A keeper restored on that version (an aggregator restart) has no delta to offer.
    assert RoundKeeper(fleet, model).delta_payload() is None
    off = fleet.model_copy(update={"downlink": fleet.downlink.model_copy(update={"delta": False})})
    plain = RoundKeeper(off, first)
    plain.open_round(0, ["device-000"], 0.0)
    plain.accept(_update(off, first, "device-000"))
    plain.close_round()
    assert plain.delta_payload() is None
