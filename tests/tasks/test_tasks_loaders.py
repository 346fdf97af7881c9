import io

import numpy as np
import pytest
import torch
from PIL import Image

from shpeft_core import io as sio
from tasks.loaders import build_dataset, build_loader
from tasks.spec import TaskSpec
from tasks.synthetic import render_task, task_family
from tasks.transforms import transform_for


def _collect(loader):
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("fmt", ["medmnist", "imagefolder", "parquet", "dicom"])
def test_every_format_yields_rgb_float_batches(family, fmt):
    spec = family[fmt]
    loader = build_loader(spec, "train", transform=None, batch_size=16, shuffle=True, seed=1)
    x, y = next(iter(loader))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= int(y.min()) and int(y.max()) < spec.num_classes
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_formats_hold_the_same_pixels(family_root):
    """The same task written as npz and as parquet decodes to identical images and labels."""
    from tasks.synthetic import write_task

    t = task_family(1, image_size=32, images_per_task=40, seed=5)[0]
    a = write_task(family_root + "/same-npz", t, "medmnist")
    b = write_task(family_root + "/same-pq", t, "parquet")
    c = write_task(family_root + "/same-if", t, "imagefolder")
    ref = render_task(t)["val"]
    for spec in (a, b, c):
        ds = build_dataset(spec, "val", None)
        got = sorted((np.asarray(img).tobytes(), lab) for img, lab in (ds if spec.format == "parquet" else (ds[i] for i in range(len(ds)))))
        imgs = ref[0] if ref[0].ndim == 4 else np.repeat(ref[0][..., None], 3, -1)
        want = sorted((im.tobytes(), int(lab)) for im, lab in zip(imgs, ref[1]))
        assert got == want, spec.format


def test_dicom_window_recovers_8bit_values(family):
    spec = family["dicom"]
    ds = build_dataset(spec, "train", None)
    img = np.asarray(ds.load_image(0))
    # the writer stores 8*v + 1024 with slope 1/8, intercept -128 and window 0.5/256: v comes back exactly
    fs_path = ds.items[0][0]
    import pydicom

    raw = pydicom.dcmread(fs_path)
    stored = raw.pixel_array
    if stored.ndim == 2:
        expect = (stored.astype(int) - 1024) // 8
        assert np.array_equal(img[..., 0], expect) and np.array_equal(img[..., 0], img[..., 2])
    else:
        assert np.array_equal(img, stored)


def test_npz_grey_and_rgb_at_official_sizes(tmp_path):
    rng = np.random.default_rng(0)
    for size, rgb in ((28, False), (64, True)):
        shape = (10, size, size, 3) if rgb else (10, size, size)
        arrays = {}
        for s in ("train", "val", "test"):
            arrays[f"{s}_images"] = rng.integers(0, 255, shape, dtype=np.uint8)
            arrays[f"{s}_labels"] = (np.arange(10) % 3).reshape(-1, 1).astype(np.uint8)
        fname = "toymnist.npz" if size == 28 else f"toymnist_{size}.npz"
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        sio.atomic_write_bytes(str(tmp_path / fname), buf.getvalue())
        spec = TaskSpec(name="toymnist", source=str(tmp_path), format="medmnist", num_classes=3, image_size=size)
        ds = build_dataset(spec, "test", None)
        img, lab = ds[4]
        assert img.size == (size, size) and img.mode == "RGB" and lab == 1
        src = arrays["test_images"][4]
        np.testing.assert_array_equal(np.asarray(img), src if rgb else np.repeat(src[..., None], 3, -1))


def test_imagefolder_class_layout_gets_seeded_stratified_split(tmp_path):
    for c, n in (("a", 20), ("b", 10)):
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(np.full((8, 8), i * 10, np.uint8)).save(buf, format="PNG")
            sio.atomic_write_bytes(str(tmp_path / c / f"{i}.png"), buf.getvalue())
    spec = TaskSpec(name="t", source=str(tmp_path), format="imagefolder", num_classes=2, split_seed=3)
    splits = {s: build_dataset(spec, s, None).items for s in ("train", "val", "test")}
    all_paths = [p for s in splits.values() for p, _ in s]
    assert len(all_paths) == 30 and len(set(all_paths)) == 30
    assert sorted(lab for _, lab in splits["val"]) == [0, 0, 0, 1, 1]
    again = build_dataset(spec, "val", None).items
    other = build_dataset(spec.model_copy(update={"split_seed": 4}), "val", None).items
    assert again == splits["val"] and other != splits["val"]


@pytest.mark.parametrize("fmt", ["medmnist", "parquet"])
def test_rank_shards_are_disjoint_cover_and_equal(family, fmt):
    spec = family[fmt]
    full = _collect(build_loader(spec, "train", transform=None, batch_size=7))
    n = len(full[1])
    shards = [_collect(build_loader(spec, "train", transform=None, batch_size=7, shuffle=True, seed=2, rank=r, world_size=3, num_workers=2 if r == 1 else 0)) for r in range(3)]
    sizes = {len(s[1]) for s in shards}
    assert sizes == {-(-n // 3)}  # every rank the same count (ceil)
    key = lambda x: x.flatten(1).mul(255).round().to(torch.int64)  # noqa: E731
    seen = {tuple(row.tolist()) for s in shards for row in key(s[0])}
    assert seen == {tuple(row.tolist()) for row in key(full[0])}


@pytest.mark.parametrize("fmt", ["medmnist", "parquet"])
def test_shuffle_is_seeded_and_changes_per_epoch(family, fmt):
    spec = family[fmt]
    mk = lambda seed: build_loader(spec, "train", transform=None, batch_size=64, shuffle=True, seed=seed)  # noqa: E731
    l1, l2 = mk(0), mk(0)
    e0a, e0b = next(iter(l1))[1], next(iter(l2))[1]
    assert torch.equal(e0a, e0b)
    e1 = next(iter(l1))[1]
    assert not torch.equal(e0a, e1)
    assert not torch.equal(e0a, next(iter(mk(1)))[1])
    l2.set_epoch(1)
    assert torch.equal(next(iter(l2))[1], e1)


def test_worker_processes_give_same_samples(family):
    spec = family["imagefolder"]
    a = _collect(build_loader(spec, "val", transform=None, batch_size=8))
    b = _collect(build_loader(spec, "val", transform=None, batch_size=8, num_workers=2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_parquet_over_memory_filesystem(family):
    import fsspec

    spec = family["parquet"]
    local = fsspec.filesystem("file")
    for p in local.find(spec.source):
        sio.atomic_write_bytes("memory://pq-copy/" + p.rsplit("/", 1)[-1], local.cat_file(p))
    mem = spec.model_copy(update={"source": "memory://pq-copy"})
    a = _collect(build_loader(spec, "test", transform=None, batch_size=8))
    b = _collect(build_loader(mem, "test", transform=None, batch_size=8))
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


def test_transform_for_uses_backbone_data_config(family):
    import timm

    model = timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32)
    t_eval = transform_for(model, train=False)
    t_train = transform_for(model, train=True)
    spec = family["medmnist"]
    x, _ = next(iter(build_loader(spec, "val", transform=t_eval, batch_size=4)))
    assert x.shape[1:] == (3, 32, 32)  # the size the model was built for
    assert float(x.min()) < 0  # normalised with the model's mean/std
    x2, _ = next(iter(build_loader(spec, "train", transform=t_train, batch_size=4)))
    assert x2.shape[1:] == (3, 32, 32)
    assert transform_for({"input_size": (3, 48, 48)}, train=False)(Image.new("RGB", (32, 32))).shape == (3, 48, 48)


@pytest.mark.parametrize("fmt", ["imagefolder", "parquet"])
def test_epoch_order_is_the_same_with_worker_processes(family, fmt):
    spec = family[fmt]
    l0 = build_loader(spec, "train", transform=None, batch_size=8, shuffle=True, seed=4)
    l2 = build_loader(spec, "train", transform=None, batch_size=8, shuffle=True, seed=4, num_workers=2)
    e0 = [_collect(l0)[1] for _ in range(2)]
    e2 = [_collect(l2)[1] for _ in range(2)]
    assert not torch.equal(e0[0], e0[1])
    if fmt == "imagefolder":  # map-style: same sampler order regardless of workers
        assert torch.equal(e0[0], e2[0]) and torch.equal(e0[1], e2[1])
    else:  # streams: per-worker ranges, same multiset of samples each epoch
        assert sorted(e0[0].tolist()) == sorted(e2[0].tolist()) and not torch.equal(e2[0], e2[1])


def test_seeded_split_is_stable_when_a_file_is_added(tmp_path):
    def png(v):
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8), v, np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    for c in ("a", "b"):
        for i in range(40):
            sio.atomic_write_bytes(str(tmp_path / c / f"{i:03d}.png"), png(i))
    spec = TaskSpec(name="t", source=str(tmp_path), format="imagefolder", num_classes=2)

    def split_of():
        return {p: s for s in ("train", "val", "test") for p, _ in build_dataset(spec, s, None).items}

    before = split_of()
    sio.atomic_write_bytes(str(tmp_path / "a" / "new.png"), png(200))
    after = split_of()
    moved = [p for p in before if before[p] != after[p]]
    assert len(after) == 81 and len(moved) <= 2


def test_transform_for_uses_the_size_the_model_was_built_for():
    import timm
    from PIL import Image

    from tasks.transforms import transform_for

    model = timm.create_model("test_vit", img_size=32, patch_size=4)
    img = Image.new("RGB", (57, 40), (10, 200, 30))
    for train in (True, False):
        x = transform_for(model, train=train)(img)
        assert tuple(x.shape) == (3, 32, 32)
        # and the model accepts it
        assert model(x[None]).shape[0] == 1
    stock = timm.create_model("test_vit")  # built at its pretrained size: timm's config applies as is
    assert tuple(transform_for(stock, train=False)(img).shape) == (3, 160, 160)
