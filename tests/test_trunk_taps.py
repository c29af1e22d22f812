"""Closed-form FedFMX's trunk taps: the layout, the pooling against a hand computation, the tap
experts' projection, the cache, and a federated head on tap vectors that equals the pooled one."""

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from lite0_helpers import needs_weights
from pydantic import ValidationError

from fedfmx.closed_form.feature_maps import TapFeatures
from fedfmx.closed_form.head import FeatureStatistics, solve_head
from fedfmx.closed_form.state import LAMBDA
from fedfmx.config import FleetConfig, ModelConfig, load_fleet
from fedfmx.data.datasets import ImageDataset
from fedfmx.federation.simulation import make_plan, run_inproc
from fedfmx.learner.model import build_model
from fedfmx.trunk.feature_cache import FeatureCache, trunk_feature_fn
from fedfmx.trunk.taps import TAP_WIDTH, TAPS, tap_slice, tap_vector, taps_id

CI_FLEET = Path(__file__).parent.parent / "device_configs" / "fleets" / "ci-digits.yaml"


def fake_outputs(batch: int = 3, side: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random maps for every source `TAPS` reads, `side × side` (head: half that)."""
    generator = torch.Generator().manual_seed(seed)
    outputs = {}
    for tap in TAPS:
        size = side // 2 if tap.source == "head" else side
        outputs[tap.source] = torch.rand(batch, tap.channels, size, size, generator=generator)
    return outputs


def test_the_tap_vector_starts_with_the_pool_and_its_slices_tile_it() -> None:
    assert TAPS[0].name == "pool" and tap_slice("pool") == slice(0, 1280)
    covered = [tap_slice(tap.name) for tap in TAPS]
    assert covered[0].start == 0 and covered[-1].stop == TAP_WIDTH
    for before, after in itertools.pairwise(covered):
        assert before.stop == after.start
    assert taps_id("lite0-64px") != "lite0-64px"
    with pytest.raises(KeyError, match="unknown trunk tap"):
        tap_slice("block99")


def test_taps_equal_the_mean_of_each_grid_cell() -> None:
    outputs = fake_outputs()
    vector = tap_vector(outputs)
    assert vector.shape == (3, TAP_WIDTH)
    for tap in TAPS:
        maps = outputs[tap.source].numpy()
        b, c, h, w = maps.shape
        g = tap.grid
        # by hand: split each map into g×g cells of (h/g)×(w/g) and average each cell
        cells = maps.reshape(b, c, g, h // g, g, w // g).mean(axis=(3, 5)).reshape(b, -1)
        np.testing.assert_allclose(vector[:, tap_slice(tap.name)].numpy(), cells, rtol=1e-6)


def test_a_tap_expert_is_seeded_scale_free_and_reads_its_own_tap() -> None:
    taps = tap_vector(fake_outputs())
    expert = TapFeatures("block7_4x4", 64, seed=5)
    phi = expert(taps)
    assert phi.shape == (3, 64) and bool((phi >= 0).all())
    torch.testing.assert_close(TapFeatures("block7_4x4", 64, seed=5)(taps), phi)
    assert not torch.allclose(TapFeatures("block7_4x4", 64, seed=6)(taps), phi)
    # per-sample unit norm: scaling a row does not change its features
    scaled = taps * torch.tensor([[2.0], [0.5], [7.0]])
    torch.testing.assert_close(expert(scaled), phi, rtol=1e-5, atol=1e-6)
    # ... and only the expert's own tap matters
    other = taps.clone()
    other[:, tap_slice("head2x2")] = 0
    torch.testing.assert_close(expert(other), phi)
    # by hand: ReLU(R·u/‖u‖) with R drawn as RandomReluFeatures draws it (/√n)
    u = taps[:, tap_slice("block7_4x4")]
    r = torch.randn(u.shape[1], 64, generator=torch.Generator().manual_seed(5)) / u.shape[1] ** 0.5
    reference = torch.relu((u * u.shape[1] ** 0.5 / u.norm(dim=1, keepdim=True)) @ r)
    torch.testing.assert_close(phi, reference)


def test_unknown_or_repeated_taps_are_refused() -> None:
    with pytest.raises(ValidationError, match="unknown trunk taps"):
        ModelConfig(expert_taps=["block99_2x2"])
    with pytest.raises(ValidationError, match="repeats"):
        ModelConfig(expert_taps=["head2x2", "head2x2"])


class StubTrunk:
    """A backbone stand-in for the cache: pooled features or tap vectors of a fixed map."""

    def trunk_taps(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :1].repeat(1, TAP_WIDTH)

    def trunk_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk_taps(x)[:, :1280]


def test_the_cache_keeps_tap_vectors_and_rejects_a_corrupt_one(tmp_path: Path) -> None:
    images = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    compute = trunk_feature_fn(StubTrunk(), taps=True)  # type: ignore[arg-type]
    cache = FeatureCache(tmp_path, taps_id("stub"), max_bytes=2**24)
    first = cache.features(images, compute)
    assert first.shape == (4, TAP_WIDTH) and cache.stats.misses == 4
    entry = next(tmp_path.glob("*.safetensors"))
    raw = bytearray(entry.read_bytes())
    raw[-8] ^= 0xFF  # flip a byte of the values: the CRC must catch it
    entry.write_bytes(bytes(raw))
    again = FeatureCache(tmp_path, taps_id("stub"), max_bytes=2**24)
    np.testing.assert_array_equal(again.features(images, compute), first)
    assert again.stats.corrupt == 1 and again.stats.hits == 3
    pooled = FeatureCache(tmp_path, "stub", max_bytes=2**24)  # another id: never a tap hit
    assert pooled.features(images, trunk_feature_fn(StubTrunk())).shape == (4, 1280)  # type: ignore[arg-type]
    assert pooled.stats.hits == 0


@needs_weights
def test_the_trunk_pass_gives_the_pool_and_the_taps_at_once() -> None:
    from fedfmx.trunk.pretrained import PretrainedBackbone, imagenet_input
    from fedfmx.trunk.taps import trunk_outputs

    backbone = PretrainedBackbone(feature_dim=1)
    images = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        taps = backbone.trunk_taps(images)
        outputs = trunk_outputs(backbone.trunk, imagenet_input(images))
        reference = backbone.trunk.extract_features(imagenet_input(images))
    assert taps.shape == (2, TAP_WIDTH)
    torch.testing.assert_close(outputs["head"], reference)
    torch.testing.assert_close(taps[:, :1280], backbone.trunk_features(images))
    assert outputs["block10"].shape == (2, 112, 4, 4)  # 64 px input: stride 16


@needs_weights
def test_closed_form_fedfmx_on_the_trunk_reads_images_or_cached_taps_alike() -> None:
    config = FleetConfig.model_validate(
        {
            "method": "fedfmx_cf",
            "model": {
                "backbone": "efficientnet_lite0",
                "tap_features": 32,
                "trunk_shared_features": 48,
            },
        }
    )
    network = build_model(config.network, config.routing, 2, seed=1)
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        taps = network.backbone.trunk_taps(images)  # type: ignore[operator]
        phi = network.closed_form_features(images)
        torch.testing.assert_close(network.closed_form_features(taps), phi)
        assert phi.shape == (3, 48 + 32 * len(config.model.expert_taps))
        assert network.head.weight.shape == (2, phi.shape[1])
        with pytest.raises(ValueError, match="tap vectors"):
            network.closed_form_features(taps[:, :1280])
    same = build_model(config.network, config.routing, 2, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(same.closed_form_features(taps), phi)


@needs_weights
def test_federated_head_on_tap_vectors_equals_the_pooled_solve() -> None:
    """Rows given as tap vectors (as a cache serves them): the merged head is the exact one."""
    base = load_fleet(CI_FLEET).model_dump()
    base |= {"method": "fedfmx_cf"}
    base["model"] |= {
        "backbone": "efficientnet_lite0",
        "tap_features": 24,
        "trunk_shared_features": 24,
    }
    config = FleetConfig.model_validate(base)
    rng = np.random.default_rng(0)
    classes = 10  # the digits fleet: 5 tasks of 2
    labels = np.repeat(np.arange(classes), 12)
    centres = rng.random((classes, TAP_WIDTH), dtype=np.float32)
    rows = (centres[labels] + 0.3 * rng.random((len(labels), TAP_WIDTH))).astype(np.float32)
    dataset = ImageDataset(
        name="taps",
        class_names=tuple(str(c) for c in range(classes)),
        train_x=rows,
        train_y=labels,
        test_x=rows[::3],
        test_y=labels[::3],
    )
    result = run_inproc(config, dataset)
    final = result.final_model
    assert final is not None
    plan = make_plan(config, dataset)
    seen = np.unique(
        np.concatenate(
            [
                plan.stream(k, config.seed).available(r)
                for k in range(config.protocol.num_clients)
                for r in range(plan.num_rounds)
            ]
        )
    )
    network = build_model(config.network, config.routing, 0, config.seed)
    with torch.no_grad():
        phi = network.closed_form_features(torch.from_numpy(dataset.train_x[seen])).double()
    pooled = FeatureStatistics.of(phi.numpy(), np.array(dataset.class_names)[labels[seen]])
    exact = solve_head(pooled, final.class_names, float(final.weights[LAMBDA][0]))
    assert np.max(np.abs(final.weights["head.weight"] - exact)) < 1e-4 * np.abs(exact).max()
