"""The sample store seen as a learner's stream: each round's batch, and rows by sample id.

`DeviceLearner` asks a `DeviceStream` where it stands and which samples it holds, and a
`SampleTable` for their images; `StoreStream` answers both from the device's `SampleStore`.
A batch is a "task" in the learner's terms: it grows with every sample that arrives until a
class the device never met opens the next one; then the learner closes the previous batch
(its Fisher, its exemplars: the learner's memory) and trains on the new batch plus that
memory, exactly as it does when a fleet partition moves to a new task. These are the
partition's semantics (a task's rows accumulate until the next task), which is why they were
chosen; decisions §13 has what they measured.
"""

from __future__ import annotations

import numpy as np

from edge_client.sample_store import SampleStore
from fedfmx.data.stream import StreamPosition


class StoreStream:
    """`DeviceStream` and `SampleTable` over a `SampleStore` (ids are the store's ids)."""

    def __init__(self, store: SampleStore) -> None:
        self.store = store

    def position(self, global_round: int) -> StreamPosition:
        batch = self.store.batch_of_round(global_round)
        return StreamPosition(task=batch, round_in_task=0)

    def available(self, global_round: int) -> np.ndarray:
        batch = self.store.batch_of_round(global_round)
        if batch is None:
            return np.zeros(0, dtype=np.int64)
        return self.store.batch_ids(batch)

    def rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.store.rows(ids)
