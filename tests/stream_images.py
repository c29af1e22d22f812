"""Real images as files, for the device-stream tests: UCI digits (shipped in scikit-learn)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def digit_pixels(label: int, count: int, start: int = 0, side: int = 8) -> list[np.ndarray]:
    """`count` real handwritten `label`s as uint8 grey images of `side` pixels."""
    bunch = load_digits()
    images = bunch.images[bunch.target == label][start : start + count]
    pixels = [np.round(image * (255 / 16)).astype(np.uint8) for image in images]
    if side == 8:
        return pixels
    return [np.asarray(Image.fromarray(p).resize((side, side))) for p in pixels]


def encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def write_digits(
    folder: Path, label: int, count: int, start: int = 0, fmt: str = "PNG"
) -> list[Path]:
    """Write real digit images as `<folder>/<label>/<i>.png` (or .jpg); their paths."""
    (folder / str(label)).mkdir(parents=True, exist_ok=True)
    suffix = ".png" if fmt == "PNG" else ".jpg"
    paths = []
    for i, pixels in enumerate(digit_pixels(label, count, start)):
        path = folder / str(label) / f"{start + i:04d}{suffix}"
        path.write_bytes(encode(pixels, fmt))
        paths.append(path)
    return paths
