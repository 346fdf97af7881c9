"""Miniature copies of the official download layouts of CheXpert, ChestX-ray14, ISIC 2018 and APTOS 2019:
the same file and folder names, table columns and value conventions, with tiny images. Each writer
returns what it wrote (the ground truth the tests compare against)."""

from __future__ import annotations

import csv
import os

import numpy as np
from PIL import Image

from tasks.catalogue import CATALOGUE


def _image(path: str, rng, fmt: str | None = None, mode: str = "L") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shape = (12, 12) if mode == "L" else (12, 12, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path, format=fmt)


def _csv(path: str, header: list[str], rows: list[list]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


CHEXPERT = list(CATALOGUE["chexpert"].class_names)


def chexpert_layout(root: str, patients: int = 24, valid_patients: int = 4, seed: int = 0) -> dict:
    """<root>/CheXpert-v1.0-small/{train,valid}.csv and train/patientNNNNN/studyK/viewN_frontal.jpg."""
    rng = np.random.default_rng(seed)
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT]
    truth = {}
    for split, name, first, count in (("train", "train", 1, patients), ("test", "valid", 64541, valid_patients)):
        rows = []
        for p in range(first, first + count):
            for study in (1, 2):
                rel = f"CheXpert-v1.0-small/{name}/patient{p:05d}/study{study}/view1_frontal.jpg"
                _image(os.path.join(root, rel), rng, "JPEG")
                if split == "train":
                    cells = [str(rng.choice(["1.0", "0.0", "-1.0", ""], p=[0.35, 0.35, 0.1, 0.2])) for _ in CHEXPERT]
                    cells[0] = "1.0" if p == first else cells[0]  # every finding has a positive in train
                    cells = ["1.0" if (p == first + 1 and study == 1) else c for c in cells]
                else:  # the expert-labelled valid set has no uncertain or blank labels
                    cells = [str(rng.choice(["1.0", "0.0"])) for _ in CHEXPERT]
                rows.append([rel, "Female", "60", "Frontal", "AP", *cells])
                truth[rel] = (split, f"patient{p:05d}", cells)
        _csv(os.path.join(root, "CheXpert-v1.0-small", f"{name}.csv"), header, rows)
    return truth


CXR14 = list(CATALOGUE["chestxray14"].class_names)


def chestxray14_layout(root: str, patients: int = 30, seed: int = 0) -> dict:
    """Data_Entry_2017_v2020.csv, train_val_list.txt, test_list.txt and images in Kaggle's
    images_001/images/, images_002/images/ folders (file names only in the table)."""
    rng = np.random.default_rng(seed)
    header = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
    rows, truth, train_val, test = [], {}, [], []
    for p in range(1, patients + 1):
        for k in range(int(rng.integers(1, 4))):
            name = f"{p:08d}_{k:03d}.png"
            folder = "images_001" if p % 2 else "images_002"
            _image(os.path.join(root, folder, "images", name), rng, "PNG")
            found = sorted(set(rng.choice(CXR14, size=int(rng.integers(0, 3)), replace=False)))
            if p <= len(CXR14):
                found = sorted(set(found) | {CXR14[p - 1]})  # every finding appears in train_val
            labels = "|".join(found) if found else "No Finding"
            rows.append([name, labels, k, p, 50, "M", "PA", 1024, 1024, 0.14, 0.14])
            (test if p > patients - 6 else train_val).append(name)
            truth[name] = ("test" if p > patients - 6 else "train_val", p, found)
    _csv(os.path.join(root, "Data_Entry_2017_v2020.csv"), header, rows)
    for fname, names in (("train_val_list.txt", train_val), ("test_list.txt", test)):
        with open(os.path.join(root, fname), "w") as f:
            f.write("\n".join(names) + "\n")
    return truth


ISIC18 = list(CATALOGUE["isic2018"].class_names)


def isic2018_layout(root: str, sizes=(("Training", 35), ("Validation", 8), ("Test", 10)), seed: int = 0) -> dict:
    """The six ISIC2018_Task3_* folders: inputs (ISIC_NNNNNNN.jpg plus the licence files) and one-hot CSVs."""
    rng = np.random.default_rng(seed)
    truth, n = {}, 24306
    for part, count in sizes:
        inputs = os.path.join(root, f"ISIC2018_Task3_{part}_Input")
        os.makedirs(inputs, exist_ok=True)
        for extra in ("LICENSE.txt", "ATTRIBUTION.txt"):
            with open(os.path.join(inputs, extra), "w") as f:
                f.write("CC BY-NC\n")
        rows = []
        for i in range(count):
            ident = f"ISIC_{n:07d}"
            n += 1
            _image(os.path.join(inputs, f"{ident}.jpg"), rng, "JPEG", mode="RGB")
            k = i % len(ISIC18) if i < len(ISIC18) else int(rng.integers(len(ISIC18)))
            rows.append([ident] + ["1.0" if j == k else "0.0" for j in range(len(ISIC18))])
            truth[ident] = (part, k)
        gt = f"ISIC2018_Task3_{part}_GroundTruth"
        _csv(os.path.join(root, gt, f"{gt}.csv"), ["image", *ISIC18], rows)
    return truth


def aptos_layout(root: str, images: int = 60, seed: int = 0) -> dict:
    """train.csv (id_code, diagnosis) with train_images/<id_code>.png; test.csv / test_images unlabelled."""
    rng = np.random.default_rng(seed)
    rows, truth = [], {}
    for i in range(images):
        ident = f"{rng.integers(16 ** 12):012x}"
        grade = i % 5 if i < 20 else int(rng.choice(5, p=[0.5, 0.1, 0.25, 0.05, 0.1]))
        _image(os.path.join(root, "train_images", f"{ident}.png"), rng, "PNG", mode="RGB")
        rows.append([ident, grade])
        truth[ident] = grade
    _csv(os.path.join(root, "train.csv"), ["id_code", "diagnosis"], rows)
    _image(os.path.join(root, "test_images", "ffffffffffff.png"), rng, "PNG", mode="RGB")
    _csv(os.path.join(root, "test.csv"), ["id_code"], [["ffffffffffff"]])
    return truth
