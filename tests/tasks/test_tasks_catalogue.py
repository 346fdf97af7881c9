import io
import time

import numpy as np
import pytest

from tasks.catalogue import CATALOGUE, MEDMNIST_2D
from tasks.codecs.images import DatasetError
from tasks.loaders import build_dataset
from tasks.download import fetch_medmnist, medmnist_filename, medmnist_url

EXPECTED_CLASSES = {
    "pathmnist": 9, "chestmnist": 14, "dermamnist": 7, "octmnist": 4, "pneumoniamnist": 2, "retinamnist": 5,
    "breastmnist": 2, "bloodmnist": 8, "tissuemnist": 8, "organamnist": 11, "organcmnist": 11, "organsmnist": 11,
}


def test_medmnist_entries_have_official_class_counts():
    assert {e.key: e.num_classes for e in MEDMNIST_2D} == EXPECTED_CLASSES
    for e in MEDMNIST_2D:
        assert "CC BY 4.0" in e.licence and "zenodo.org/records/10519652" in e.obtain
        assert e.channels == (3 if e.key in ("pathmnist", "dermamnist", "retinamnist", "bloodmnist") else 1)


def test_other_entries_and_specs():
    assert {"covid19-ct", "busi", "chaoyang", "brain-tumor-mri", "isic2019", "isic2018", "aptos2019", "eyepacs"} <= set(CATALOGUE)
    assert CATALOGUE["busi"].class_names == ("normal", "benign", "malignant")
    assert CATALOGUE["chaoyang"].num_classes == 4
    spec = CATALOGUE["busi"].to_spec("s3://bucket/busi")
    assert spec.num_classes == 3 and spec.modality == "ultrasound" and spec.format == "imagefolder"
    with pytest.raises(ValueError, match="needs a source"):
        CATALOGUE["busi"].to_spec()
    chest = CATALOGUE["chestmnist"].to_spec("/data")
    assert chest.kind == "multi_label" and chest.num_classes == 14 and chest.metric == "auc"
    binary = CATALOGUE["chestmnist"].to_spec("/data", multilabel="any")
    assert binary.kind == "single_label" and binary.num_classes == 2 and binary.multilabel == "any"
    retina = CATALOGUE["retinamnist"].to_spec("/data")
    assert retina.kind == "ordinal" and retina.metric == "kappa"
    for e in CATALOGUE.values():
        assert e.licence and e.obtain and e.modality


def test_medmnist_names_and_urls():
    assert medmnist_filename("pathmnist", 28) == "pathmnist.npz"
    assert medmnist_url("bloodmnist", 64) == "https://zenodo.org/records/10519652/files/bloodmnist_64.npz"
    with pytest.raises(DatasetError, match="MedMNIST files exist at"):
        medmnist_filename("pathmnist", 100)


def test_offline_fails_fast_naming_file_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("SHPEFT_OFFLINE", "1")
    spec = CATALOGUE["dermamnist"].to_spec(str(tmp_path), image_size=64)
    t0 = time.perf_counter()
    with pytest.raises(DatasetError) as e:
        build_dataset(spec, "train")
    assert time.perf_counter() - t0 < 1.0
    assert "dermamnist_64.npz" in str(e.value) and str(tmp_path) in str(e.value)
    assert "https://zenodo.org/records/10519652/files/dermamnist_64.npz" in str(e.value)


def test_injected_download_writes_the_file_once(tmp_path, monkeypatch):
    monkeypatch.delenv("SHPEFT_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    arrays = {}
    for s in ("train", "val", "test"):
        arrays[f"{s}_images"] = np.zeros((4, 28, 28), np.uint8)
        arrays[f"{s}_labels"] = np.array([[0], [1], [0], [1]], np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    calls = []

    def fake_download(url):
        calls.append(url)
        return buf.getvalue()

    dest = str(tmp_path / "pneumoniamnist.npz")
    fetch_medmnist("pneumoniamnist", 28, dest, download=fake_download)
    assert calls == ["https://zenodo.org/records/10519652/files/pneumoniamnist.npz"]
    spec = CATALOGUE["pneumoniamnist"].to_spec(str(tmp_path))
    assert build_dataset(spec, "val").labels == [0, 1, 0, 1]
    with pytest.raises(DatasetError, match="not an .npz"):
        fetch_medmnist("pneumoniamnist", 28, str(tmp_path / "x.npz"), download=lambda url: b"<html>")
    assert not (tmp_path / "x.npz").exists()
