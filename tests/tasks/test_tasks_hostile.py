"""Hostile and unlucky datasets: decompression bombs, non-finite pixels, FIFOs and devices, names that are not
UTF-8, paths in data rows, empty or missing files. Each is one DatasetError naming the file, found before
anything large is allocated or anything blocks.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import tracemalloc
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from shpeft_core import io as sio
from tasks.check import check_dataset
from tasks.codecs.dicom import decode_dicom
from tasks.codecs.images import DEFAULT_MAX_IMAGE_PIXELS, DatasetError, decode_image, set_max_image_pixels
from tasks.fingerprint import dataset_fingerprint
from tasks.formats.files import resolve_data_path
from tasks.loaders import build_dataset
from tasks.spec import TaskSpec

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _default_limit():
    set_max_image_pixels(None)
    yield
    set_max_image_pixels(None)


def _png(value=0, size=8):
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root, n=3):
    for c in "ab":
        for i in range(n):
            sio.atomic_write_bytes(os.path.join(root, c, f"{i}.png"), _png(i))
    return TaskSpec(name="t", source=str(root), format="imagefolder", num_classes=2)


def _png_header_bomb(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height grey pixels, followed by a short zlib stream of zeros."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(bytes(1 << 20), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_png_bomb_between_pillow_limits_is_refused_before_decoding():
    data = _png_header_bomb(27000, 27000)  # 729 Mpx declared, ~1 KB on disk
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match=r"scan\.png: image of 27000x27000: 729,000,000 pixels, over the limit"):
            decode_image(data, "scan.png")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"{peak:,} bytes allocated for a refused image"


def test_pixel_limit_is_configurable(monkeypatch):
    data = _png(size=64)
    assert decode_image(data, "a.png").size == (64, 64)
    monkeypatch.setenv("SHPEFT_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(DatasetError, match="4,096 pixels, over the limit of 1,000"):
        decode_image(data, "a.png")
    monkeypatch.delenv("SHPEFT_MAX_IMAGE_PIXELS")
    assert DEFAULT_MAX_IMAGE_PIXELS >= 50_000_000


def _dicom(rows: int, cols: int, pixel_data: bytes, *, deflated: bool, frames: int = 1) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, SecondaryCaptureImageStorage,
                             generate_uid)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["bomb"])
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = rows, cols
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelData = pixel_data
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_deflated_dicom_bomb_is_refused_without_inflating_it_into_memory():
    pytest.importorskip("pydicom")
    data = _dicom(8000, 8000, bytes(8000 * 8000 * 2), deflated=True)  # 128 MB of pixels
    assert len(data) < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match=r"^bomb\.dcm: .*100,000,000.*SHPEFT_MAX_IMAGE_PIXELS"):
            decode_dicom(data, "bomb.dcm")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"{peak:,} bytes allocated for a refused DICOM"


def test_dicom_header_counts_rows_columns_frames_and_bytes():
    pytest.importorskip("pydicom")
    # Declares 8000 x 8000 x 2 bytes; the pixel data itself is short (never decoded).
    data = _dicom(8000, 8000, bytes(64), deflated=False)
    with pytest.raises(DatasetError, match=r"8000x8000 x 1 frame\(s\) x 2 byte\(s\) per pixel: 128,000,000 pixels"):
        decode_dicom(data, "big.dcm")
    small = _dicom(16, 16, bytes(16 * 16 * 2 * 4), deflated=False, frames=4)
    assert decode_dicom(small, "ok.dcm").size == (16, 16)
    set_max_image_pixels(16 * 16 * 2 * 4 - 1)  # frames count
    with pytest.raises(DatasetError, match="x 4 frame"):
        decode_dicom(small, "ok.dcm")


@pytest.mark.parametrize("case", ["inf", "nan"])
def test_float_tiff_with_non_finite_pixels_names_the_file(case):
    arr = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    if case == "inf":
        arr[3, 3] = np.inf
    else:
        arr[:] = np.nan
    buf = io.BytesIO()
    Image.fromarray(arr, mode="F").save(buf, format="TIFF")
    with pytest.raises(DatasetError, match=r"ct\.tif: image has \d+ NaN or infinite pixel value"):
        decode_image(buf.getvalue(), "ct.tif")


def test_fifo_in_a_dataset_is_refused_by_the_listing(tmp_path):
    spec = _folder(tmp_path / "ds")
    os.mkfifo(tmp_path / "ds" / "a" / "stuck.png")
    # what `shpeft validate` runs (no decoding): it said ok before
    with pytest.raises(DatasetError, match=r"stuck\.png: is a FIFO, not a regular file"):
        check_dataset(spec, decode=False, fingerprint=False)
    os.symlink("/dev/zero", tmp_path / "ds" / "b" / "zero.png")
    os.unlink(tmp_path / "ds" / "a" / "stuck.png")
    with pytest.raises(DatasetError, match=r"zero\.png: is a character device"):
        build_dataset(spec, "train")


def test_tasks_check_on_a_fifo_exits_2_with_one_line(tmp_path):
    _folder(tmp_path / "ds")
    os.mkfifo(tmp_path / "ds" / "a" / "stuck.png")
    proc = subprocess.run([sys.executable, "-c", "from orchestrator.cli.main import main; main()", "tasks", "check",
                           str(tmp_path / "ds"), "--format", "imagefolder", "--num-classes", "2"],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "stuck.png: is a FIFO" in lines[0] and "Traceback" not in proc.stderr


def test_non_utf8_file_name_is_one_error_naming_it(tmp_path):
    spec = _folder(tmp_path / "ds")
    bad = os.path.join(os.fsencode(tmp_path / "ds" / "a"), b"scan-\xff\xfe.png")
    with open(bad, "wb") as f:
        f.write(_png(9))
    with pytest.raises(DatasetError, match="scan-\ufffd\ufffd.png: file name is not valid UTF-8") as info:
        check_dataset(spec, decode=False, fingerprint=False)
    str(info.value).encode("utf-8")  # printable
    with pytest.raises(DatasetError, match="not valid UTF-8"):
        dataset_fingerprint(spec)


def _npz_bytes(n=4, size=8):
    buf = io.BytesIO()
    arrays = {}
    for s in ("train", "val", "test"):
        arrays[f"{s}_images"] = np.zeros((n, size, size), np.uint8)
        arrays[f"{s}_labels"] = (np.arange(n) % 2).reshape(-1, 1).astype(np.uint8)
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def test_npz_images_are_checked_against_the_limit_before_reading(tmp_path):
    path = tmp_path / "t.npz"
    path.write_bytes(_npz_bytes(size=28))
    spec = TaskSpec(name="t", source=str(path), format="medmnist", num_classes=2)
    assert len(build_dataset(spec, "train")) == 4
    set_max_image_pixels(28 * 28 - 1)
    with pytest.raises(DatasetError, match=r"t\.npz: 'train_images': each image is 28x28: 784 pixels, over the limit"):
        build_dataset(spec, "train")


def test_empty_npz_is_called_empty_not_another_format(tmp_path):
    path = tmp_path / "t.npz"
    path.write_bytes(b"")
    spec = TaskSpec(name="t", source=str(path), format="medmnist", num_classes=2)
    with pytest.raises(DatasetError) as info:
        build_dataset(spec, "train")
    assert "is empty (0 bytes)" in str(info.value) and "try --format medmnist" not in str(info.value)
    path.write_bytes(b"not a zip")
    with pytest.raises(DatasetError) as info:
        build_dataset(spec, "train")
    assert "not an .npz" in str(info.value) and "try --format medmnist" not in str(info.value)


def test_missing_npz_of_an_unofficial_size_is_named_as_missing(tmp_path):
    missing = tmp_path / "mine.npz"
    spec = TaskSpec(name="t", source=str(missing), format="medmnist", num_classes=2, image_size=32)
    with pytest.raises(DatasetError) as info:
        check_dataset(spec, decode=False, fingerprint=False)
    assert str(info.value).startswith(f"{missing}: no such file")


def test_npz_fifo_is_refused(tmp_path):
    import threading

    fifo = tmp_path / "t.npz"
    os.mkfifo(fifo)
    spec = TaskSpec(name="t", source=str(fifo), format="medmnist", num_classes=2)
    got: dict = {}

    def check():
        try:
            check_dataset(spec, decode=False, fingerprint=False)
        except Exception as exc:  # what the check said
            got["error"] = exc

    t = threading.Thread(target=check, daemon=True)
    t.start()
    t.join(20)
    blocked = t.is_alive()
    if blocked:  # release the reader before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert not blocked, "reading the FIFO blocked"
    assert isinstance(got.get("error"), DatasetError) and "is a FIFO" in str(got["error"])


def _parquet(path, images, labels):
    table = pa.table({"image": images, "label": pa.array(labels, pa.int64())})
    pq.write_table(table, str(path))


def test_parquet_file_without_the_image_column_is_named_when_indexing(tmp_path):
    root = tmp_path / "pq"
    root.mkdir()
    _parquet(root / "part-0.parquet", pa.array([_png(i) for i in range(6)], pa.binary()), [0, 1] * 3)
    pq.write_table(pa.table({"label": pa.array([0, 1], pa.int64())}), str(root / "part-1.parquet"))
    spec = TaskSpec(name="t", source=str(root), format="parquet", num_classes=2)
    with pytest.raises(DatasetError, match=r"part-1\.parquet: column 'image' \(image_column\) missing"):
        build_dataset(spec, "train")


def test_parquet_image_struct_without_bytes_is_an_error_not_a_path_read(tmp_path):
    root = tmp_path / "pq"
    root.mkdir()
    struct_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([{"bytes": None, "path": "/etc/passwd"}] * 20, struct_type)
    _parquet(root / "part-0.parquet", images, [0, 1] * 10)
    spec = TaskSpec(name="t", source=str(root), format="parquet", num_classes=2)
    with pytest.raises(DatasetError, match=r"row \d+: column 'image' holds no image bytes"):
        next(iter(build_dataset(spec, "train").iter_raw()))


def test_data_paths_resolve_inside_their_root(tmp_path):
    import fsspec

    fs = fsspec.filesystem("file")
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    (root / "img" / "a.png").write_bytes(_png())
    os.symlink("/etc", root / "etc-link")
    ok = resolve_data_path(fs, str(root), "img/a.png", where="row 0")
    assert ok == str(root / "img" / "a.png")
    for value in ("../outside.png", "/etc/passwd", "etc-link/passwd", "img/../../x.png", "/missing-dir/y.png"):
        with pytest.raises(DatasetError) as info:
            resolve_data_path(fs, str(root), value, where="row 1")
        msg = str(info.value)
        assert "outside the data root" in msg and "exist" not in msg and "bytes" not in msg
    with pytest.raises(DatasetError, match="is a URL; URLs in data are read only with --allow-urls"):
        resolve_data_path(fs, str(root), "http://127.0.0.1:1/x.png", where="row 2")
    assert resolve_data_path(fs, str(root), "http://127.0.0.1:1/x.png", where="r", allow_urls=True).startswith("http")
    mem = fsspec.filesystem("memory")
    assert resolve_data_path(mem, "/bucket/data", "img/a.png", where="r") == "memory:///bucket/data/img/a.png"
    with pytest.raises(DatasetError, match="outside the data root"):
        resolve_data_path(mem, "/bucket/data", "../other/a.png", where="r")
