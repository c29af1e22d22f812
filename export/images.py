"""Images a device hands to the model: a directory of PNGs/JPEGs or an IDX file, normalised as
in training (`raw / pixel_max`, float32 [N, C, H, W]) according to the file's `InputSpec`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.checkpoint import InputSpec
from export.errors import MAX_IMAGE_FILE_BYTES, MAX_IMAGE_PIXELS, refuse_oversize
from fedfmx.data.datasets import read_idx
from fedfmx.data.preprocessing import decode_image, model_input
from fedfmx.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_images(
    path: Path, spec: InputSpec, limit: int | None = None
) -> tuple[np.ndarray, list[str]]:
    """Images under `path` (PNG directory or IDX file) and a name for each (file name or index)."""
    if path.is_dir():
        images, names = _load_png_dir(path, spec, limit)
    elif path.is_file():
        images = _load_idx(path, spec, limit)
        names = [f"{path.name}[{i}]" for i in range(len(images))]
    else:
        raise DataError(f"{path}: no such file or directory; pass a PNG directory or an IDX file")
    if len(images) == 0:
        raise DataError(f"{path}: no images found")
    return images, names


def _load_png_dir(
    directory: Path, spec: InputSpec, limit: int | None
) -> tuple[np.ndarray, list[str]]:
    """PNG/JPEG files through the devices' one preprocessing path (`fedfmx.data.preprocessing`)."""
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    arrays = []
    for file in files:
        refuse_oversize(file, MAX_IMAGE_FILE_BYTES, "an image")
        try:
            pixels = decode_image(file.read_bytes(), MAX_IMAGE_PIXELS)  # header checked first
            arrays.append(model_input(pixels, spec.image))
        except (DataError, OSError) as error:
            raise DataError(f"{file}: not a readable PNG or JPEG ({error})") from None
    if not arrays:
        return np.zeros((0, spec.channels, spec.height, spec.width), np.float32), []
    return np.ascontiguousarray(np.stack(arrays)), [file.name for file in files]


def _load_idx(path: Path, spec: InputSpec, limit: int | None) -> np.ndarray:
    """Integer IDX images are divided by `pixel_max`; float IDX images are taken as normalised."""
    raw = read_idx(path)[:limit]
    if raw.ndim == 3:
        raw = raw[:, None]
    expected = (spec.channels, spec.height, spec.width)
    if raw.ndim != 4 or raw.shape[1:] != expected:
        raise DataError(
            f"{path}: images of shape {raw.shape[1:]}, the model takes {expected} "
            "([N, H, W] or [N, C, H, W])"
        )
    scale = spec.pixel_max if np.issubdtype(raw.dtype, np.integer) else 1.0
    return np.ascontiguousarray(raw.astype(np.float32) / np.float32(scale))
