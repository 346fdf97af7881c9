"""DICOM codec: decoding (modality LUT -> VOI window -> 8-bit, grey repeated to 3 channels) and a minimal writer.

pydicom is an optional extra (``pip install 'shpeft[dicom]'``); it is imported on first use. The pixel data
is decoded only after its declared size (rows x columns x frames x bytes per pixel) passed the pixel limit
of ``tasks.codecs.images``; non-finite values are refused.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
from PIL import Image

from tasks.codecs.images import DatasetError, array_to_rgb, check_finite, check_pixels, max_image_pixels, to_uint8

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
        check_finite(np.asarray(values), where)
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

    _check_deflated_size(data, where)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
        if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise DatasetError(f"{where}: DICOM file has no pixel data (truncated, or not an image; SOP class {ds.get('SOPClassUID', '?')})")
        _check_declared_size(ds, where)
        arr = ds.pixel_array
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"{where}: unreadable DICOM ({type(e).__name__}: {e})") from None

    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[frames // 2]
    return frame_to_rgb(ds, arr, where, window)


# Room for the elements besides the pixel data in a deflated dataset (overlays, private tags, ...).
_DEFLATED_SLACK = 16 << 20


def _check_deflated_size(data: bytes, where: str) -> None:
    """A deflated dataset (transfer syntax 1.2.840.10008.1.2.1.99) is inflated whole by pydicom before its
    header can be read: count what it inflates to, streaming, and refuse it above the pixel limit."""
    from pydicom.filereader import _read_file_meta_info, read_preamble  # no public reader of in-memory meta
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    fp = io.BytesIO(data)
    try:
        if read_preamble(fp, False) is None:
            return
        meta = _read_file_meta_info(fp)
    except Exception:  # not a Part 10 file: dcmread says what is wrong with it
        return
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    budget = max_image_pixels() + _DEFLATED_SLACK
    inflate = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        while chunk := fp.read(1 << 16):
            while chunk:
                total += len(inflate.decompress(chunk, 1 << 20))
                chunk = inflate.unconsumed_tail
                if total > budget:
                    raise DatasetError(f"{where}: deflated DICOM dataset inflates to over {budget:,} bytes, over "
                                       f"the pixel limit of {max_image_pixels():,} (set SHPEFT_MAX_IMAGE_PIXELS to "
                                       "allow larger images); not decoded")
    except zlib.error as exc:
        raise DatasetError(f"{where}: unreadable DICOM (deflated dataset: {exc})") from None


def _declared(ds, keyword: str, default: int, where: str) -> int:
    try:
        return int(ds.get(keyword, default) or default)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: DICOM {keyword} is not a number") from None


def _check_declared_size(ds, where: str) -> None:
    """What decoding would allocate, from the header alone: rows x columns x frames x bytes per pixel."""
    rows, cols = _declared(ds, "Rows", 0, where), _declared(ds, "Columns", 0, where)
    frames, samples = _declared(ds, "NumberOfFrames", 1, where), _declared(ds, "SamplesPerPixel", 1, where)
    bits = _declared(ds, "BitsAllocated", 8, where)
    if min(rows, cols, frames, samples, bits) < 1:
        raise DatasetError(f"{where}: DICOM header declares {rows}x{cols} pixels, {frames} frame(s), {samples} "
                           f"sample(s) of {bits} bits; not an image")
    per_pixel = samples * -(-bits // 8)
    check_pixels(where, rows * cols * frames * per_pixel,
                 f"DICOM pixel data of {rows}x{cols} x {frames} frame(s) x {per_pixel} byte(s) per pixel")


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
