"""Image codecs shared by every format: bytes -> 8-bit RGB PIL image (errors name the file), arrays -> PNG."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["DatasetError", "IMAGE_EXTENSIONS", "DICOM_EXTENSIONS", "decode_image", "encode_png", "array_to_rgb", "to_uint8"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
DICOM_EXTENSIONS = (".dcm", ".dicom")

# Refuse decompression bombs well above any medical image we expect (whole-slide images are tiled first).
Image.MAX_IMAGE_PIXELS = 20000 * 20000


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message names the file, row or field."""


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
        img = Image.open(io.BytesIO(data))
        img.load()
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
