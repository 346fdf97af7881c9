"""Synthetic multi-label and ordinal tasks written as label tables, laid out like the data they stand for.

- :func:`write_findings_task`: a CheXpert-like task: ``labels.csv`` with a path column, a patient column
  and one column per finding holding 1 / 0 / -1 (uncertain) / blank (not mentioned), images under
  ``images/patientNNNNN/studyK.png``. Each finding is a visible mark of its own shape, brightness and
  region on a noisy background (findings are independent, so an image shows any subset), so a small
  model can learn every finding; an uncertain label's mark is present half of the time.
- :func:`write_grades_task`: an APTOS-like ordinal task: ``train.csv`` with an id column and a grade
  column, images ``images/<id>.png``; the grade is how many marks the image shows (0..grades-1).

Image ``i`` depends only on ``(seed, i)``; a folder whose ``generator.json`` matches is reused, and its
``task.json`` (the TaskSpec) is written last.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np

from shpeft_core import io as sio

from .codecs.images import encode_png
from .spec import TaskSpec
from .synthetic import cached_task_spec, seal_task_dir

__all__ = ["FINDING_MARKS", "write_findings_task", "write_grades_task", "render_marks"]

# finding -> (shape, intensity, region centre (x, y) in [0, 1]); regions overlap little
FINDING_MARKS = {
    "opacity": ("disk", 1.0, (0.3, 0.3)),
    "line": ("bar", 1.0, (0.5, 0.75)),
    "nodule-ring": ("ring", -1.0, (0.72, 0.35)),
    "cross": ("cross", 1.0, (0.3, 0.7)),
}


def _mask(shape: str, x, y, cx, cy, r):
    d = np.hypot(x - cx, y - cy)
    if shape == "disk":
        return (d < r).astype(np.float64)
    if shape == "ring":
        return ((d < r) & (d > 0.55 * r)).astype(np.float64)
    if shape == "bar":
        return ((np.abs(y - cy) < 0.3 * r) & (np.abs(x - cx) < 1.6 * r)).astype(np.float64)
    return (((np.abs(x - cx) < 0.3 * r) & (np.abs(y - cy) < r)) | ((np.abs(y - cy) < 0.3 * r) & (np.abs(x - cx) < r))
            ).astype(np.float64)


def render_marks(present: list[str], size: int, rng: np.random.Generator) -> np.ndarray:
    """A uint8 grey image with the marks of ``present`` findings (keys of FINDING_MARKS)."""
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    img = 0.45 + 0.1 * (x - 0.5) * rng.normal() + 0.1 * (y - 0.5) * rng.normal() + rng.normal(0, 0.06, (size, size))
    for name in present:
        shape, level, (cx, cy) = FINDING_MARKS[name]
        jx, jy = rng.uniform(-0.08, 0.08, 2)
        r = rng.uniform(0.1, 0.14)
        img += 0.35 * level * _mask(shape, x, y, cx + jx, cy + jy, r)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _write_images(folder: str, images: dict[str, np.ndarray]) -> None:
    for rel, img in images.items():
        sio.atomic_write_bytes(sio.join_uri(folder, rel), encode_png(img))


def write_findings_task(root: str, *, name: str = "synth-findings", num_images: int = 240, image_size: int = 32,
                        findings: tuple[str, ...] = ("opacity", "line", "nodule-ring"), prevalence: float = 0.4,
                        uncertain: float = 0.06, blank: float = 0.1, images_per_patient: int = 2, seed: int = 0,
                        overwrite: bool = False) -> TaskSpec:
    """Write the CheXpert-like multi-label task under ``root/name`` (see the module docstring)."""
    unknown = sorted(set(findings) - set(FINDING_MARKS))
    if unknown:
        raise ValueError(f"findings {unknown} are not among {sorted(FINDING_MARKS)}")
    params = json.dumps({"kind": "findings", "num_images": num_images, "image_size": image_size,
                         "findings": list(findings), "prevalence": prevalence, "uncertain": uncertain,
                         "blank": blank, "images_per_patient": images_per_patient, "seed": seed}, sort_keys=True)
    task_dir = sio.join_uri(root, name)
    spec = TaskSpec(name=name, source=task_dir, format="table", kind="multi_label", num_classes=len(findings),
                    class_names=list(findings), modality="xray", channels=1, image_size=image_size, metric="auc",
                    description="synthetic multi-label task: each finding a visible mark (CheXpert-like table)",
                    table={"files": "labels.csv", "path_column": "Path", "label_columns": list(findings),
                           "group_column": "Patient"})
    cached = cached_task_spec(task_dir, params, overwrite)
    if cached is not None:
        return cached
    sio.remove(task_dir, recursive=True)
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["Path", "Patient", "Sex", *findings])
    images = {}
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])
        patient = f"patient{i // images_per_patient:05d}"
        rel = f"images/{patient}/study{i % images_per_patient + 1}.png"
        present, cells = [], []
        for f in findings:
            has = rng.random() < prevalence
            u = rng.random()
            if u < uncertain:  # the reader was unsure: the mark is there half of the time
                cells.append("-1.0")
                has = rng.random() < 0.5
            elif not has and u < uncertain + blank:
                cells.append("")  # not mentioned: negative by CheXpert's convention
            else:
                cells.append("1.0" if has else "0.0")
            if has:
                present.append(f)
        images[rel] = render_marks(present, image_size, rng)
        out.writerow([rel, patient, "F" if rng.random() < 0.5 else "M", *cells])
    _write_images(task_dir, images)
    sio.atomic_write_bytes(sio.join_uri(task_dir, "labels.csv"), buf.getvalue().encode())
    return seal_task_dir(task_dir, params, spec)


def write_grades_task(root: str, *, name: str = "synth-grades", num_images: int = 300, image_size: int = 32,
                      grades: int = 4, seed: int = 0, overwrite: bool = False) -> TaskSpec:
    """Write the APTOS-like ordinal task under ``root/name``: grade g shows g marks (see the module docstring)."""
    if not 2 <= grades <= len(FINDING_MARKS) + 1:
        raise ValueError(f"grades={grades} must be in 2..{len(FINDING_MARKS) + 1}")
    params = json.dumps({"kind": "grades", "num_images": num_images, "image_size": image_size, "grades": grades,
                         "seed": seed}, sort_keys=True)
    task_dir = sio.join_uri(root, name)
    names = [f"grade {g}" for g in range(grades)]
    spec = TaskSpec(name=name, source=task_dir, format="table", kind="ordinal", num_classes=grades,
                    class_names=names, modality="fundus", channels=1, image_size=image_size, metric="kappa",
                    description="synthetic ordinal task: the grade is the number of marks (APTOS-like table)",
                    table={"files": "train.csv", "path_column": "id_code", "path_template": "images/{}.png",
                           "label_column": "diagnosis"})
    cached = cached_task_spec(task_dir, params, overwrite)
    if cached is not None:
        return cached
    sio.remove(task_dir, recursive=True)
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["id_code", "diagnosis"])
    marks = list(FINDING_MARKS)
    images = {}
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])
        grade = int(rng.integers(grades))
        present = [marks[k] for k in rng.permutation(len(marks))[:grade]]
        ident = f"{i:05d}{rng.integers(16 ** 4):04x}"
        images[f"images/{ident}.png"] = render_marks(present, image_size, rng)
        out.writerow([ident, grade])
    _write_images(task_dir, images)
    sio.atomic_write_bytes(sio.join_uri(task_dir, "train.csv"), buf.getvalue().encode())
    return seal_task_dir(task_dir, params, spec)
