"""Image codecs shared by every format: bytes -> 8-bit RGB PIL image (errors name the file), arrays -> PNG.

Invariants: every decoder checks the image's size from its header against one pixel limit
(``max_image_pixels()``: ``SHPEFT_MAX_IMAGE_PIXELS`` or ``DEFAULT_MAX_IMAGE_PIXELS``) BEFORE decoding, so a
small compressed file cannot make a reader allocate gigabytes; images with NaN or infinite pixel values are
refused. Both are a DatasetError naming the file.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["DatasetError", "IMAGE_EXTENSIONS", "DICOM_EXTENSIONS", "DEFAULT_MAX_IMAGE_PIXELS", "MAX_PIXELS_ENV",
           "max_image_pixels", "set_max_image_pixels", "check_pixels", "check_finite", "decode_image", "encode_png",
           "array_to_rgb", "to_uint8"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
DICOM_EXTENSIONS = (".dcm", ".dicom")

# 100 megapixels: above any single medical image we expect (whole-slide images are tiled first), and a
# bound on what one file may make a reader allocate (~300 MB as 8-bit RGB).
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
MAX_PIXELS_ENV = "SHPEFT_MAX_IMAGE_PIXELS"
_limit: int | None = None  # set_max_image_pixels(); else the environment, else the default
# Pillow's own check would refuse at open (above twice its limit) or only warn (between its limit and twice
# that); decode_image checks the declared size against max_image_pixels() itself, before decoding.
Image.MAX_IMAGE_PIXELS = None


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message names the file, row or field."""


def max_image_pixels() -> int:
    """The pixel limit every decoder enforces before decoding."""
    if _limit is not None:
        return _limit
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        raise DatasetError(f"{MAX_PIXELS_ENV}={raw!r} is not a number of pixels") from None
    if value < 1:
        raise DatasetError(f"{MAX_PIXELS_ENV}={raw!r} must be at least 1")
    return value


def set_max_image_pixels(value: int | None) -> None:
    """Set the pixel limit for this process (None: back to the environment / default)."""
    global _limit
    if value is not None and int(value) < 1:
        raise DatasetError(f"the pixel limit must be at least 1, got {value}")
    _limit = None if value is None else int(value)


def check_pixels(where: str, pixels: int, what: str) -> None:
    """DatasetError naming ``where`` when ``pixels`` (what the header declares) is over the limit."""
    limit = max_image_pixels()
    if pixels > limit:
        raise DatasetError(f"{where}: {what}: {pixels:,} pixels, over the limit of {limit:,} "
                           f"(set {MAX_PIXELS_ENV} to allow larger images); not decoded")


def check_finite(arr: np.ndarray, where: str) -> None:
    """DatasetError naming ``where`` when a float image holds NaN or infinite values."""
    if np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating):
        bad = ~np.isfinite(arr)
        if bad.any():
            raise DatasetError(f"{where}: image has {int(bad.sum()):,} NaN or infinite pixel value(s)")


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Min-max scale any numeric array to uint8 (uint8 input is returned unchanged)."""
    if arr.dtype == np.uint8:
        return arr
    a = arr.astype(np.float64)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.clip((a - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


def array_to_rgb(arr: np.ndarray, where: str) -> Image.Image:
    """(H,W), (H,W,1) or (H,W,3) array -> RGB image; grey is repeated to 3 channels."""
    check_finite(arr, where)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        img = Image.fromarray(to_uint8(arr)).convert("RGB")
        img.info["source_mode"] = "L"
        return img
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        img = Image.fromarray(to_uint8(np.ascontiguousarray(arr[..., :3])))
        img.info["source_mode"] = "RGB"
        return img
    raise DatasetError(f"{where}: image array has shape {arr.shape}; expected (H,W), (H,W,1) or (H,W,3)")


def decode_image(data: bytes, where: str) -> Image.Image:
    """Decode encoded image bytes fully (truncation is caught here, not mid-training)."""
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        check_pixels(where, img.size[0] * img.size[1], f"image of {img.size[0]}x{img.size[1]}")
        img.load()
    except DatasetError:
        raise
    except UnidentifiedImageError:  # Pillow's own message only names its in-memory buffer
        raise DatasetError(f"{where}: unreadable image (not in a format Pillow decodes; {len(data):,} bytes)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{where}: unreadable image ({type(e).__name__}: {e})") from None
    mode = img.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        out = array_to_rgb(np.asarray(img), where)
    else:
        out = img if mode == "RGB" else img.convert("RGB")
    out.info["source_mode"] = mode
    return out


def encode_png(img: np.ndarray) -> bytes:
    """A uint8 (H,W) grey or (H,W,3) RGB array as PNG bytes (lossless: decode_image gives it back)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()
