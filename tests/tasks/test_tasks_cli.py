import io

import numpy as np
from click.testing import CliRunner
from PIL import Image

from shpeft_core import io as sio
from orchestrator.cli.tasks import tasks_cli


def test_list_shows_catalogue():
    r = CliRunner().invoke(tasks_cli, ["list"])
    assert r.exit_code == 0
    for key in ("pathmnist", "organsmnist", "busi", "chaoyang", "covid19-ct", "isic2019", "aptos2019"):
        assert key in r.output
    assert tasks_cli.name == "tasks"


def test_check_valid_dataset_exits_0_with_table(family):
    spec = family["parquet"]
    r = CliRunner().invoke(tasks_cli, ["check", spec.source, "--format", "parquet", "--num-classes", str(spec.num_classes)])
    assert r.exit_code == 0, r.output
    assert "valid" in r.output and "train" in r.output and "fingerprint" in r.output
    r = CliRunner().invoke(tasks_cli, ["check", family["medmnist"].source, "--format", "medmnist",
                                       "--class-names", ",".join(family["medmnist"].class_names), "--json"])
    assert r.exit_code == 0, r.output
    assert '"label_range"' in r.output


def test_check_invalid_dataset_exits_2_naming_file(tmp_path):
    for c in "ab":
        for i in range(4):
            buf = io.BytesIO()
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
            sio.atomic_write_bytes(str(tmp_path / c / f"{i}.png"), buf.getvalue())
    sio.atomic_write_bytes(str(tmp_path / "b" / "broken.jpg"), b"\xff\xd8\xff\xe0garbage")
    r = CliRunner().invoke(tasks_cli, ["check", str(tmp_path), "--format", "imagefolder", "--num-classes", "2"])
    assert r.exit_code == 2
    assert "broken.jpg" in r.output and "unreadable image" in r.output


def test_check_bad_spec_exits_2_naming_field(tmp_path):
    r = CliRunner().invoke(tasks_cli, ["check", str(tmp_path), "--format", "imagefolder", "--num-classes", "2", "--name", "../x"])
    assert r.exit_code == 2 and "name" in r.output
    r = CliRunner().invoke(tasks_cli, ["check", str(tmp_path), "--format", "parquet"])
    assert r.exit_code == 2 and "--num-classes" in r.output and "imagefolder and dicom take the classes" in r.output


def _write_folders(root, names, n=5):
    for c in names:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(buf, format="PNG")
            sio.atomic_write_bytes(str(root / c / f"{i}.png"), buf.getvalue())


def test_check_infers_classes_from_folders_and_checks_a_given_count(tmp_path):
    _write_folders(tmp_path, ["coarse", "fine", "medium", "very-coarse"])
    r = CliRunner().invoke(tasks_cli, ["check", str(tmp_path), "--format", "imagefolder"])
    assert r.exit_code == 0, r.output
    assert 'classes from the class folders: num_classes: 4, class_names: ["coarse", "fine", "medium", ' \
           '"very-coarse"]' in r.output and "3: very-coarse" in r.output and r.output.rstrip().endswith("valid")
    r = CliRunner().invoke(tasks_cli, ["check", str(tmp_path), "--format", "imagefolder", "--json"])
    assert r.exit_code == 0 and '"classes_inferred": true' in r.output and '"num_classes": 4' in r.output
    r = CliRunner().invoke(tasks_cli, ["check", str(tmp_path), "--format", "imagefolder", "--num-classes", "5"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "found 4 class folders" in lines[0] and "num_classes=5" in lines[0]


def test_check_with_catalogue_entry_offline_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SHPEFT_OFFLINE", "1")
    r = CliRunner().invoke(tasks_cli, ["check", str(tmp_path), "--format", "medmnist", "--catalogue", "pathmnist"])
    assert r.exit_code == 2
    assert "pathmnist.npz" in r.output and "zenodo.org/records/10519652/files/pathmnist.npz" in r.output
