"""A tiny task of real medical images that installed packages ship (works offline).

Sources: pydicom's and pydicom-data's test files (CT, MR, CR, US, NM), deduplicated because many are
the same image re-encoded, and scikit-image's immunohistochemistry (histology), retina (fundus) and
cell (microscopy) images. Each unique image is cut into a few random patches; the label is the
modality. Tiny (a few hundred patches from a few dozen source images): a smoke test on real pixels,
not a benchmark. Patches of one source image can land in different splits.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os

import numpy as np

from shpeft_core import io as sio
from shpeft_core.options import DEFAULT_METRIC

from .spec import TaskSpec

__all__ = ["REAL_SAMPLE_CLASSES", "real_sample_images", "write_real_sample_task"]

REAL_SAMPLE_CLASSES = ("ct", "mr", "xray", "ultrasound", "nm", "histology", "fundus", "microscopy")
_DICOM_CLASS = {"CT": "ct", "MR": "mr", "CR": "xray", "DX": "xray", "US": "ultrasound", "NM": "nm"}


def _dicom_dirs() -> list[str]:
    dirs = []
    for pkg, sub in (("pydicom", "data/test_files"), ("data_store", "data")):
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.submodule_search_locations:
            d = os.path.join(list(spec.submodule_search_locations)[0], sub)
            if os.path.isdir(d):
                dirs.append(d)
    return dirs


def _thumb(img) -> np.ndarray:
    from PIL import Image

    return np.asarray(img.convert("L").resize((32, 32), Image.BILINEAR), dtype=np.float32)


def real_sample_images(max_frames: int = 3) -> list[tuple[str, str, object]]:
    """(class, source name, RGB PIL image) for every unique real image found, sorted by source name."""
    import warnings

    from tasks.codecs.dicom import decode_dicom, frame_to_rgb, require_pydicom
    from tasks.codecs.images import DatasetError, array_to_rgb

    pydicom = require_pydicom()
    out: list[tuple[str, str, object]] = []
    thumbs: dict[str, list[np.ndarray]] = {}

    def keep(cls: str, name: str, img) -> None:
        t = _thumb(img)
        if t.std() < 4:  # blank frames carry no modality signal
            return
        # re-encodings (lossless or lossy) of one image differ by a few grey levels at most
        if any(np.abs(t - u).mean() < 6.0 for u in thumbs.get(cls, [])):
            return
        thumbs.setdefault(cls, []).append(t)
        out.append((cls, name, img))

    paths = sorted({p for d in _dicom_dirs() for p in glob.glob(os.path.join(d, "**", "*.dcm"), recursive=True)})
    heads = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in paths:
            try:
                head = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue
            cls = _DICOM_CLASS.get(str(head.get("Modality", "")))
            if cls is None or int(head.get("NumberOfFrames", 1) or 1) > 16:
                continue
            compressed = bool(getattr(head.file_meta.get("TransferSyntaxUID"), "is_compressed", True))
            # uncompressed first, so re-encodings of the same image are recognised cheaply and skipped
            heads.append((compressed, os.path.basename(path), path, head, cls))
    heads.sort(key=lambda h: h[:2])
    for _, _, path, head, cls in heads:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open(path, "rb") as f:
                data = f.read()
            frames = int(head.get("NumberOfFrames", 1) or 1)
            try:
                if frames == 1:
                    keep(cls, os.path.basename(path), decode_dicom(data, path))
                    continue
                ds = pydicom.dcmread(path)
                arr = ds.pixel_array
                for fi in np.linspace(0, frames - 1, min(frames, max_frames)).round().astype(int):
                    keep(cls, f"{os.path.basename(path)}#{fi}", frame_to_rgb(ds, arr[fi], path))
            except (DatasetError, Exception):  # undecodable test files (missing codecs) are skipped
                continue

    import skimage.data as skd

    for cls, fn in (("histology", "immunohistochemistry"), ("fundus", "retina"), ("microscopy", "cell")):
        try:
            keep(cls, f"skimage.{fn}", array_to_rgb(getattr(skd, fn)(), fn))
        except Exception:
            continue
    return out


def _patches(img, n: int, size: int, rng) -> list:
    from PIL import Image

    w, h = img.size
    side = max(min(w, h) // 2, min(w, h, 32))
    out = []
    for _ in range(n):
        best = None
        for _try in range(8):  # prefer crops with content over empty background
            x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            crop = img.crop((x0, y0, x0 + side, y0 + side))
            std = float(np.asarray(crop.convert("L")).std())
            if best is None or std > best[0]:
                best = (std, crop)
            if std > 12:
                break
        out.append(best[1].resize((size, size), Image.BILINEAR))
    return out


def write_real_sample_task(root_uri: str, *, patch_size: int = 64, patches_per_class: int = 24, seed: int = 0,
                           overwrite: bool = False) -> TaskSpec:
    """Write the tiny real modality task as an ImageFolder (seeded split) under ``root_uri/real-modality-tiny``."""
    from tasks.codecs.images import encode_png
    from .synthetic import cached_task_spec, seal_task_dir

    name = "real-modality-tiny"
    task_dir = sio.join_uri(root_uri, name)
    params = json.dumps({"patch_size": patch_size, "patches_per_class": patches_per_class, "seed": seed}, sort_keys=True)
    cached = cached_task_spec(task_dir, params, overwrite)
    if cached is not None:
        return cached
    images = real_sample_images()
    classes = [c for c in REAL_SAMPLE_CLASSES if any(cls == c for cls, _, _ in images)]
    if len(classes) < 2:
        raise RuntimeError("fewer than two modalities of real images found: install pydicom-data and scikit-image")
    sio.remove(task_dir, recursive=True)
    data_uri = sio.join_uri(task_dir, "imagefolder")
    rng = np.random.default_rng(seed)
    sources = {}
    for c in classes:
        members = [(n, im) for cls, n, im in images if cls == c]
        per = int(np.ceil(patches_per_class / len(members)))
        k = 0
        for src_name, im in members:
            for patch in _patches(im, per, patch_size, rng):
                sio.atomic_write_bytes(sio.join_uri(data_uri, c, f"{k:04d}.png"), encode_png(np.asarray(patch)))
                k += 1
        sources[c] = [n for n, _ in members]
    spec = TaskSpec(
        name=name,
        source=data_uri,
        format="imagefolder",
        num_classes=len(classes),
        class_names=classes,
        modality="mixed",
        channels=3,
        image_size=patch_size,
        split_seed=seed,
        metric=DEFAULT_METRIC,
        description="TINY real-image modality task from pydicom/pydicom-data test files and scikit-image samples",
    )
    sio.atomic_write_bytes(sio.join_uri(task_dir, "sources.json"), json.dumps(sources, indent=2).encode())
    return seal_task_dir(task_dir, params, spec)
