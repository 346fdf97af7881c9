"""DICOM codec: decoding (modality LUT -> VOI window -> 8-bit, grey repeated to 3 channels) and a minimal writer.

pydicom is an optional extra (``pip install 'shpeft[dicom]'``); it is imported on first use.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from tasks.codecs.images import DatasetError, array_to_rgb, to_uint8

__all__ = ["require_pydicom", "decode_dicom", "frame_to_rgb", "window_to_uint8", "is_dicom_bytes", "dicom_bytes"]


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
    """Linear VOI window (DICOM PS3.3 C.11.2.1.2.1, 'LINEAR') to 0..255, computed by pydicom's apply_windowing.

    The window goes to pydicom as its LINEAR_EXACT equivalent (center - 0.5, width - 1), so a width at or
    below 1 still maps (as a step) where pydicom's LINEAR refuses it; an unsigned 8-bit output range makes
    pydicom's output 0..255, which is then rounded.
    """
    require_pydicom()
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_windowing

    view = Dataset()
    view.PhotometricInterpretation = "MONOCHROME2"
    view.BitsStored = 8
    view.PixelRepresentation = 0
    view.VOILUTFunction = "LINEAR_EXACT"
    # FD rather than the tags' DS: a float kept as is, with no 16-character decimal string to fit into
    view.add_new(0x00281050, "FD", float(center) - 0.5)  # WindowCenter
    view.add_new(0x00281051, "FD", max(float(width) - 1, 1e-6))  # WindowWidth
    out = apply_windowing(np.asarray(values, dtype=np.float64), view)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _first(value) -> float:
    """WindowCenter/Width may hold several values; the first is the default view."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def frame_to_rgb(ds, frame: np.ndarray, where: str, window: tuple[float, float] | None = None) -> Image.Image:
    """One decoded frame of ``ds`` -> RGB image.

    Palette and colour frames are kept as stored; grey frames go through the modality LUT, then the VOI
    window ``window`` (center, width), else the file's first window, else its VOI LUT, else min-max, to
    8 bits (MONOCHROME1 inverted). The image's ``info['source_mode']`` is 'Modality/Photometric'.
    """
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    samples = int(ds.get("SamplesPerPixel", 1))
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    try:
        if photometric == "PALETTE COLOR":
            return _tagged(array_to_rgb(to_uint8(apply_color_lut(frame, ds)), where), ds, photometric)
        if samples == 3:
            # pydicom converts YBR to RGB by default when decoding.
            return _tagged(array_to_rgb(to_uint8(frame), where), ds, photometric)
        values = apply_modality_lut(frame, ds)
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


def decode_dicom(data: bytes, where: str, window: tuple[float, float] | None = None) -> Image.Image:
    """One DICOM file -> RGB image (see :func:`frame_to_rgb`). Multi-frame files give their middle frame."""
    pydicom = require_pydicom()

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
    if frames > 1:
        arr = arr[frames // 2]
    return frame_to_rgb(ds, arr, where, window)


def _tagged(img: Image.Image, ds, photometric: str) -> Image.Image:
    img.info["source_mode"] = f"{ds.get('Modality', '?')}/{photometric}"
    return img


def dicom_bytes(img: np.ndarray, *, modality: str, uid_seed: str) -> bytes:
    """A minimal valid Part 10 file. Grey images are stored as 12-bit values with a rescale and a
    VOI window, so readers must apply the modality LUT and window to get the 8-bit image back."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[uid_seed])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns = img.shape[:2]
    ds.PixelRepresentation = 0
    if img.ndim == 3:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = np.ascontiguousarray(img, dtype=np.uint8).tobytes()
    else:
        # stored = 8*v + 1024; rescale slope 0.125, intercept -128 -> modality values v - 128 in [-128, 127];
        # window centre 0 / width 256 maps that range back onto 0..255.
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.RescaleSlope, ds.RescaleIntercept = 0.125, -128
        ds.WindowCenter, ds.WindowWidth = 0.5, 256
        ds.PixelData = (img.astype(np.uint16) * 8 + 1024).astype("<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
