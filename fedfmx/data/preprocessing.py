"""One preprocessing path from an image file or a camera frame to what the model is fed.

decode (JPEG/PNG only, its size checked from the header before any pixel is decoded) →
channels (grey `L` or `RGB`) → fit to the fleet's input size (`stretch`, or `center_crop`:
scale the short side to the target, crop the middle) → uint8 `[C, H, W]` → float32 in [0, 1]
(`x / 255`). Training, Fisher, export calibration and parity, and serving all call
`model_input`, so a device never trains on one preprocessing and serves another.

The uint8 stage (`fit_pixels`) is what a sample store keeps when raw files may not be kept:
exactly what the learner needs, a quarter of the float32 bytes.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedfmx.config import FleetConfig, ImageInputConfig
from fedfmx.errors import DataError

DATASET_IMAGE_SIZES = {
    "fashion_mnist": 28,
    "digits": 8,
    "mnist5k": 28,
    "omniglot_small": 28,
    "coil20": 32,
    "yaleb": 32,
    "orl": 32,
}
"""Side of each data set's (square, grey) images: a fleet's input spec when it sets none."""
ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "MPO"})
"""MPO: the multi-picture JPEG some phone cameras write (its first frame is a plain JPEG)."""
DEFAULT_MAX_PIXELS = 40_000_000
"""Larger images are refused from their header (a decompression bomb never reaches memory)."""


def fleet_image_input(fleet: FleetConfig) -> ImageInputConfig:
    """The fleet's input spec: `data.image`, or its data set's grey square."""
    if fleet.data.image is not None:
        return fleet.data.image
    side = DATASET_IMAGE_SIZES[fleet.data.dataset]
    return ImageInputConfig(channels=1, height=side, width=side)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 pixels `[H, W, 3]` (RGB) or `[H, W]` (grey), fully decoded.

    The header's width x height is checked against `max_pixels` before decoding; a truncated,
    corrupt, foreign or oversized image is a one-line `DataError`.
    """
    if not data:
        raise DataError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in ACCEPTED_FORMATS:
                    raise DataError(f"{image.format} image; only JPEG and PNG are read")
                width, height = image.size
                if width * height > max_pixels:
                    raise DataError(
                        f"{width}x{height} pixels exceeds the {max_pixels:,}-pixel bound"
                    )
                image.load()  # decodes now: a truncated file fails here, not later
                mode = "L" if image.mode in ("1", "L", "I;16", "I") else "RGB"
                return np.asarray(image.convert(mode), dtype=np.uint8)
    except UnidentifiedImageError:
        raise DataError("not a JPEG or PNG image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"corrupt or truncated image ({error})") from None
    except Image.DecompressionBombWarning as warning:
        raise DataError(f"image too large ({warning})") from None


def fit_pixels(pixels: np.ndarray, spec: ImageInputConfig) -> np.ndarray:
    """uint8 `[H, W]` / `[H, W, 3]` (RGB order) -> uint8 `[C, H', W']` at the spec's size."""
    if pixels.ndim not in (2, 3) or pixels.size == 0:
        raise DataError(f"image of shape {pixels.shape}; expected [H, W] or [H, W, 3]")
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    image = image.convert("L" if spec.channels == 1 else "RGB")
    target = (spec.width, spec.height)
    if spec.fit == "center_crop":
        scale = max(spec.width / image.width, spec.height / image.height)
        scaled = (
            max(spec.width, round(image.width * scale)),
            max(spec.height, round(image.height * scale)),
        )
        image = image.resize(scaled, Image.Resampling.BILINEAR)
        left, top = (scaled[0] - spec.width) // 2, (scaled[1] - spec.height) // 2
        image = image.crop((left, top, left + spec.width, top + spec.height))
    else:
        image = image.resize(target, Image.Resampling.BILINEAR)
    fitted = np.asarray(image, dtype=np.uint8)
    return fitted[None] if spec.channels == 1 else np.ascontiguousarray(fitted.transpose(2, 0, 1))


def normalise(fitted: np.ndarray) -> np.ndarray:
    """uint8 `[..., C, H, W]` -> float32 in [0, 1] (`x / 255`), as every reader scales."""
    return (fitted.astype(np.float32) / np.float32(255.0)).astype(np.float32)


def model_input(pixels: np.ndarray, spec: ImageInputConfig) -> np.ndarray:
    """Decoded pixels -> float32 `[C, H, W]` in [0, 1]: `normalise(fit_pixels(...))`."""
    return normalise(fit_pixels(pixels, spec))
