"""DICOM decoding: modality values -> VOI window -> 8-bit, grey repeated to 3 channels.

pydicom is an optional extra (``pip install 'shpeft[dicom]'``); it is imported on first use.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .images import DatasetError, array_to_rgb, to_uint8

__all__ = ["require_pydicom", "decode_dicom", "window_to_uint8", "is_dicom_bytes"]


def require_pydicom():
    try:
        import pydicom
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "format 'dicom' needs pydicom: pip install 'shpeft[dicom]' (or pip install pydicom)"
        ) from None
    return pydicom


def is_dicom_bytes(head: bytes) -> bool:
    """The Part 10 preamble: 128 bytes, then b'DICM'."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def window_to_uint8(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear VOI window (DICOM PS3.3 C.11.2.1.2.1, 'LINEAR') to 0..255."""
    v = values.astype(np.float64)
    w1 = max(width - 1, 1e-6)
    lo = center - 0.5 - w1 / 2
    hi = center - 0.5 + w1 / 2
    out = np.where(v <= lo, 0.0, np.where(v > hi, 255.0, ((v - (center - 0.5)) / w1 + 0.5) * 255.0))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _first(value) -> float:
    """WindowCenter/Width may hold several values; the first is the default view."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def decode_dicom(data: bytes, where: str, window: tuple[float, float] | None = None) -> Image.Image:
    """One DICOM file -> RGB image. Multi-frame files give their middle frame."""
    pydicom = require_pydicom()
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
        if "PixelData" not in ds:
            raise DatasetError(f"{where}: DICOM file has no pixel data (truncated, or not an image; SOP class {ds.get('SOPClassUID', '?')})")
        arr = ds.pixel_array
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"{where}: unreadable DICOM ({type(e).__name__}: {e})") from None

    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1))
    if frames > 1:
        arr = arr[frames // 2]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    try:
        if photometric == "PALETTE COLOR":
            return _tagged(array_to_rgb(to_uint8(apply_color_lut(arr, ds)), where), ds, photometric)
        if samples == 3:
            # pydicom converts YBR to RGB by default when decoding.
            return _tagged(array_to_rgb(to_uint8(arr), where), ds, photometric)
        values = apply_modality_lut(arr, ds)
        if window is not None:
            out = window_to_uint8(values, *window)
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            out = window_to_uint8(values, _first(ds.WindowCenter), _first(ds.WindowWidth))
        elif "VOILUTSequence" in ds:
            out = to_uint8(apply_voi_lut(values, ds, prefer_lut=True))
        else:
            out = to_uint8(values)
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"{where}: cannot window DICOM pixels ({type(e).__name__}: {e})") from None
    if photometric == "MONOCHROME1":  # 0 is white in MONOCHROME1
        out = 255 - out
    return _tagged(array_to_rgb(out, where), ds, photometric)


def _tagged(img: Image.Image, ds, photometric: str) -> Image.Image:
    img.info["source_mode"] = f"{ds.get('Modality', '?')}/{photometric}"
    return img
