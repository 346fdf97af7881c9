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
    r = CliRunner().invoke(tasks_cli, ["check", str(tmp_path), "--format", "imagefolder"])
    assert r.exit_code == 2 and "--num-classes" in r.output


def test_check_with_catalogue_entry_offline_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SHPEFT_OFFLINE", "1")
    r = CliRunner().invoke(tasks_cli, ["check", str(tmp_path), "--format", "medmnist", "--catalogue", "pathmnist"])
    assert r.exit_code == 2
    assert "pathmnist.npz" in r.output and "zenodo.org/records/10519652/files/pathmnist.npz" in r.output
