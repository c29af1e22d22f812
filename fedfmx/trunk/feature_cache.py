"""A bounded on-disk cache of frozen-trunk features, so each sample crosses the trunk once.

With a frozen pretrained backbone, a sample's pooled trunk features never change. A device that
keeps them needs the trunk only for rows it has never seen: its local epochs, Fisher estimation
and FRES then run on the cached rows and touch only the projection, experts and head (the model
accepts trunk features in place of images: `fedfmx.trunk.pretrained.PretrainedBackbone`).

Layout: one safetensors file per sample, `<root>/<key>.safetensors`, where the key is a SHA-256
of the backbone id and the sample's dtype, shape and bytes: a changed sample or another backbone
(or preprocessing) is a different key, never a stale hit. Values are stored as the trunk gave
them, float32 (about 5 KB a sample for a 1280-wide trunk, 44 KB for its tap vector,
`fedfmx.trunk.taps`), so training on cached features sends
the same update as training on images; a CRC32 of their bytes in the metadata catches a
truncated or bit-flipped entry, which is logged, deleted and recomputed. Files are written to a
temporary name and renamed, so a crash never leaves a half-written entry under a real key. The
total size is kept under a byte budget by evicting the least recently used entries; recency is
the file's mtime, so it survives a restart.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from fedfmx.errors import ConfigError

if TYPE_CHECKING:  # torch only where the trunk runs in torch: a serving device has none
    from fedfmx.trunk.pretrained import PretrainedBackbone

log = logging.getLogger(__name__)

FeatureFn = Callable[[np.ndarray], np.ndarray]
"""Images [M, C, H, W] -> float32 features [M, D]: what the cache calls on its misses."""

_TENSOR = "features"
_SUFFIX = ".safetensors"


@dataclass
class CacheStats:
    """Counters since the cache was opened (for the round-time and cache-benefit figures)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    corrupt: int = 0


def trunk_feature_fn(backbone: PretrainedBackbone, taps: bool = False) -> FeatureFn:
    """The backbone's frozen trunk as the cache's compute function: its pooled features, or
    with `taps` its whole tap vector (`fedfmx.trunk.taps`; cache those under `taps_id`)."""
    import torch

    def compute(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            tensor = torch.from_numpy(images)
            out = backbone.trunk_taps(tensor) if taps else backbone.trunk_features(tensor)
            return out.numpy()

    return compute


def _checksum(values: np.ndarray) -> str:
    return f"{zlib.crc32(values.tobytes()):08x}"


class FeatureCache:
    """Per-sample float32 features under `root`, at most `max_bytes` of files, LRU-evicted."""

    def __init__(self, root: Path, backbone_id: str, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ConfigError(f"the feature cache needs a positive byte budget, got {max_bytes}")
        self.root = root
        self.backbone_id = backbone_id
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob("*.tmp"):  # writes cut short by a crash
            leftover.unlink(missing_ok=True)
        files = sorted(root.glob(f"*{_SUFFIX}"), key=lambda path: path.stat().st_mtime_ns)
        self._entries: OrderedDict[str, int] = OrderedDict(
            (path.name.removesuffix(_SUFFIX), path.stat().st_size) for path in files
        )
        """Key -> file size, least recently used first."""
        self.size_bytes = sum(self._entries.values())
        self._evict()

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, sample: np.ndarray) -> str:
        digest = hashlib.sha256(f"{self.backbone_id}|{sample.dtype}|{sample.shape}|".encode())
        digest.update(np.ascontiguousarray(sample).tobytes())
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / f"{key}{_SUFFIX}"

    def get(self, key: str) -> np.ndarray | None:
        """The cached features, or None on a miss (a corrupt entry counts as a miss)."""
        if key not in self._entries:
            return None
        path = self._path(key)
        try:
            with safe_open(str(path), framework="numpy") as entry:
                checksum = (entry.metadata() or {}).get("crc32")
                values: np.ndarray = entry.get_tensor(_TENSOR)
        except (OSError, SafetensorError) as error:
            self._discard(key, f"unreadable ({error})")
            return None
        if values.dtype != np.float32 or values.ndim != 1 or checksum != _checksum(values):
            self._discard(key, "checksum or layout mismatch")
            return None
        self._entries.move_to_end(key)
        os.utime(path)
        return values

    def _discard(self, key: str, problem: str) -> None:
        log.warning("feature cache: dropping entry %s: %s", key, problem)
        self.stats.corrupt += 1
        self.size_bytes -= self._entries.pop(key)
        self._path(key).unlink(missing_ok=True)

    def put(self, key: str, features: np.ndarray) -> None:
        """Store one sample's features; a failed write is logged and skipped, never fatal."""
        values = np.ascontiguousarray(features, dtype=np.float32).reshape(-1)
        payload = save({_TENSOR: values}, metadata={"crc32": _checksum(values)})
        if len(payload) > self.max_bytes:
            return
        path = self._path(key)
        partial = path.with_name(f"{key}.{os.getpid()}.tmp")
        try:
            partial.write_bytes(payload)
            os.replace(partial, path)
        except OSError as error:
            log.warning("feature cache: cannot write %s (%s); continuing uncached", path, error)
            partial.unlink(missing_ok=True)
            return
        self.size_bytes += len(payload) - self._entries.pop(key, 0)
        self._entries[key] = len(payload)
        self._evict()

    def _evict(self) -> None:
        while self.size_bytes > self.max_bytes:
            key, size = self._entries.popitem(last=False)
            self._path(key).unlink(missing_ok=True)
            self.size_bytes -= size
            self.stats.evictions += 1

    def features(self, images: np.ndarray, compute: FeatureFn, batch_size: int = 64) -> np.ndarray:
        """Features of every row of `images` (float32 [N, D]); misses are computed in batches.

        Rows are written straight into the result, so a round's peak memory holds its features
        once (a device's budget is small).
        """
        if len(images) == 0:
            return compute(images).astype(np.float32)
        keys = [self.key(sample) for sample in images]
        features: np.ndarray | None = None
        missing = []
        for i, key in enumerate(keys):
            values = self.get(key)
            if values is None:
                missing.append(i)
                continue
            if features is None:
                features = np.empty((len(keys), len(values)), dtype=np.float32)
            features[i] = values
        self.stats.hits += len(keys) - len(missing)
        self.stats.misses += len(missing)
        for start in range(0, len(missing), batch_size):
            rows = missing[start : start + batch_size]
            computed = np.asarray(compute(images[rows]), dtype=np.float32)
            if features is None:
                features = np.empty((len(keys), computed.shape[1]), dtype=np.float32)
            features[rows] = computed
            for i, values in zip(rows, computed, strict=True):
                self.put(keys[i], values)
        assert features is not None  # every row was a hit or computed
        return features
