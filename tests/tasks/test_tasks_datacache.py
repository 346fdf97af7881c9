"""Data read on demand and digests computed once: .npz images mapped or prepared once in the data cache,
ChestMNIST-style multi-label files, and fingerprints whose second computation reads no data bytes."""

import io
import os
import pickle

import numpy as np
import pytest

import tasks.datacache as datacache
import tasks.digests as digests
from shpeft_core import io as sio
from tasks.codecs.images import DatasetError
from tasks.datacache import NpyRows
from tasks.digests import file_digests
from tasks.fingerprint import dataset_fingerprint
from tasks.loaders import build_dataset
from tasks.spec import TaskSpec


def _npz(path, compressed=True, n=(20, 6, 6), multi=False, size=8):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 256, (k, size, size, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.random((k, 14)) < 0.3).astype(np.uint8) if multi else \
            (np.arange(k) % 3).reshape(-1, 1).astype(np.uint8)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return arrays


def _spec(path, **kw):
    return TaskSpec(**{"name": "npz", "source": str(path), "format": "medmnist", "num_classes": 3, **kw})


def test_compressed_split_is_prepared_once_in_the_cache_and_read_on_demand(tmp_path, monkeypatch):
    arrays = _npz(tmp_path / "d.npz")
    cache = str(tmp_path / "cache")
    prepared = []
    real = datacache._prepare
    monkeypatch.setattr(datacache, "_prepare", lambda *a: prepared.append(a[1]) or real(*a))
    ds = build_dataset(_spec(tmp_path / "d.npz"), "train", cache=cache)
    assert ds._images is None  # building a dataset reads headers and labels only
    assert isinstance(ds.images, NpyRows) and prepared == ["train_images"]
    for i in range(len(ds)):
        np.testing.assert_array_equal(np.asarray(ds.load_image(i)), arrays["train_images"][i])
    (digest,) = os.listdir(os.path.join(cache, "arrays"))
    assert digest == sio.sha256_file(str(tmp_path / "d.npz"))  # content-addressed by the archive's sha256
    assert sorted(os.listdir(os.path.join(cache, "arrays", digest))) == ["train_images.npy", "train_images.npy.json"]
    # another run, task or seed on the same archive: the prepared copy is reused, verified by its content key
    digests._MEMORY.clear()
    again = build_dataset(_spec(tmp_path / "d.npz", name="other"), "train", cache=cache)
    np.testing.assert_array_equal(np.asarray(again.load_image(3)), arrays["train_images"][3])
    assert prepared == ["train_images"]
    # a worker process gets the dataset without the mapping and maps it itself
    clone = pickle.loads(pickle.dumps(again))
    assert clone.images._map is None
    np.testing.assert_array_equal(np.asarray(clone.load_image(5)), arrays["train_images"][5])


def test_a_damaged_prepared_copy_is_prepared_again(tmp_path, monkeypatch):
    arrays = _npz(tmp_path / "d.npz")
    cache = str(tmp_path / "cache")
    ds = build_dataset(_spec(tmp_path / "d.npz"), "val", cache=cache)
    path = ds.images.uri
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF
    with open(path, "wb") as f:  # same size, new modification time: the digest is recomputed and differs
        f.write(bytes(data))
    digests._MEMORY.clear()
    fresh = build_dataset(_spec(tmp_path / "d.npz"), "val", cache=cache)
    np.testing.assert_array_equal(np.asarray(fresh.load_image(len(fresh) - 1)), arrays["val_images"][-1])


def test_an_uncompressed_archive_is_mapped_where_it_lies(tmp_path):
    arrays = _npz(tmp_path / "d.npz", compressed=False)
    cache = tmp_path / "cache"
    ds = build_dataset(_spec(tmp_path / "d.npz"), "test", cache=str(cache))
    assert ds.images.uri == str(tmp_path / "d.npz") and ds.images.offset > 0
    np.testing.assert_array_equal(np.asarray(ds.load_image(2)), arrays["test_images"][2])
    assert not cache.exists()


def test_remote_archives_are_read_by_ranges(tmp_path):
    import fsspec

    buf = io.BytesIO()
    arrays = _npz(buf)
    fsspec.filesystem("memory").pipe("/dc/d.npz", buf.getvalue())
    ds = build_dataset(_spec("memory://dc/d.npz"), "train", cache="memory://dc-cache")
    assert ds.images.uri.startswith("memory://dc-cache/arrays/")
    np.testing.assert_array_equal(np.asarray(ds.load_image(7)), arrays["train_images"][7])


def test_chestmnist_style_labels_are_native_findings(tmp_path):
    arrays = _npz(tmp_path / "chest.npz", multi=True)
    spec = _spec(tmp_path / "chest.npz", num_classes=14, kind="multi_label")
    ds = build_dataset(spec, "train", cache=str(tmp_path / "c"))
    assert ds.labels.dtype == np.float32 and ds.labels.shape == (20, 14)
    np.testing.assert_array_equal(ds.labels, arrays["train_labels"])
    _, target = ds[4]
    np.testing.assert_array_equal(target, arrays["train_labels"][4])
    with pytest.raises(DatasetError, match="set kind='multi_label'"):
        build_dataset(_spec(tmp_path / "chest.npz"), "train")
    with pytest.raises(DatasetError, match=r"needs \(N, 5\)"):
        build_dataset(_spec(tmp_path / "chest.npz", num_classes=5, kind="multi_label"), "train")


# ---------------------------------------------------------------- fingerprints computed once


def test_second_fingerprint_reads_no_data_bytes(family, tmp_path, monkeypatch):
    spec = family["imagefolder"]
    cache = str(tmp_path / "digests")
    first = dataset_fingerprint(spec, cache=cache)
    digests._MEMORY.clear()  # a new process: only the store's record is left

    def no_reads(*_):
        raise AssertionError("a data file was read")

    monkeypatch.setattr(digests, "hash_file", no_reads)
    assert dataset_fingerprint(spec, cache=cache) == first
    # without the record the bytes must be read again
    digests._MEMORY.clear()
    with pytest.raises(AssertionError, match="was read"):
        dataset_fingerprint(spec, cache=str(tmp_path / "empty"))


def test_changed_files_are_hashed_again_and_new_ones_by_the_given_hasher(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.bin").write_bytes(bytes([i]) * 100)
    import fsspec

    fs = fsspec.filesystem("file")
    paths = sorted(str(p) for p in root.iterdir())
    cache = str(tmp_path / "cache")
    seen = []

    def hasher(items):
        seen.append([os.path.basename(u) for u, _ in items])
        return [digests.hash_file(u) for u, _ in items]

    first = file_digests(fs, str(root), paths, cache=cache, hash_files=hasher)
    assert seen == [["0.bin", "1.bin", "2.bin"]]
    digests._MEMORY.clear()
    (root / "1.bin").write_bytes(b"\x07" * 100)  # same size, new content and modification time
    (root / "3.bin").write_bytes(b"new")
    second = file_digests(fs, str(root), paths + [str(root / "3.bin")], cache=cache, hash_files=hasher)
    assert seen[1] == ["1.bin", "3.bin"]
    assert second[paths[0]] == first[paths[0]] and second[paths[1]] != first[paths[1]]
    # a damaged record is ignored (everything hashed again), then rewritten
    record = next((tmp_path / "cache" / "digests").iterdir())
    record.write_text(record.read_text().replace('"files"', '"filez"'))
    digests._MEMORY.clear()
    file_digests(fs, str(root), paths, cache=cache, hash_files=hasher)
    assert seen[2] == ["0.bin", "1.bin", "2.bin"]
    digests._MEMORY.clear()
    file_digests(fs, str(root), paths, cache=cache, hash_files=hasher)
    assert len(seen) == 3
