"""A deterministic family of synthetic medical-like classification tasks, plus a source corpus.

Every image is rendered from the same generative recipe:

1. shared anatomy: a smooth background field and an organ-like ellipse filled with an oriented
   tissue texture (same statistics in every task);
2. a cue map: small lesions whose shape / location / texture frequency (target tasks) or
   orientation / count / contrast polarity / grating orientation / outline (source corpus) depends
   on the class, plus a class-independent distractor lesion;
3. modality rendering and noise: Poisson counts (CT), multiplicative speckle inside a fan (ultrasound),
   Rician noise (MRI), blurred Gaussian noise (X-ray), H&E stain colours (pathology), a red-orange disc
   (fundus).

Tasks differ in cue family, modality, class count and class imbalance; they share (1) and (3),
which is what a task-agnostic importance can pick up. Image i of task t depends only on
(seed, t, i), so any size prefix of a task is stable.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from shpeft_core import io as sio
from shpeft_core.options import DEFAULT_METRIC

from .formats import FORMATS, get_format
from .formats.base import DatasetFormat
from .spec import SPLITS, TaskSpec

__all__ = [
    "MODALITIES",
    "TARGET_CUES",
    "SOURCE_CUES",
    "SyntheticTask",
    "task_family",
    "render_task",
    "write_task",
    "write_task_family",
    "write_source_corpus",
    "write_colour_task",
]

MODALITIES = ("ct", "pathology", "ultrasound", "fundus", "mri", "xray")
RGB_MODALITIES = ("pathology", "fundus")
TARGET_CUES = ("shape", "texture", "location")
SOURCE_CUES = ("orientation", "count", "contrast", "stripes", "outline")
_CLASS_WORDS = {
    "shape": ["disk", "square", "ring", "cross", "triangle", "bar"],
    "texture": ["fine", "medium", "coarse", "very-coarse", "smooth", "striped"],
    "location": ["upper", "right", "lower", "left", "upper-right", "lower-left"],
    "orientation": ["deg0", "deg45", "deg90", "deg135"],
    "count": ["one", "two", "three", "four"],
    "contrast": ["bright", "dark", "rim", "target"],
    "stripes": ["stripes0", "stripes45", "stripes90", "stripes135"],
    "outline": ["triangle", "bar", "ellipse", "pair"],
}


@dataclass(frozen=True)
class SyntheticTask:
    """Generator parameters of one task (``cue`` chooses what the label changes)."""

    name: str
    cue: str
    modality: str
    num_classes: int
    imbalance: float  # largest / smallest class frequency
    num_images: int
    image_size: int
    seed: int
    cue_strength: float = 1.0
    lesion_size: float = 1.0  # scales the class lesion's radius

    @property
    def channels(self) -> int:
        return 3 if self.modality in RGB_MODALITIES else 1

    def class_names(self) -> list[str]:
        return _CLASS_WORDS[self.cue][: self.num_classes]


def task_family(
    n_tasks: int = 3,
    *,
    image_size: int = 32,
    images_per_task: int = 300,
    seed: int = 0,
    cues: tuple[str, ...] = TARGET_CUES,
    num_classes: int | None = None,
    max_imbalance: float = 4.0,
    cue_strength: float = 1.0,
    lesion_size: float = 1.0,
) -> list[SyntheticTask]:
    """Parameters of ``n_tasks`` target tasks: cues and modalities cycle, class counts 2-5 (or all
    ``num_classes``), imbalance 1-``max_imbalance``; ``cue_strength`` scales the class cue's contrast
    and ``lesion_size`` its radius."""
    rng = np.random.default_rng([seed, 7919])
    tasks = []
    for t in range(n_tasks):
        cue = cues[t % len(cues)]
        modality = MODALITIES[t % len(MODALITIES)]
        k = int(rng.integers(2, 6))  # drawn even when num_classes is given: the imbalance draws stay the same
        if num_classes is not None:
            if not 2 <= num_classes <= len(_CLASS_WORDS[cue]):
                raise ValueError(f"num_classes={num_classes}: cue {cue!r} has 2..{len(_CLASS_WORDS[cue])} classes")
            k = num_classes
        tasks.append(
            SyntheticTask(
                name=f"synth{t}-{cue}-{modality}",
                cue=cue,
                modality=modality,
                num_classes=k,
                imbalance=float(np.round(rng.uniform(1.0, max(1.0, max_imbalance)), 2)),
                num_images=images_per_task,
                image_size=image_size,
                seed=seed * 1000 + t,
                cue_strength=cue_strength,
                lesion_size=lesion_size,
            )
        )
    return tasks


# ---------------------------------------------------------------- rendering


def _grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(s) + 0.5) / s
    return np.meshgrid(c, c, indexing="xy")  # x, y in (0,1)


def _smooth_field(rng, x, y, n=3, max_freq=2.0) -> np.ndarray:
    f = np.zeros_like(x)
    for _ in range(n):
        fx, fy = rng.uniform(-max_freq, max_freq, 2)
        f += np.cos(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))
    return f / n


def _soft(d: np.ndarray, s: int) -> np.ndarray:
    """Soft inside-indicator from a signed distance (negative inside), ~1 px edge."""
    return 1.0 / (1.0 + np.exp(np.clip(d * s * 2.5, -30, 30)))


def _shape_mask(kind: str, x, y, cx, cy, r, s, angle=0.0) -> np.ndarray:
    ca, sa = np.cos(angle), np.sin(angle)
    u = (x - cx) * ca + (y - cy) * sa
    v = -(x - cx) * sa + (y - cy) * ca
    if kind == "disk":
        d = np.hypot(u, v) - r
    elif kind == "square":
        d = np.maximum(np.abs(u), np.abs(v)) - r  # half-width r: a little larger than the disk of radius r
    elif kind == "ring":
        d = np.abs(np.hypot(u, v) - r * 0.8) - r * 0.3
    elif kind == "cross":
        d = np.minimum(np.maximum(np.abs(u) - r * 0.3, np.abs(v) - r), np.maximum(np.abs(v) - r * 0.3, np.abs(u) - r))
    elif kind == "triangle":
        d = np.maximum.reduce([-v - r * 0.5, v * 0.5 + u * 0.866 - r * 0.5, v * 0.5 - u * 0.866 - r * 0.5])
    elif kind == "bar":
        d = np.maximum(np.abs(u) - r * 1.2, np.abs(v) - r * 0.35)
    elif kind == "ellipse":
        d = np.hypot(u / 1.0, v / 0.35) - r
    else:
        raise ValueError(kind)
    return _soft(d, s)


def _cue_map(cue: str, label: int, k: int, rng, x, y, s, organ, size: float = 1.0) -> np.ndarray:
    """Signed lesion map for one image; organ = (cx, cy, ax, ay, angle); ``size`` scales the radius."""
    ocx, ocy, oax, oay, _ = organ
    r = rng.uniform(0.11, 0.15) * size
    amp = rng.uniform(0.3, 0.45) * rng.choice([-1.0, 1.0])
    jitter = rng.normal(0, 0.06, 2)
    cx, cy = ocx + jitter[0], ocy + jitter[1]
    if cue == "shape":
        return amp * _shape_mask(_CLASS_WORDS["shape"][label], x, y, cx, cy, r, s, rng.uniform(0, np.pi / 8))
    if cue == "location":
        theta = 2 * np.pi * label / k + rng.normal(0, 0.25)
        cx = ocx + 0.55 * oax * np.cos(theta - np.pi / 2)
        cy = ocy + 0.55 * oay * np.sin(theta - np.pi / 2)
        return amp * _shape_mask("disk", x, y, cx, cy, r, s)
    if cue == "texture":
        # cycles per image, geometrically spaced (x1.9 per class for k = 4): far more than the x1.3 a
        # random resized crop (scale 0.6) can shift a frequency by, so augmentation keeps the class
        freq = 0.05 * (0.36 / 0.05) ** (label / max(k - 1, 1)) * s
        ang = rng.uniform(0, np.pi)
        grating = np.cos(2 * np.pi * freq * (x * np.cos(ang) + y * np.sin(ang)) + rng.uniform(0, 2 * np.pi))
        return abs(amp) * 1.3 * grating * _shape_mask("disk", x, y, cx, cy, r * 1.6, s)
    if cue == "orientation":
        return amp * _shape_mask("ellipse", x, y, cx, cy, r * 1.4, s, np.pi * label / k + rng.normal(0, 0.15))
    if cue == "count":
        out = np.zeros_like(x)
        for _ in range(label + 1):
            px, py = ocx + rng.uniform(-0.6, 0.6) * oax, ocy + rng.uniform(-0.6, 0.6) * oay
            out += _shape_mask("disk", x, y, px, py, r * 0.55, s)
        return abs(amp) * np.clip(out, 0, 1)
    if cue == "stripes":
        # a grating at one fixed mid frequency whose orientation is the class (target texture varies frequency)
        ang = np.pi * label / k + rng.normal(0, 0.1)
        grating = np.cos(2 * np.pi * 0.22 * s * (x * np.cos(ang) + y * np.sin(ang)) + rng.uniform(0, 2 * np.pi))
        return abs(amp) * 1.3 * grating * _shape_mask("disk", x, y, cx, cy, r * 1.6, s)
    if cue == "outline":
        # lesion outlines none of the target shapes use (target shape: disk, square, ring, cross)
        if label == 3:
            d = 0.09 + rng.uniform(0, 0.04)
            a = rng.uniform(0, np.pi)
            pair = sum(_shape_mask("disk", x, y, cx + sgn * d * np.cos(a), cy + sgn * d * np.sin(a), r * 0.5, s)
                       for sgn in (-1, 1))
            return amp * np.clip(pair, 0, 1)
        kind = ("triangle", "bar", "ellipse")[label]
        return amp * _shape_mask(kind, x, y, cx, cy, r * (1.2 if kind == "ellipse" else 1.0), s, rng.uniform(0, np.pi))
    if cue == "contrast":
        disk = _shape_mask("disk", x, y, cx, cy, r * 1.2, s)
        core = _shape_mask("disk", x, y, cx, cy, r * 0.6, s)
        a = abs(amp)
        return [a * disk, -a * disk, a * (disk - core) - a * core, a * core - a * (disk - core)][label % 4]
    raise ValueError(f"unknown cue {cue!r}")


def render_image(task: SyntheticTask, label: int, index: int) -> np.ndarray:
    """One uint8 image, (S,S) grey or (S,S,3) RGB, fully determined by (task.seed, index)."""
    s = task.image_size
    rng = np.random.default_rng([task.seed, index, 17])
    x, y = _grid(s)
    # 1. shared anatomy
    background = 0.25 + 0.08 * _smooth_field(rng, x, y)
    ocx, ocy = 0.5 + rng.normal(0, 0.04, 2)
    oax, oay = rng.uniform(0.3, 0.42, 2)
    oang = rng.uniform(0, np.pi)
    ca, sa = np.cos(oang), np.sin(oang)
    u, v = (x - ocx) * ca + (y - ocy) * sa, -(x - ocx) * sa + (y - ocy) * ca
    organ = _soft(np.hypot(u / oax, v / oay) - 1.0, s * 0.3)
    tex_f = rng.uniform(3.0, 6.0)
    tex_a = rng.uniform(0, np.pi)
    texture = 0.06 * np.cos(2 * np.pi * tex_f * (x * np.cos(tex_a) + y * np.sin(tex_a))) + 0.05 * _smooth_field(rng, x, y, 4, 5.0)
    tissue = background + organ * (0.22 + texture)
    # 2. cues: the class cue plus a class-independent distractor
    cue = task.cue_strength * _cue_map(task.cue, label, task.num_classes, rng, x, y, s, (ocx, ocy, oax, oay, oang),
                                       task.lesion_size)
    if rng.random() < 0.5:
        dx, dy = rng.uniform(0.2, 0.8, 2)
        cue = cue + rng.uniform(-0.2, 0.2) * _shape_mask("disk", x, y, dx, dy, rng.uniform(0.04, 0.08), s)
    # 3. modality
    img = _render_modality(task.modality, tissue, cue, organ, rng, x, y)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _render_modality(modality: str, tissue, cue, organ, rng, x, y) -> np.ndarray:
    g = tissue + cue
    if modality == "ct":
        lam = 80.0
        return rng.poisson(np.clip(g, 0.01, None) * lam) / lam * 0.9
    if modality == "ultrasound":
        fan = ((np.abs(np.arctan2(x - 0.5, y + 0.1)) < 0.6) & (np.hypot(x - 0.5, y + 0.1) < 1.05)).astype(float)
        return fan * np.clip(g, 0, None) * rng.gamma(4.0, 1 / 4.0, g.shape) * 1.1
    if modality == "mri":
        sigma = 0.06
        return np.hypot(g + rng.normal(0, sigma, g.shape), rng.normal(0, sigma, g.shape))
    if modality == "xray":
        noisy = g + rng.normal(0, 0.07, g.shape)
        return 0.25 * np.roll(noisy, 1, 0) + 0.5 * noisy + 0.25 * np.roll(noisy, 1, 1)
    if modality == "pathology":
        # optical densities of haematoxylin (nuclei / lesion) and eosin (stroma), Beer-Lambert to RGB
        h_vec = np.array([0.65, 0.70, 0.29]) * rng.uniform(0.85, 1.15)
        e_vec = np.array([0.07, 0.99, 0.11]) * rng.uniform(0.85, 1.15)
        h = 0.9 * np.clip(cue, 0, None) + 0.5 * np.clip(-cue, 0, None) + 0.35 * organ * (tissue - 0.2) + rng.gamma(2.0, 0.05, g.shape)
        e = 0.9 * tissue
        od = h[..., None] * h_vec + e[..., None] * e_vec
        return np.exp(-od) + rng.normal(0, 0.02, od.shape)
    if modality == "fundus":
        disc = (np.hypot(x - 0.5, y - 0.5) < 0.48).astype(float)
        base = np.stack([0.55 + 0.8 * g, 0.22 + 0.6 * g, 0.08 + 0.2 * g], axis=-1)
        return disc[..., None] * (base + rng.normal(0, 0.03, base.shape))
    raise ValueError(f"unknown modality {modality!r}")


def _class_counts(n: int, k: int, imbalance: float) -> list[int]:
    """Class sizes with frequency decaying geometrically from 1 to 1/imbalance (largest remainder)."""
    w = imbalance ** (-np.arange(k) / max(k - 1, 1))
    raw = n * w / w.sum()
    counts = np.maximum(np.floor(raw).astype(int), 3)
    while counts.sum() < n:
        counts[int(np.argmax(raw - counts))] += 1
    while counts.sum() > n:
        counts[int(np.argmax(counts))] -= 1
    return counts.tolist()


def render_task(task: SyntheticTask, split_ratio=(0.7, 0.15, 0.15)) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (images uint8 [N,S,S] or [N,S,S,3], labels int64 [N]); stratified split by class."""
    counts = _class_counts(task.num_images, task.num_classes, task.imbalance)
    labels = np.concatenate([np.full(c, k) for k, c in enumerate(counts)])
    order = np.random.default_rng([task.seed, 3]).permutation(len(labels))
    labels = labels[order]
    split_of = np.empty(len(labels), dtype=np.int64)
    for k in range(task.num_classes):
        idx = np.flatnonzero(labels == k)
        n_val = max(1, int(round(len(idx) * split_ratio[1])))
        n_test = max(1, int(round(len(idx) * split_ratio[2])))
        split_of[idx] = 0
        split_of[idx[len(idx) - n_val - n_test : len(idx) - n_test]] = 1
        split_of[idx[len(idx) - n_test :]] = 2
    out = {}
    for si, split in enumerate(SPLITS):
        idx = np.flatnonzero(split_of == si)
        imgs = np.stack([render_image(task, int(labels[i]), int(i)) for i in idx])
        out[split] = (imgs, labels[idx].astype(np.int64))
    return out


# ---------------------------------------------------------------- writing (each format writes itself: tasks.formats)


def _writers() -> list[DatasetFormat]:
    return [get_format(name) for name in FORMATS]


def _writer(fmt: str) -> DatasetFormat:
    try:
        return get_format(fmt)
    except KeyError:
        names = ", ".join("/".join((*f.aliases, f.name)) for f in _writers())  # npz/medmnist, imagefolder, ...
        raise ValueError(f"format={fmt!r}: expected one of {names}") from None


def cached_task_spec(task_dir: str, params: str, overwrite: bool) -> TaskSpec | None:
    """The spec of a generated task folder written with the same ``params``, else None."""
    spec_uri, gen_uri = sio.join_uri(task_dir, "task.json"), sio.join_uri(task_dir, "generator.json")
    if not overwrite and sio.exists(spec_uri) and sio.exists(gen_uri) and sio.read_bytes(gen_uri).decode() == params:
        return TaskSpec.model_validate_json(sio.read_bytes(spec_uri))
    return None


def seal_task_dir(task_dir: str, params: str, spec: TaskSpec) -> TaskSpec:
    """Record how the folder was generated, then its spec: a folder without task.json is incomplete."""
    sio.atomic_write_bytes(sio.join_uri(task_dir, "generator.json"), params.encode())
    sio.atomic_write_bytes(sio.join_uri(task_dir, "task.json"), spec.model_dump_json(indent=2).encode())
    return spec


def write_task(root_uri: str, task: SyntheticTask, fmt: str, *, overwrite: bool = False) -> TaskSpec:
    """Render ``task`` and write it under ``root_uri/<task.name>`` in format ``fmt``.

    ``task.json`` (the TaskSpec) is written last, so a folder without it is incomplete; a folder
    whose ``generator.json`` matches is reused as is.
    """
    writer = _writer(fmt)
    fmt = writer.name
    task_dir = sio.join_uri(root_uri, task.name)
    data_uri = writer.source_uri(task_dir, task.name)
    spec = TaskSpec(
        name=task.name,
        source=data_uri,
        format=fmt,
        num_classes=task.num_classes,
        class_names=task.class_names(),
        modality=task.modality,
        channels=task.channels,
        image_size=task.image_size,
        metric=DEFAULT_METRIC,
        description=f"synthetic {task.modality} task, cue '{task.cue}', imbalance {task.imbalance}",
    )
    params = json.dumps({"format": fmt, **asdict(task)}, sort_keys=True)
    cached = cached_task_spec(task_dir, params, overwrite)
    if cached is not None:
        return cached
    sio.remove(task_dir, recursive=True)
    writer.write(data_uri, render_task(task), class_names=task.class_names(), modality=task.modality, name=task.name)
    return seal_task_dir(task_dir, params, spec)


def write_task_family(
    root_uri: str,
    *,
    n_tasks: int = 3,
    formats: tuple[str, ...] = ("medmnist", "imagefolder", "parquet", "dicom"),
    image_size: int = 32,
    images_per_task: int = 300,
    seed: int = 0,
    num_classes: int | None = None,
    max_imbalance: float = 4.0,
    cue_strength: float = 1.0,
    lesion_size: float = 1.0,
    overwrite: bool = False,
) -> list[TaskSpec]:
    """Write ``n_tasks`` target tasks under ``root_uri``; task t uses ``formats[t % len(formats)]``.

    ``num_classes``, ``max_imbalance``, ``cue_strength`` and ``lesion_size`` go to :func:`task_family`."""
    tasks = task_family(n_tasks, image_size=image_size, images_per_task=images_per_task, seed=seed,
                        num_classes=num_classes, max_imbalance=max_imbalance, cue_strength=cue_strength,
                        lesion_size=lesion_size)
    return [write_task(root_uri, t, formats[i % len(formats)], overwrite=overwrite) for i, t in enumerate(tasks)]


def write_source_corpus(
    root_uri: str,
    *,
    image_size: int = 32,
    seed: int = 10_000,
    num_images: int = 2400,
    fmt: str = "medmnist",
    cue_strength: float = 1.0,
    lesion_size: float = 1.0,
    overwrite: bool = False,
) -> TaskSpec:
    """A pre-training corpus from the same generator, disjoint from the target tasks.

    Labels are (source cue, variant) pairs from SOURCE_CUES (orientation, count, contrast, stripes
    orientation, outline; 4 variants each: 20 classes); every modality appears, rendered as RGB. The
    target cues (shape, texture, location) are never labels here: stripes have one fixed frequency
    (texture varies it) and outlines are shapes the shape task does not use (triangle, bar, ellipse,
    pair); the seeds differ, so no target image or label leaks in. ``cue_strength`` and
    ``lesion_size`` scale the class cue as in the target tasks.
    """
    name = "synth-source"
    task = SyntheticTask(name, "source", "mixed", 4 * len(SOURCE_CUES), 1.0, num_images, image_size, seed, cue_strength,
                         lesion_size)
    writer = _writer(fmt)
    if not writer.keeps_splits:
        names = [(f.aliases or (f.name,))[0] for f in _writers() if f.keeps_splits]  # npz, imagefolder, parquet
        raise ValueError(f"format={fmt!r}: the source corpus is written as {', '.join(names[:-1])} or {names[-1]}")
    fmt = writer.name
    task_dir = sio.join_uri(root_uri, name)
    data_uri = writer.source_uri(task_dir, name)
    class_names = [f"{c}-{w}" for c in SOURCE_CUES for w in _CLASS_WORDS[c][:4]]
    spec = TaskSpec(
        name=name,
        source=data_uri,
        format=fmt,
        num_classes=len(class_names),
        class_names=class_names,
        modality="mixed",
        channels=3,
        image_size=image_size,
        metric="accuracy",
        description="synthetic pre-training corpus (source cues, all modalities)",
    )
    params = json.dumps({"format": fmt, **asdict(task)}, sort_keys=True)
    cached = cached_task_spec(task_dir, params, overwrite)
    if cached is not None:
        return cached
    sio.remove(task_dir, recursive=True)
    labels = np.arange(num_images) % len(class_names)
    labels = labels[np.random.default_rng([seed, 3]).permutation(num_images)]
    imgs = []
    for i, lab in enumerate(labels):
        cue, variant = SOURCE_CUES[lab // 4], int(lab % 4)
        modality = MODALITIES[int(np.random.default_rng([seed, i, 5]).integers(len(MODALITIES)))]
        sub = SyntheticTask(name, cue, modality, 4, 1.0, num_images, image_size, seed, cue_strength, lesion_size)
        img = render_image(sub, variant, i)
        imgs.append(img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=-1))
    imgs = np.stack(imgs)
    n_train, n_val = int(round(0.8 * num_images)), int(round(0.1 * num_images))
    bounds = [0, n_train, n_train + n_val, num_images]
    data = {s: (imgs[bounds[i] : bounds[i + 1]], labels[bounds[i] : bounds[i + 1]]) for i, s in enumerate(SPLITS)}
    writer.write(data_uri, data, class_names=class_names, modality="mixed", name=name)
    return seal_task_dir(task_dir, params, spec)


def write_colour_task(root: str, name: str, seed: int, *, n_train: int = 40, n_eval: int = 12,
                      noise: float = 50.0) -> TaskSpec:
    """A 3-class ImageFolder task any backbone can learn (class = the dominant colour, plus noise).

    For checks that a pipeline learns at all: ``n_train`` training and ``n_eval`` val / test images
    per split, 32 px, written under ``root/name`` (local paths).
    """
    import os

    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
    for split, n in (("train", n_train), ("val", n_eval), ("test", n_eval)):
        for i in range(n):
            c = i % 3
            img = np.clip(rng.normal(colours[c], noise, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            folder = os.path.join(root, name, split, f"c{c}")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(img).save(os.path.join(folder, f"{i}.png"))
    return TaskSpec(name=name, source=os.path.join(root, name), format="imagefolder", num_classes=3,
                    class_names=["c0", "c1", "c2"], image_size=32)
