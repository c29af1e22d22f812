"""Protocol messages shared by the in-process engine and the MQTT transport.

Every message is a pydantic model serialised as JSON with a schema version; tensors never travel
inside these models but beside them, as safetensors (see `fedfmx.wire.codec`). Unknown fields are
rejected so that a malformed or hostile header fails validation before it touches any state.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION: Literal[1] = 1


class Message(BaseModel):
    """Base of every protocol message: strict, frozen, versioned."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION


class CodecSettings(Message):
    """How an update's tensors are compressed; stated in the update header."""

    quantize: Literal["none", "fp16", "int8"] = "none"
    topk_fraction: float | None = Field(default=None, gt=0.0, le=1.0)
    zstd_level: int | None = Field(default=None, ge=1, le=22)


Name = Annotated[str, Field(max_length=128)]
"""A fleet, device, profile or class name: bounded, so a hostile message stays small."""
MAX_CLASSES = 10_000
"""Most classes a message may name (the many-class data sets have a few hundred)."""


class Hello(Message):
    """A device introduces itself: what it is and which classes it has met."""

    fleet: Name
    device_id: Name
    profile: Name
    classes_met: list[Name] = Field(max_length=MAX_CLASSES)
    sample_counts: dict[Name, Annotated[int, Field(ge=0)]] = Field(max_length=MAX_CLASSES)


class RoundAnnouncement(Message):
    """The aggregator opens a round: which model to start from and who takes part.

    It is retained on one topic, so it must fit one chunk: its size is bounded by the fleet's
    `service.max_devices` (the class registry travels in the model header, which is chunked).
    """

    fleet: Name
    round: int = Field(ge=0)
    task: int = Field(ge=0)
    model_version: int = Field(ge=0)
    participants: list[Name]
    deadline_unix: float
    expert_usage: list[float] = Field(max_length=4096)
    """Fleet-wide fraction of routed samples per expert over the last round (RAR's `f_e`)."""
    train_backbone: bool
    """Whether devices train (and send) the backbone this round."""
    closed: bool = False
    """The round is over (re-announced when it closes): a device stops re-sending its update
    for it, and after the schedule's last round it knows the fleet is done."""


class UpdateHeader(Message):
    """What a device sends beside its tensors: enough for the aggregator to validate and merge.

    Tensors are deltas against the model version `base_version`: `experts.<e>.<param>` for each
    id in `expert_ids`, `router.<param>`, `backbone.<param>` when the backbone was trained,
    `head.rows` (one row per name in `head_classes`) and `fisher.<name>` for the diagonal Fisher
    of every expert parameter sent (used by the Fisher-weighted merge). A closed-form method's
    update carries feature statistics instead (`includes_statistics`).
    """

    fleet: Name
    device_id: Name
    round: int = Field(ge=0)
    base_version: int = Field(ge=0)
    num_samples: int = Field(gt=0)
    expert_ids: list[int] = Field(max_length=MAX_CLASSES)
    head_classes: list[Name] = Field(max_length=MAX_CLASSES)
    class_counts: list[int] = Field(max_length=MAX_CLASSES)
    """Samples per class in `head_classes`, same order: the weights of the per-class head merge."""
    expert_usage: list[float]
    """Samples this device routed to each expert during the round (summed fleet-wide)."""
    includes_backbone: bool = False
    """Whether `backbone.<param>` deltas are included (the backbone was trained this round)."""
    includes_fisher: bool = False
    """Whether `fisher.experts.<e>.<param>` accompany the expert deltas."""
    includes_statistics: bool = False
    """A closed-form head's update: `stats.gram` (or `stats.factor`) and `stats.moments` (the
    features' sums over the rows not sent before, `fedfmx.closed_form.state`) instead of deltas;
    `class_counts` are the rows per class and `num_samples` their sum."""
    factor_rank: int = Field(default=0, ge=0)
    """With statistics: 0 when `stats.gram` carries the Gram matrix's triangle; `r ≥ 1` when
    `stats.factor` carries its exact factor instead, `r` rows of `d` (`fedfmx.closed_form.state`:
    smaller when the update has fewer than `(d + 1)/2` rows)."""
    rows_before: int = Field(default=0, ge=0)
    """With statistics: how many of this device's rows the fleet's model already holds, as the
    device read it from the model it started from (the aggregator refuses a mismatch)."""
    lambda_hits: list[int] = []
    """With statistics: of these rows, how many each candidate ridge head of the starting
    model classifies right (the aggregator's prequential choice of `λ`); empty before the
    first head."""
    codec: CodecSettings = CodecSettings()
    train_loss: float


class ModelHeader(Message):
    """Describes a global model version; its tensors (full fp32 values) travel beside it."""

    fleet: str
    version: int = Field(ge=0)
    class_names: list[str]
    """Global class ids in order: row `i` of `head.weight` is class `class_names[i]`."""


DeltaKind = Literal["int8", "xor", "full"]


class DeltaTensor(Message):
    """One tensor of a model version sent as a delta: how it travels (`fedfmx.wire.model_delta`)."""

    name: str = Field(max_length=256)
    kind: DeltaKind
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=8)


class DeltaHeader(Message):
    """A model version sent as a delta against `base_version` (the downlink's usual form).

    The device applies it to the version it holds, whose encoded payload must have SHA-256
    `base_sha256`, and checks the result against the signed manifest of the full version.
    """

    fleet: str
    version: int = Field(ge=1)
    base_version: int = Field(ge=0)
    base_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    class_names: list[str]
    tensors: list[DeltaTensor] = Field(max_length=4096)


class UpdateReceipt(Message):
    """The aggregator's answer to one update, sent to the device's inbox once it is stored.

    A device re-sends its update until a receipt for that round arrives (or the round moves on),
    so an update acknowledged by the broker but lost in a crashed aggregator still arrives.
    """

    kind: Literal["receipt"] = "receipt"
    update_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """SHA-256 of the update payload this answers (a device matches it to its pending one)."""
    accepted: bool
    reason: str = ""
    """Why the update was refused (empty when accepted)."""


DeviceActivity = Literal["online", "waiting", "training", "sent", "skipped", "offline"]


class DeviceStatus(Message):
    """A device's retained status; its Last Will is the same message with state `offline`."""

    device_id: Name
    state: DeviceActivity
    round: int | None = None
    """The last round this device answered (sent an update or had nothing to send)."""
    model_version: int | None = None
    updates_sent: int = Field(default=0, ge=0)
    peak_rss_mb: float | None = None
    """Peak resident memory of the last local round (DESIGN §8: the profile's budget)."""
    round_time_s: float | None = None
    profile: Name | None = None
    rss_mb: float | None = None
    """Resident memory of the device process when the status was sent (health)."""
    disk_free_mb: float | None = None
    """Free space under the device's state_dir."""
    last_round_unix: float | None = None
    """When the device last finished a round (its clock)."""
    source_state: str | None = Field(default=None, max_length=64)
    """The data source's state: `ok`, `exhausted` (stream fully met) or an error word."""
    store_samples: int | None = Field(default=None, ge=0)
    """Samples in the device's own sample store (folder and camera sources)."""
    store_bytes: int | None = Field(default=None, ge=0)
    """Disk the sample store uses: sample files and ledger."""
    sources: list[Annotated[str, Field(max_length=512)]] | None = Field(default=None, max_length=8)
    """One line per source: kind, state and detail (`camera: reconnecting (...)`)."""
    predictions: int | None = Field(default=None, ge=0)
    """Frames classified since the device started."""
    to_label: int | None = Field(default=None, ge=0)
    """Frames waiting in the to-label queue."""


class ClockProbe(Message):
    """`doctor`'s clock echo on `clients/<id>/clock`: the device sends a probe, the aggregator
    answers with the same `probe_id` and its clock. With `t0`/`t1` the device's send and
    receive times, skew = aggregator_unix - (t0 + t1) / 2, within ±(t1 - t0) / 2 (NTP's rule)."""

    kind: Literal["clock"] = "clock"
    probe_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    aggregator_unix: float | None = None
    """None in a probe; the aggregator's time.time() in its answer."""


DEVICE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
PEM_LIMIT = 16_384


class EnrolmentRequest(Message):
    """A device's request to join (retained on `enrol/<id>/request`): its certificate signing
    request, made on the device, whose private key never leaves it."""

    kind: Literal["enrol_request"] = "enrol_request"
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    csr_pem: str = Field(max_length=PEM_LIMIT)
    profile: str | None = Field(default=None, max_length=256)


class EnrolmentReply(Message):
    """The operator's answer (retained on `enrol/<id>/reply`): the signed certificate and what
    the device needs to join (fleet YAML, the model-signing public key, the broker to use)."""

    kind: Literal["enrol_reply"] = "enrol_reply"
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    certificate_pem: str = Field(max_length=PEM_LIMIT)
    fleet_yaml: str = Field(max_length=1_000_000)
    fleet_public_key_pem: str | None = Field(default=None, max_length=PEM_LIMIT)
    broker_url: str = Field(max_length=1024)


class DistrictReport(Message):
    """A district aggregator tells the root which of its devices may take part (retained on
    its `districts/<id>/status`); the root's announcement for the district names them."""

    fleet: Name
    district: Name
    devices: list[Name] = Field(max_length=100_000)
    """Registered devices alive by the flat fleet's rule (`Aggregator._participants`)."""
    registered: int = Field(ge=0)
    sent_unix: float
