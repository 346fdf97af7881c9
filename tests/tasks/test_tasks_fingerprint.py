import fsspec

from shpeft_core import io as sio
from tasks.fingerprint import dataset_fingerprint


def _copy(src, dst):
    fs = fsspec.filesystem("file")
    for p in fs.find(src):
        sio.atomic_write_bytes(dst + p[len(src.rstrip("/")) :], fs.cat_file(p))


def test_fingerprint_is_stable_and_covers_bytes_paths_and_fields(family, tmp_path):
    spec = family["imagefolder"]
    fp = dataset_fingerprint(spec)
    assert fp == dataset_fingerprint(spec) and len(fp) == 64
    # a copy elsewhere (even in memory://) keeps its fingerprint
    _copy(spec.source, "memory://fp-copy")
    assert dataset_fingerprint(spec.model_copy(update={"source": "memory://fp-copy", "name": "renamed"})) == fp
    # moving one image to another class folder changes the labels, hence the fingerprint
    dst = str(tmp_path / "moved")
    _copy(spec.source, dst)
    fs = fsspec.filesystem("file")
    first = sorted(p for p in fs.find(dst) if "/train/" + spec.class_names[0] + "/" in p)[0]
    fs.mv(first, first.replace("/train/" + spec.class_names[0] + "/", "/train/" + spec.class_names[1] + "/"))
    moved = spec.model_copy(update={"source": dst})
    assert dataset_fingerprint(moved) != fp
    # one changed byte changes it
    dst2 = str(tmp_path / "edited")
    _copy(spec.source, dst2)
    victim = sorted(fs.find(dst2))[-1]
    data = bytearray(fs.cat_file(victim))
    data[-5] ^= 1
    fs.pipe_file(victim, bytes(data))
    assert dataset_fingerprint(spec.model_copy(update={"source": dst2})) != fp


def test_fingerprint_depends_on_format_fields(family):
    pq = family["parquet"]
    assert dataset_fingerprint(pq) != dataset_fingerprint(pq.model_copy(update={"split_seed": 9}))
    npz = family["medmnist"]
    assert dataset_fingerprint(npz) == dataset_fingerprint(npz.model_copy(update={"modality": "other", "metric": "accuracy"}))
    d = family["dicom"]
    assert dataset_fingerprint(d) != dataset_fingerprint(d.model_copy(update={"window": (0.0, 100.0)}))
