import io
import os

import numpy as np
import pytest
from PIL import Image

from shpeft_core import io as sio
from tasks.codecs.images import DatasetError
from tasks.loaders import build_dataset, build_loader
from tasks.spec import TaskSpec
from tasks.check import check_dataset


def _png(value=0, size=8, mode="L"):
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size) if mode == "L" else (size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _tree(root, layout):
    for rel, data in layout.items():
        sio.atomic_write_bytes(os.path.join(root, rel), data)


def _folder_spec(root, **kw):
    return TaskSpec(**{"name": "t", "source": str(root), "format": "imagefolder", "num_classes": 2, **kw})


def _npz(path, **arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    sio.atomic_write_bytes(str(path), buf.getvalue())


def _npz_arrays(n=6, k=2):
    out = {}
    for s in ("train", "val", "test"):
        out[f"{s}_images"] = np.zeros((n, 8, 8), np.uint8)
        out[f"{s}_labels"] = (np.arange(n) % k).reshape(-1, 1).astype(np.uint8)
    return out


@pytest.mark.parametrize("fmt", ["medmnist", "imagefolder", "parquet", "dicom"])
def test_valid_synthetic_tasks_pass(family, fmt):
    spec = family[fmt]
    r = check_dataset(spec)
    assert r.label_range == (0, spec.num_classes - 1)
    assert sum(r.counts["train"]) > sum(r.counts["val"]) > 0
    assert r.image_sizes == {"32x32": r.total}
    assert sum(r.modes.values()) == r.total and len(r.fingerprint) == 64


def test_bytes_that_are_no_image_are_named_without_pillows_buffer(tmp_path):
    good = _png(1, 32)
    _tree(tmp_path, {f"train/{c}/{i}.png": good for c in "ab" for i in range(2)} | {
        f"{s}/{c}/0.png": good for s in ("val", "test") for c in "ab"})
    _tree(tmp_path, {"val/b/0.png": b"broken"})
    with pytest.raises(DatasetError, match=r"val/b/0\.png: unreadable image \(not in a format Pillow decodes; 6 bytes\)$"):
        check_dataset(_folder_spec(tmp_path))


def test_truncated_image_names_the_file(tmp_path):
    good = _png(1, 32)
    _tree(tmp_path, {f"train/{c}/{i}.png": good for c in "ab" for i in range(2)} | {
        f"{s}/{c}/0.png": good for s in ("val", "test") for c in "ab"})
    _tree(tmp_path, {"train/b/bad.png": good[: len(good) // 2]})
    with pytest.raises(DatasetError, match=r"train/b/bad\.png: unreadable image"):
        check_dataset(_folder_spec(tmp_path))


def test_class_with_no_images_is_named(tmp_path):
    _tree(tmp_path, {f"a/{i}.png": _png(i) for i in range(6)} | {f"b/{i}.png": _png(i) for i in range(6)})
    spec = _folder_spec(tmp_path, num_classes=3, class_names=["a", "b", "c"])
    with pytest.raises(DatasetError, match="class 'c'.*no images"):
        check_dataset(spec)


def test_class_folder_count_mismatch(tmp_path):
    _tree(tmp_path, {f"{c}/{i}.png": _png(i) for c in "abc" for i in range(3)})
    with pytest.raises(DatasetError, match=r"found 3 class folders \['a', 'b', 'c'\] but num_classes=2"):
        check_dataset(_folder_spec(tmp_path))


def test_classes_left_out_come_from_the_folders_as_torchvision_finds_them(tmp_path):
    """ImageFolder without num_classes / class_names: the sorted class folders, as torchvision's ImageFolder,
    and the resolved spec is the one written out by hand (same fingerprint)."""
    from torchvision.datasets import ImageFolder

    from tasks.classes import resolve_classes
    from tasks.fingerprint import dataset_fingerprint

    folders = ["very-coarse", "fine", "medium", "coarse"]
    _tree(tmp_path, {f"{c}/{i}.png": _png(i) for c in folders for i in range(7)})
    spec = TaskSpec(name="t", source=str(tmp_path), format="imagefolder")
    report = check_dataset(spec)
    assert report.classes_inferred and report.class_names == ImageFolder(str(tmp_path)).classes
    assert report.class_names == sorted(folders) and report.to_dict()["num_classes"] == 4
    assert [sum(report.counts[s][k] for s in report.counts) for k in range(4)] == [7, 7, 7, 7]
    written = TaskSpec(name="t", source=str(tmp_path), format="imagefolder", num_classes=4, class_names=sorted(folders))
    assert resolve_classes(spec) == written == resolve_classes(written)
    count_only = _folder_spec(tmp_path, num_classes=4)  # as before: checked against the folders, names '0'...
    assert resolve_classes(count_only) == count_only and check_dataset(count_only).class_names == sorted(folders)
    assert dataset_fingerprint(resolve_classes(spec)) == dataset_fingerprint(written)
    assert not check_dataset(written).classes_inferred
    # an explicit count is still checked against the folders
    with pytest.raises(DatasetError, match=r"found 4 class folders .* but num_classes=5; leave num_classes out"):
        check_dataset(_folder_spec(tmp_path, num_classes=5))


def test_one_class_folder_is_not_a_task(tmp_path):
    from tasks.classes import resolve_classes

    _tree(tmp_path, {f"only/{i}.png": _png(i) for i in range(6)})
    with pytest.raises(DatasetError, match=r"found 1 class folder \['only'\]; a classification task needs at least 2"):
        resolve_classes(TaskSpec(name="t", source=str(tmp_path), format="imagefolder"))


def test_dicom_folders_give_their_classes_too(family):
    from tasks.classes import resolve_classes

    written = family["dicom"]
    bare = TaskSpec.model_validate({**written.model_dump(), "num_classes": None, "class_names": None})
    got = resolve_classes(bare)
    assert got.class_names == sorted(written.class_names) and got.num_classes == written.num_classes
    assert check_dataset(bare, decode=False).total == check_dataset(written, decode=False).total


def test_empty_split_is_named(tmp_path):
    _tree(tmp_path, {f"train/{c}/{i}.png": _png(i) for c in "ab" for i in range(3)} | {
        f"test/{c}/0.png": _png() for c in "ab"})
    with pytest.raises(DatasetError, match="split 'val' is empty"):
        check_dataset(_folder_spec(tmp_path))


def test_wrong_format_guess_suggests_the_right_one(family):
    spec = family["parquet"].model_copy(update={"format": "imagefolder"})
    with pytest.raises(DatasetError, match="no image .*files found.*try --format parquet"):
        check_dataset(spec)
    spec = family["imagefolder"].model_copy(update={"format": "dicom"})
    with pytest.raises(DatasetError, match="try --format imagefolder"):
        check_dataset(spec)
    spec = family["dicom"].model_copy(update={"format": "parquet"})
    with pytest.raises(DatasetError, match="no .parquet files.*try --format dicom"):
        check_dataset(spec)


def test_medmnist_errors(tmp_path):
    arrays = _npz_arrays()
    arrays["val_labels"] = arrays["val_labels"][:5]
    _npz(tmp_path / "a.npz", **arrays)
    spec = TaskSpec(name="a", source=str(tmp_path / "a.npz"), format="medmnist", num_classes=2)
    with pytest.raises(DatasetError, match="'val_images' has 6 rows but 'val_labels' has 5"):
        check_dataset(spec)

    arrays = _npz_arrays()
    arrays["test_labels"][3, 0] = 7
    _npz(tmp_path / "b.npz", **arrays)
    with pytest.raises(DatasetError, match="'test_labels' row 3 has label 7, outside 0..1"):
        check_dataset(spec.model_copy(update={"source": str(tmp_path / "b.npz")}))

    arrays = _npz_arrays()
    del arrays["train_images"]
    _npz(tmp_path / "c.npz", **arrays)
    with pytest.raises(DatasetError, match="key 'train_images' missing"):
        build_dataset(spec.model_copy(update={"source": str(tmp_path / "c.npz")}), "train")

    arrays = _npz_arrays()
    arrays["train_labels"] = np.zeros((6, 14), np.uint8)
    arrays["train_labels"][2, 5] = 1
    _npz(tmp_path / "d.npz", **arrays)
    multi = spec.model_copy(update={"source": str(tmp_path / "d.npz")})
    with pytest.raises(DatasetError, match="multi-label"):
        build_dataset(multi, "train")
    binar = TaskSpec(name="d", source=str(tmp_path / "d.npz"), format="medmnist", num_classes=2, multilabel="any")
    assert build_dataset(binar, "train").labels == [0, 0, 1, 0, 0, 0]

    sio.atomic_write_bytes(str(tmp_path / "e.npz"), _png())
    with pytest.raises(DatasetError, match=r"e\.npz: not an .npz"):
        check_dataset(spec.model_copy(update={"source": str(tmp_path / "e.npz")}))


def test_parquet_label_out_of_range_names_file_and_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    img = _png()
    table = pa.table({"img": [img] * 12, "y": [0, 1] * 5 + [0, 9], "split": ["train"] * 10 + ["val", "test"]})
    pq.write_table(table, str(tmp_path / "part-0.parquet"), row_group_size=5)
    spec = TaskSpec(name="p", source=str(tmp_path), format="parquet", num_classes=2, image_column="img", label_column="y")
    with pytest.raises(DatasetError, match=r"part-0\.parquet: row group 2 row 1: y=9 is outside 0\.\.1"):
        check_dataset(spec)
    with pytest.raises(DatasetError, match=r"column 'image' \(image_column\) missing"):
        check_dataset(spec.model_copy(update={"image_column": "image"}))


def test_parquet_corrupt_image_fails_naming_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    imgs = [_png(i) for i in range(9)]
    imgs[4] = b"not an image"
    pq.write_table(pa.table({"image": imgs, "label": [0, 1, 0, 1, 0, 1, 0, 1, 0]}), str(tmp_path / "x.parquet"))
    spec = TaskSpec(name="p", source=str(tmp_path), format="parquet", num_classes=2, split_ratio=(0.34, 0.33, 0.33), split_seed=1)
    with pytest.raises(DatasetError, match=r"x\.parquet: row group 0 row 4: unreadable image"):
        check_dataset(spec)


def test_symlink_escaping_the_root_is_refused(tmp_path):
    root = tmp_path / "ds"
    _tree(root, {f"{c}/{i}.png": _png(i) for c in "ab" for i in range(4)})
    _tree(tmp_path, {"outside.png": _png(3)})
    os.symlink(tmp_path / "outside.png", root / "a" / "link.png")
    with pytest.raises(DatasetError, match=r"link\.png: resolves to .*outside the dataset folder"):
        check_dataset(_folder_spec(root))


def test_loader_raises_before_training_on_unknown_class_folder(tmp_path):
    _tree(tmp_path, {f"{c}/{i}.png": _png(i) for c in ("a", "b", "zz") for i in range(4)})
    spec = _folder_spec(tmp_path, class_names=["a", "b"])
    with pytest.raises(DatasetError, match=r"class folder\(s\) \['zz'\] are not in class_names"):
        build_loader(spec, "train", transform=None, batch_size=2)


def test_unreadable_dicom_is_named(tmp_path, family):
    spec = family["dicom"]
    import fsspec

    fs = fsspec.filesystem("file")
    first = sorted(fs.find(spec.source))[0]
    root = tmp_path / "dcm"
    for p in fs.find(spec.source):
        rel = p[len(spec.source.rstrip("/")) + 1 :]
        data = fs.cat_file(p)
        sio.atomic_write_bytes(str(root / rel), data[:-100] if p == first else data)
    bad = spec.model_copy(update={"source": str(root)})
    with pytest.raises(DatasetError, match=r"\.dcm: unreadable DICOM"):
        check_dataset(bad)


def test_parquet_hf_style_struct_images_and_string_labels(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    imgs = [{"bytes": _png(i * 20), "path": f"{i}.png"} for i in range(12)]
    names = ["benign", "malignant"] * 6
    pq.write_table(pa.table({"image": imgs, "label": names,
                             "split": ["train"] * 8 + ["validation"] * 2 + ["test"] * 2}), str(tmp_path / "hf.parquet"))
    spec = TaskSpec(name="hf", source=str(tmp_path), format="parquet", num_classes=2, class_names=["benign", "malignant"])
    r = check_dataset(spec)
    assert r.counts == {"train": [4, 4], "val": [1, 1], "test": [1, 1]}
    x, y = next(iter(build_loader(spec, "train", transform=None, batch_size=8)))
    assert x.shape == (8, 3, 8, 8) and sorted(y.tolist()) == [0] * 4 + [1] * 4
    with pytest.raises(DatasetError, match=r"row group 0 row 0: label='benign' is not an integer label"):
        check_dataset(spec.model_copy(update={"class_names": None}))


def test_ignored_files_are_reported(tmp_path):
    _tree(tmp_path, {f"{c}/{i}.png": _png(i) for c in "ab" for i in range(4)} | {"a/notes.txt": b"x"})
    r = check_dataset(_folder_spec(tmp_path))
    assert any("ignored 1 file" in w and "notes.txt" in w for w in r.warnings)


def test_parquet_split_column_rules_survive_a_json_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [_png(i) for i in range(30)], "label": [0, 1, 2] * 10}), str(tmp_path / "a.parquet"))
    spec = TaskSpec(name="p", source=str(tmp_path), format="parquet", num_classes=3)
    again = TaskSpec.model_validate_json(spec.model_dump_json())
    assert sum(sum(c) for c in check_dataset(again).counts.values()) == 30  # seeded split, no 'split' column needed
    with pytest.raises(DatasetError, match=r"column 'fold' \(split_column\) missing"):
        check_dataset(spec.model_copy(update={"split_column": "fold"}))
