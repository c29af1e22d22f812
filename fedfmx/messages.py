"""Protocol messages shared by the in-process engine and the MQTT transport.

Every message is a pydantic model serialised as JSON with a schema version; tensors never travel
inside these models but beside them, as safetensors (see `fedfmx.codec`). Unknown fields are
rejected so that a malformed or hostile header fails validation before it touches any state.
"""

from __future__ import annotations

from typing import Literal

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


class Hello(Message):
    """A device introduces itself: what it is and which classes it has met."""

    fleet: str
    device_id: str
    profile: str
    classes_met: list[str]
    sample_counts: dict[str, int]


class RoundAnnouncement(Message):
    """The aggregator opens a round: which model to start from and who takes part."""

    fleet: str
    round: int = Field(ge=0)
    task: int = Field(ge=0)
    model_version: int = Field(ge=0)
    participants: list[str]
    deadline_unix: float
    expert_usage: list[float]
    """Fleet-wide fraction of routed samples per expert over the last round (RAR's `f_e`)."""
    class_names: list[str]
    """The class registry: index = global class id; each round appends its new classes, sorted."""
    train_backbone: bool
    """Whether devices train (and send) the backbone this round."""


class UpdateHeader(Message):
    """What a device sends beside its tensors: enough for the aggregator to validate and merge.

    Tensors are deltas against the model version `base_version`: `experts.<e>.<param>` for each
    id in `expert_ids`, `router.<param>`, `backbone.<param>` when the backbone was trained,
    `head.rows` (one row per name in `head_classes`) and `fisher.<name>` for the diagonal Fisher
    of every expert parameter sent (used by the Fisher-weighted merge). A closed-form method's
    update carries feature statistics instead (`includes_statistics`).
    """

    fleet: str
    device_id: str
    round: int = Field(ge=0)
    base_version: int = Field(ge=0)
    num_samples: int = Field(gt=0)
    expert_ids: list[int]
    head_classes: list[str]
    class_counts: list[int]
    """Samples per class in `head_classes`, same order: the weights of the per-class head merge."""
    expert_usage: list[float]
    """Samples this device routed to each expert during the round (summed fleet-wide)."""
    includes_backbone: bool = False
    """Whether `backbone.<param>` deltas are included (the backbone was trained this round)."""
    includes_fisher: bool = False
    """Whether `fisher.experts.<e>.<param>` accompany the expert deltas."""
    includes_statistics: bool = False
    """A closed-form head's update: `stats.gram` and `stats.moments` (the features' sums over
    the rows not sent before, `fedfmx.analytic_state`) instead of deltas; `class_counts` are
    the rows per class and `num_samples` their sum."""
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

    device_id: str
    state: DeviceActivity
    round: int | None = None
    """The last round this device answered (sent an update or had nothing to send)."""
    model_version: int | None = None
    updates_sent: int = Field(default=0, ge=0)
    peak_rss_mb: float | None = None
    """Peak resident memory of the last local round (DESIGN §8: the profile's budget)."""
    round_time_s: float | None = None
    profile: str | None = None
