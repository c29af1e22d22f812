"""Fleet configuration: pydantic models are the single source of truth, YAML is parsed once here.

The defaults *are* the embedded demo fleet (`device_configs/fleets/demo.yaml` mirrors them), so
`fedfmx-edge simulate` with no file runs the README's main job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedfmx.errors import ConfigError
from fedfmx.wire.messages import CodecSettings

MethodName = Literal[
    "fedfmx",
    "fedavg",
    "fedprox",
    "fedewc",
    "fedlwf",
    "fedavg_replay",
    "dense_moe",
    "no_fres",
    "fixed_topk",
    "no_rar",
    "joint",
    "ridge",
    "fedavg_replay_wa",
    "fedfmx_cf",
    "fedfmx_cf_no_experts",
]
"""FedFMX, the baselines, FedFMX's ablations, and the centralised upper bound."""

CLOSED_FORM_METHODS = ("ridge", "fedfmx_cf", "fedfmx_cf_no_experts")
"""Methods whose head is solved in closed form from feature statistics
(`fedfmx.closed_form.head`)."""


class Section(BaseModel):
    """Strict config section: unknown keys are errors, not silently ignored typos."""

    model_config = ConfigDict(extra="forbid")


class ImageInputConfig(Section):
    """The fleet's input spec: what every image becomes before the model sees it.

    One preprocessing path (`fedfmx.data.preprocessing`) reads it for training, Fisher, export,
    parity and serving alike: decode, convert to `channels`, fit to `height` x `width`
    (`stretch` resizes, `center_crop` keeps the aspect ratio and crops the middle), scale to
    [0, 1]. Unset, the fleet's data set decides (its images' shape, stretched).
    """

    channels: Literal[1, 3] = 1
    height: int = Field(gt=0, le=1024)
    width: int = Field(gt=0, le=1024)
    fit: Literal["stretch", "center_crop"] = "stretch"


class DataConfig(Section):
    dataset: Literal[
        "fashion_mnist", "digits", "mnist5k", "omniglot_small", "coil20", "yaleb", "orl"
    ] = "fashion_mnist"
    """`fedfmx.data.datasets.DATASET_NAMES`; the last four are read from `../shared/datasets`."""
    path: Path | None = None
    """Directory of the data files; None uses the dataset's standard location."""
    train_per_class: int | None = Field(default=None, gt=0)
    """Cap on training samples per class (small slices for fast runs); None keeps all."""
    test_per_class: int | None = Field(default=None, gt=0)
    validation_fraction: float | None = Field(default=None, gt=0, lt=1)
    """For tuning: hold out this fraction of each class's training images and evaluate on them
    instead of the test set, which is then never read."""
    simulated_source: Literal["fleet_partition", "folder"] = "fleet_partition"
    """How `fedfmx-edge simulate` over MQTT hands devices their data: the plan's partition
    in memory, or one watched folder per device that a feeder fills with the same images,
    round by round (each device meets new classes at its own time)."""
    image: ImageInputConfig | None = None
    """The input spec devices with their own sources (folder, camera) preprocess to; None: the
    data set's own image shape."""


class ProtocolConfig(Section):
    """The class-incremental federated protocol: tasks, clients, non-IID split, misalignment."""

    num_tasks: int = Field(default=5, ge=1)
    num_clients: int = Field(default=5, ge=1)
    alpha: float = Field(default=0.5, gt=0)
    """Dirichlet concentration of the per-task client split (smaller = more non-IID)."""
    rounds_per_task: int = Field(default=3, ge=1)
    max_lag: int = Field(default=1, ge=0)
    """Each client meets a task's classes after a seeded lag drawn from [0, max_lag] rounds."""
    lags: list[int] | None = None
    """Explicit per-client lags; overrides `max_lag`."""

    @property
    def num_rounds(self) -> int:
        """Rounds in the whole schedule: every task's rounds."""
        return self.num_tasks * self.rounds_per_task

    @model_validator(mode="after")
    def _lags_fit_rounds(self) -> ProtocolConfig:
        largest = max(self.lags) if self.lags else self.max_lag
        if largest >= self.rounds_per_task:
            raise ValueError(
                f"lags must be < rounds_per_task ({self.rounds_per_task}) so every client "
                "meets every task"
            )
        if self.lags is not None and len(self.lags) != self.num_clients:
            raise ValueError(f"lags needs one entry per client ({self.num_clients})")
        return self


class ModelConfig(Section):
    backbone: Literal["cnn", "efficientnet_lite0"] = "cnn"
    """`cnn`: the small CNN trained from scratch. `efficientnet_lite0`: a frozen ImageNet trunk
    (from its PyPI package, no network) whose pooled features feed a trained projection."""
    trunk_input_size: int = Field(default=64, ge=32, le=320)
    """Side the pretrained trunk resizes its input to: 64 for 28-32 px data sets, 128-224 for
    camera crops (`data.image` with 3 channels); its features are cached under this size."""
    backbone_channels: list[int] = Field(default=[16, 32, 64], min_length=1)
    """Widths of the `cnn` backbone's conv blocks (unused by a pretrained backbone)."""
    feature_dim: int = Field(default=128, gt=0)
    num_experts: int = Field(default=8, ge=1)
    expert_hidden: int = Field(default=32, gt=0)
    head: Literal["sgd", "closed_form", "closed_form_experts"] = "sgd"
    """`sgd`: the head trains with the network. `closed_form`: a ridge head on fixed features
    (`fedfmx.closed_form.feature_maps`), solved by the aggregator from summed statistics.
    `closed_form_experts`: the same head on the shared features *and* the expert banks'
    (`expert_kernels`). The closed-form methods set it (`FleetConfig.network`)."""
    shared_features: int = Field(default=512, gt=0)
    """`closed_form_experts`: width of the shared random projection `φ_0` beside the experts."""
    expert_kernels: list[int] = Field(default=[3, 5, 7], min_length=1)
    """`closed_form_experts`: one expert bank per kernel size (`RandomConvFeatures`)."""
    expert_filters: int = Field(default=32, gt=0)
    expert_grid: int = Field(default=4, gt=0)
    """Each expert pools its maps to `grid × grid`: `filters·grid²` features per expert."""
    expert_taps: list[str] = Field(default=["block4_4x4", "block7_4x4", "block10_2x2"])
    """`closed_form_experts` on the `efficientnet_lite0` trunk: one expert per trunk tap
    (`fedfmx.trunk.taps.TAPS`), in place of `expert_kernels`; chosen on validation rows by
    `benchmarks/tap_selection.py` (docs/decisions.md). Raw-pixel models ignore it."""
    tap_features: int = Field(default=512, gt=0)
    """Width of each tap expert's random projection
    (`fedfmx.closed_form.feature_maps.TapFeatures`)."""
    trunk_shared_features: int = Field(default=512, gt=0)
    """`closed_form_experts` on the trunk: width of `φ_0`, the projection of the pooled tap."""
    random_features: int = Field(default=2048, ge=0)
    """Closed-form head: width `D` of the random ReLU projection `φ = ReLU(R·u)` of the input
    `u` (raw pixels, or the frozen trunk's pooled features); 0 uses `u` itself."""
    @field_validator("expert_taps")
    @classmethod
    def _known_taps(cls, taps: list[str]) -> list[str]:
        from fedfmx.trunk.taps import TAPS_BY_NAME

        unknown = [tap for tap in taps if tap not in TAPS_BY_NAME]
        if unknown:
            raise ValueError(f"unknown trunk taps {unknown}; known: {', '.join(TAPS_BY_NAME)}")
        if len(set(taps)) != len(taps):
            raise ValueError("expert_taps repeats a tap")
        return taps

    backbone_mode: Literal["freeze_after_first_task", "train"] = "train"
    """Keep training the backbone under the Fisher penalty, or freeze it once the first task is
    learnt (the experts then carry the increments; cheaper uplink, but a 2-class first task is a
    poor teacher: see docs/decisions.md)."""


class FedFMXConfig(Section):
    """Hyper-parameters of FRES, AES, RAR and the Fisher penalty (DESIGN §4)."""

    fres_lambda: float = Field(default=1.0, ge=0)
    """λ in u_e = P_e − λ·S_e."""
    fres_route_weight: float = Field(default=0.1, ge=0)
    """Weight of the loss that aligns the router with the FRES scores on new classes."""
    fres_temperature: float = Field(default=0.5, gt=0)
    aes_tau: float = Field(default=0.05, ge=0)
    """AES adds an expert while its marginal utility p_e − cost exceeds τ."""
    aes_cost: float = Field(default=0.05, ge=0)
    k_min: int = Field(default=1, ge=1)
    k_max: int = Field(default=3, ge=1)
    max_experts_per_round: int = Field(default=2, ge=1)
    """Budget: at most this many experts are trained and sent per device and round."""
    ewc_weight: float = Field(default=100.0, ge=0)
    fisher_decay: float = Field(default=0.5, ge=0, le=1)
    """Online-EWC accumulation: F ← γ·F + F_new when a device meets a new task."""
    fisher_samples: int = Field(default=256, gt=0)
    rar_weight: float = Field(default=0.01, ge=0)
    z_loss_weight: float = Field(default=0.001, ge=0)

    @model_validator(mode="after")
    def _k_range(self) -> FedFMXConfig:
        if self.k_min > self.k_max:
            raise ValueError("k_min must be <= k_max")
        return self


class TrainingConfig(Section):
    local_epochs: int = Field(default=2, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=0.01, gt=0)
    exemplars_per_class: int = Field(default=20, ge=0)
    """Per-class cap of each device's exemplar buffer (raw data stays on the device)."""
    threads: int = Field(default=2, ge=1)
    feature_cache_mb: int = Field(default=64, ge=0)
    """With a frozen pretrained backbone, each device keeps its samples' trunk features in an
    on-disk cache of at most this many MiB, so local epochs, Fisher estimation and FRES skip
    the trunk (`fedfmx.trunk.feature_cache`); 0 runs every image through the trunk every time."""


class BaselineConfig(Section):
    """Hyper-parameters of the baselines' distinctive terms."""

    prox_mu: float = Field(default=0.01, ge=0)
    """FedProx: (μ/2)·‖θ − θ_global‖²."""
    ewc_weight: float = Field(default=100.0, ge=0)
    lwf_weight: float = Field(default=1.0, ge=0)
    lwf_temperature: float = Field(default=2.0, gt=0)


class AnalyticConfig(Section):
    """The closed-form head: how the aggregator picks the ridge `λ` and bounds what it accepts."""

    lambdas: list[float] = Field(default=[1e-4, 1e-3, 1e-2, 1e-1], min_length=1)
    """Candidate `λ` in units of `tr(G)/d`; the aggregator keeps the one with the least
    squared error on held-out *devices*' statistics (`fedfmx.closed_form.head.choose_lambda`)."""
    default_lambda: float = Field(default=1e-2, gt=0)
    """`λ` (in units of `tr(G)/d`) while fewer than two folds of devices have sent rows."""
    folds: int = Field(default=2, ge=2, le=8)
    """Devices are split into this many folds by a hash of their id for choosing `λ`."""
    max_feature_norm: float = Field(default=1e3, gt=0)
    """Reject statistics whose mean squared feature norm `tr(G)/N` exceeds this squared."""
    max_samples: int = Field(default=1_000_000, ge=1)
    """Reject statistics claiming more rows than this in one update."""
    send_factor: bool = True
    """Devices send a round's Gram matrix as its exact factor (`d·r` values, `r ≤` the rows)
    when that is smaller than its triangle (`d(d+1)/2`); False: always the triangle. The
    aggregator accepts both either way (`fedfmx.closed_form.state`)."""


class BrokerConfig(Section):
    """Where and as whom a service connects to the MQTT broker (DESIGN §5, §6)."""

    url: str = "mqtt://127.0.0.1:1883"
    """mqtt://host:port, mqtts://host:port (TLS), ws:// or wss://."""
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    """"auto" tries MQTT 5 first and falls back to 3.1.1 (the embedded amqtt broker)."""
    username: str | None = None
    password_file: Path | None = None
    """A file holding the password (kept out of the YAML)."""
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    max_payload_bytes: int = Field(default=128 * 1024, ge=1024)
    """Largest MQTT payload; messages are chunked below it (the strictest cloud brokers cap
    payloads near 128 KiB)."""


class RateLimitConfig(Section):
    """A token bucket per device over its hellos, statuses and updates (DESIGN §6).

    A device sends a handful of messages a round (status, update, status, maybe a hello); a
    flood from one stolen or buggy device is dropped before it is decoded or stored, so it
    costs the others neither CPU nor state. A dropped update gets no receipt and is not
    remembered as delivered, so an honest device that was throttled re-sends it and it counts.
    The defaults leave an honest device of the fastest shipped fleet (`ci-digits`, rounds of
    a fraction of a second) several times the rate it needs (`tests/test_mqtt_federation.py`).
    """

    messages_per_s: float = Field(default=20.0, gt=0)
    burst: int = Field(default=60, ge=1)


class BufferedConfig(Section):
    """`service.mode: buffered` (FedBuff-style): merge every `size` updates, no round barrier."""

    size: int | None = Field(default=None, ge=1)
    """Updates folded into one new version (K); None: half of `protocol.num_clients`,
    rounded up, so the slowest half of the fleet never holds a version back."""
    max_staleness: int = Field(default=4, ge=0)
    """An update trained from a version more than this many versions behind the newest is
    refused with its reason (logged, counted, receipted as refused)."""
    max_wait_s: float = Field(default=60.0, gt=0)
    """A buffer holding at least one update merges after this long even when not full."""


class ServiceConfig(Section):
    """How the aggregator paces rounds over MQTT and where it keeps its state (DESIGN §5, §7)."""

    broker: BrokerConfig = BrokerConfig()
    state_path: Path | None = None
    """SQLite file of the aggregator's state; None: `<fleet name>.aggregator.sqlite` here."""
    min_devices: int | None = Field(default=None, ge=1)
    """Devices that must say hello before round 0; None: `protocol.num_clients`."""
    round_deadline_s: float = Field(default=600.0, gt=0)
    """A round closes when every participant has answered, or at this deadline."""
    quorum_fraction: float = Field(default=0.5, gt=0, le=1)
    """At the deadline, a round closes only once this fraction of participants answered; until
    then its deadline is extended (logged), so a fleet that lost most devices waits for them."""
    max_extensions: int = Field(default=3, ge=0)
    """After this many extensions a round closes with whatever arrived."""
    receipt_timeout_s: float = Field(default=15.0, gt=0)
    """A device re-sends its update when no receipt came back within this time."""
    signing_key: Path | None = None
    """The aggregator's Ed25519 private key (PEM); None publishes unsigned manifests."""
    rate_limit: RateLimitConfig = RateLimitConfig()
    """How many messages a second the aggregator handles from one device (beyond: dropped)."""
    allowed_devices: list[str] | None = None
    """Only these device ids may register (a provisioned fleet); None: an open fleet, where
    any id may say hello, up to `max_devices`."""
    max_devices: int | None = Field(default=None, ge=1)
    """Most devices the registry holds; None: as many as one round announcement can name
    (it names every participant and must fit one retained chunk: ~1,900 at 128 KiB). A hello
    from a new id when the registry is full first expires devices silent for
    `device_expiry_s`, and is refused (logged) if none is."""
    device_expiry_s: float = Field(default=3600.0, gt=0)
    mode: Literal["synchronous", "buffered"] = "synchronous"
    """`synchronous`: rounds with a barrier (every participant, or a quorum at the deadline).
    `buffered`: each update is folded against the version it was trained from and every
    `buffered.size` updates make a new version (`aggregator.buffered`)."""
    buffered: BufferedConfig = BufferedConfig()
    update_workers: int = Field(default=0, ge=0, le=64)
    """Processes that decode, validate and fold updates (`aggregator.update_workers`), each
    for a shard of the devices; 0: the aggregator's own handler thread does it. Synchronous
    rounds with the `mean` merge, flat fleets, not the closed-form methods."""
    dormant_after_rounds: int = Field(default=2, ge=1)
    """A device that was neither heard from since the previous round opened nor answered any
    of the last this many rounds is left out of the next one (it returns with its next
    message): a dead device, or an id that only ever said hello, cannot slow every round."""

    def state_file(self, fleet_name: str) -> Path:
        return self.state_path or Path(f"{fleet_name}.aggregator.sqlite")


class RobustnessConfig(Section):
    """How the aggregator bounds what one device's update can do to the merge (DESIGN §6).

    The defaults (`mean`, no clipping) are the plain associative merge.
    """

    max_update_norm: float = Field(default=1e4, gt=0)
    """Reject (logged, stored, the round goes on) an update whose deltas' joint L2 norm exceeds
    this: an order of magnitude no honest local round produces. `clip_norm` scales what is
    admitted; this refuses what is absurd."""
    clip_norm: float | None = Field(default=None, gt=0)
    """Scale each update's deltas (experts, router, backbone, head rows; not the Fisher
    summaries) down so their joint L2 norm is at most this; None: no clipping."""
    merge: Literal["mean", "median", "trimmed_mean"] = "mean"
    """`mean`: Fisher-weighted experts, sample-weighted router/backbone, count-weighted head rows
    (associative sums). `median` / `trimmed_mean`: unweighted coordinate-wise statistic per
    tensor and head row over the devices that sent it; the aggregator then holds the round's
    decoded updates in memory (`fedfmx.federation.rounds.OpenRound.updates`)."""
    trim_fraction: float = Field(default=0.1, ge=0, lt=0.5)
    """`trimmed_mean`: drop the ⌊β·n⌋ smallest and largest of the n values at each coordinate."""


class DownlinkConfig(Section):
    """How model versions travel to devices (docs/decisions.md §18)."""

    delta: bool = True
    """Send each new version as a delta against the previous one (`fedfmx.wire.model_delta`), the
    full version staying available for devices that do not hold that base; false: only the
    full fp32 version."""
    quantize: Literal["none", "int8"] = "int8"
    """`int8`: the delta per row in int8, and the published version is base + decoded delta;
    `none`: a lossless bitwise delta (the closed-form methods always use it)."""
    zstd_level: int = Field(default=3, ge=1, le=22)


UPLINK_DEFAULT = CodecSettings(quantize="int8", zstd_level=3)
"""Updates without a `codec` section: int8 + zstd (free in accuracy: benchmarks/README,
"Update compression")."""
UPLINK_DEFAULT_CLOSED_FORM = CodecSettings(zstd_level=3)
"""Closed-form methods send their statistics in float32 + zstd: int8 Gram matrices cost up to
21 points (benchmarks/README, closed-form wire)."""


class DistrictsConfig(Section):
    """The root of a tree of district aggregators (`aggregator.districts.root`, docs/decisions.md).

    Each district serves its own devices behind its own Mosquitto, bridged to the root's, and
    forwards one partial merge per round. The root's quorum counts *devices* through their
    districts' partials: a round closes once every participating district's partial arrived,
    or `partial_grace_s` after the devices' deadline once the partials cover
    `service.quorum_fraction` of the round's participants (else the deadline is extended, up
    to `service.max_extensions` times, as in a flat fleet).
    """

    ids: list[str] = Field(min_length=1, max_length=1000)
    """The districts that may send partials (each id is its certificate's CN on the root's
    broker and one topic level: `[A-Za-z0-9_-]{1,64}`)."""
    partial_grace_s: float = Field(default=30.0, gt=0)
    """How long after the devices' deadline the root waits for partials before its quorum
    rule applies (a district closes at the deadline and needs a moment to forward)."""

    @model_validator(mode="after")
    def _ids_are_topic_levels(self) -> DistrictsConfig:
        for district in self.ids:
            if not district.replace("-", "").replace("_", "").isalnum() or len(district) > 64:
                raise ValueError(f"district id {district!r}: use letters, digits, '-' and '_'")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("district ids must be unique")
        return self


class ClassPolicyConfig(Section):
    """Which class names devices may bring into the fleet, and when (class discovery)."""

    allowed: list[str] | None = None
    """Class names a device may learn; a sample of any other class is refused (logged).
    None: any name (a new name registers through the update's head rows, decisions §2)."""
    min_samples: int = Field(default=1, ge=1)
    """A device reports (trains on, says hello with) a class only once it holds this many
    samples of it."""


class FleetConfig(Section):
    name: str = Field(default="demo", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    seed: int = 0
    method: MethodName = "fedfmx_cf"
    data: DataConfig = DataConfig()
    protocol: ProtocolConfig = ProtocolConfig()
    model: ModelConfig = ModelConfig()
    fedfmx: FedFMXConfig = FedFMXConfig()
    training: TrainingConfig = TrainingConfig()
    baselines: BaselineConfig = BaselineConfig()
    analytic: AnalyticConfig = AnalyticConfig()
    """The closed-form head (`ridge`): λ selection and statistics validation."""
    codec: CodecSettings | None = None
    """How devices compress their updates (int8, top-k with error feedback, zstd); None: the
    method's default (`uplink_codec`)."""
    downlink: DownlinkConfig = DownlinkConfig()
    """How model versions reach devices: a compressed delta with the full version as fallback."""
    service: ServiceConfig = ServiceConfig()
    """The MQTT aggregator: broker, round deadline and quorum, state file."""
    robustness: RobustnessConfig = RobustnessConfig()
    """Norm clipping and robust merges against hostile or broken updates."""
    classes: ClassPolicyConfig = ClassPolicyConfig()
    """Allowed class names and the samples a device needs before it reports a class."""
    districts: DistrictsConfig | None = None
    """Set on the root of a tree of district aggregators; None: a flat fleet."""

    @property
    def routing(self) -> FedFMXConfig:
        """The routing the method runs with, at training and at inference alike.

        `fixed_topk` replaces AES by a fixed top-k (k = k_max); `dense_moe` activates every
        expert; every other method uses AES as configured.
        """
        if self.method == "fixed_topk":
            return self.fedfmx.model_copy(update={"k_min": self.fedfmx.k_max})
        if self.method == "dense_moe":
            experts = self.model.num_experts
            return self.fedfmx.model_copy(update={"k_min": experts, "k_max": experts})
        return self.fedfmx

    @property
    def uplink_codec(self) -> CodecSettings:
        """The codec devices use: the fleet's `codec`, or int8 + zstd (closed-form methods:
        float32 + zstd)."""
        if self.codec is not None:
            return self.codec
        return UPLINK_DEFAULT_CLOSED_FORM if self.closed_form else UPLINK_DEFAULT

    @property
    def closed_form(self) -> bool:
        return self.method in CLOSED_FORM_METHODS

    @property
    def device_capacity(self) -> int:
        """Most devices the aggregator registers: `service.max_devices`, or what fits."""
        return self.service.max_devices or announcement_capacity(
            self.service.broker.max_payload_bytes, self.model.num_experts
        )

    @model_validator(mode="after")
    def _colour_needs_the_trunk(self) -> FleetConfig:
        image = self.data.image
        if (
            image is not None
            and image.channels == 3
            and self.model.backbone != "efficientnet_lite0"
        ):
            raise ValueError(
                "data.image.channels 3 (RGB) needs model.backbone efficientnet_lite0; "
                "the cnn backbone reads grey images"
            )
        return self

    @property
    def network(self) -> ModelConfig:
        """The model the method runs with: a closed-form head for the closed-form methods."""
        if self.method == "fedfmx_cf":
            return self.model.model_copy(update={"head": "closed_form_experts"})
        if self.method == "fedfmx_cf_no_experts":  # φ_0 alone: FedFMX-CF without its experts
            width = self.model.shared_features
            return self.model.model_copy(update={"head": "closed_form", "random_features": width})
        if self.method in CLOSED_FORM_METHODS:
            return self.model.model_copy(update={"head": "closed_form"})
        return self.model

    @model_validator(mode="after")
    def _closed_form_has_features(self) -> FleetConfig:
        pixels = self.model.backbone != "efficientnet_lite0"
        if self.method == "ridge" and pixels and self.model.random_features == 0:
            raise ValueError("method ridge on raw pixels needs model.random_features > 0")
        return self

    @model_validator(mode="after")
    def _districts_merge_associatively(self) -> FleetConfig:
        """A tree forwards sums: only merges that are sums survive it (docs/decisions.md)."""
        if self.districts is None:
            return self
        if self.robustness.merge != "mean":
            raise ValueError(
                f"robustness.merge {self.robustness.merge} is not associative: a median or "
                "trimmed mean of district partials is not the fleet's; use merge: mean with "
                "districts (clip_norm and max_update_norm apply at each district)"
            )
        return self

    @model_validator(mode="after")
    def _buffered_merges_sums(self) -> FleetConfig:
        if self.service.mode == "buffered" and self.districts is not None:
            raise ValueError("service.mode buffered runs a flat fleet: drop districts")
        if self.service.mode == "buffered" and (
            self.method in CLOSED_FORM_METHODS or self.robustness.merge != "mean"
        ):
            raise ValueError(
                "service.mode buffered folds deltas into associative sums: it needs "
                "robustness.merge mean and a method that is not closed-form"
            )
        return self

    @model_validator(mode="after")
    def _update_workers_fold_sums(self) -> FleetConfig:
        if self.service.update_workers and (
            self.service.mode != "synchronous"
            or self.districts is not None
            or self.method in CLOSED_FORM_METHODS
            or self.robustness.merge != "mean"
        ):
            raise ValueError(
                "service.update_workers fold partial sums: they need synchronous rounds of a "
                "flat fleet, robustness.merge mean and a method that is not closed-form"
            )
        return self

    @property
    def buffer_size(self) -> int:
        """K of `service.mode: buffered`: updates per new version."""
        return self.service.buffered.size or -(-self.protocol.num_clients // 2)

    @model_validator(mode="after")
    def _experts_fit(self) -> FleetConfig:
        if self.fedfmx.k_max > self.model.num_experts:
            raise ValueError(
                f"fedfmx.k_max must be <= model.num_experts ({self.model.num_experts})"
            )
        return self

    @model_validator(mode="after")
    def _announcement_fits(self) -> FleetConfig:
        fitting = announcement_capacity(
            self.service.broker.max_payload_bytes, self.model.num_experts
        )
        if fitting < 1 or (self.service.max_devices or 0) > fitting:
            raise ValueError(
                f"service.max_devices: a round announcement naming {self.service.max_devices} "
                f"devices may not fit one {self.service.broker.max_payload_bytes}-byte payload "
                f"(at most {fitting})"
            )
        return self


def announcement_capacity(max_payload_bytes: int, num_experts: int) -> int:
    """Participants a round announcement can always name within one payload: each id takes
    at most 67 bytes (64 characters, quotes, comma), each expert's usage 26, the rest and the
    chunk header under 1 KiB."""
    return (max_payload_bytes - 1024 - 26 * num_experts) // 67


Document = TypeVar("Document", bound=BaseModel)


def _first_error(error: ValidationError) -> str:
    """One line: where the first problem is and what is allowed there."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "file"
    return f"{where}: {first['msg']}"


def validate_document(model: type[Document], raw: object, source: str) -> Document:
    """Validate a parsed YAML document; the error names the source, the field and the rule."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{source}: {_first_error(error)}") from None


MAX_YAML_BYTES = 1 << 20
"""Largest configuration file read (a fleet YAML is a few KB)."""
MAX_YAML_ALIASES = 100
"""YAML aliases allowed in one document: a "billion laughs" file expands exponentially."""


def read_yaml(path: Path, what: str) -> object:
    """Parse a YAML file; anything wrong with it (missing, a directory, empty, too big,
    binary, not YAML, an alias bomb) is one ConfigError line."""
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: over {MAX_YAML_BYTES} bytes, not a {what} file")
        text = path.read_bytes().decode("utf-8")
        if text.count("*") and _aliases(text) > MAX_YAML_ALIASES:
            raise ConfigError(f"{path}: more than {MAX_YAML_ALIASES} YAML aliases")
        document = yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a {what} file") from None
    except PermissionError:
        raise ConfigError(f"{path}: not readable (permission denied)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8), not a {what} file") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML") from None
    if document is None:
        raise ConfigError(f"{path}: is empty, not a {what} file")
    return document


def _aliases(text: str) -> int:
    return sum(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text))


def parse_fleet(raw: object, source: str = "fleet") -> FleetConfig:
    """Validate an already-parsed YAML document; errors name the field and the allowed values."""
    return validate_document(FleetConfig, raw, source)


def load_fleet(path: Path | None) -> FleetConfig:
    """Read a fleet YAML file, or the embedded default when `path` is None."""
    if path is None:
        return FleetConfig()
    return parse_fleet(read_yaml(path, "fleet"), str(path))
