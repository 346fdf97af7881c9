import numpy as np
import pytest

from tasks.codecs.dicom import decode_dicom, window_to_uint8
from tasks.codecs.images import DatasetError


def _real(name):
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} not installed")
    with open(path, "rb") as f:
        return f.read()


def test_linear_window_matches_dicom_formula_float64():
    v = np.linspace(-1200, 1200, 4001)
    c, w = 40.0, 400.0
    got = window_to_uint8(v, c, w)
    # PS3.3 C.11.2.1.2.1 with output range 0..255, computed independently in float64
    ref = np.empty_like(v)
    for i, x in enumerate(v):
        if x <= c - 0.5 - (w - 1) / 2:
            ref[i] = 0
        elif x > c - 0.5 + (w - 1) / 2:
            ref[i] = 255
        else:
            ref[i] = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
    assert np.array_equal(got, np.clip(np.floor(ref + 0.5), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("name,modality", [
    ("CT_small.dcm", "CT/MONOCHROME2"),
    ("MR_small.dcm", "MR/MONOCHROME2"),
    ("examples_palette.dcm", "US/PALETTE COLOR"),
    ("US1_UNCR.dcm", "US/RGB"),
    ("emri_small.dcm", "MR/MONOCHROME2"),
])
def test_real_dicom_files_decode_to_rgb(name, modality):
    img = decode_dicom(_real(name), name)
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.ndim == 3 and arr.std() > 5
    assert img.info["source_mode"] == modality
    if modality.endswith("MONOCHROME2"):
        assert np.array_equal(arr[..., 0], arr[..., 1])


def test_explicit_window_changes_contrast():
    data = _real("CT_small.dcm")
    narrow = np.asarray(decode_dicom(data, "ct", window=(40.0, 80.0)))[..., 0]
    wide = np.asarray(decode_dicom(data, "ct", window=(40.0, 2000.0)))[..., 0]
    assert (narrow == 0).mean() + (narrow == 255).mean() > (wide == 0).mean() + (wide == 255).mean()


def test_dicom_without_pixels_is_named():
    with pytest.raises(DatasetError, match="rtplan.dcm: DICOM file has no pixel data"):
        decode_dicom(_real("rtplan.dcm"), "rtplan.dcm")
    with pytest.raises(DatasetError, match="x.dcm: unreadable DICOM"):
        decode_dicom(b"\0" * 50, "x.dcm")
