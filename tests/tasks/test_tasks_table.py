"""The label-table format on miniature official layouts (CheXpert, ChestX-ray14, ISIC 2018, APTOS 2019):
counts, uncertain and blank policies, patient-level splits, and one clear error per bad input."""

import os

import numpy as np
import pytest
from click.testing import CliRunner

from helpers_tables import (CHEXPERT, CXR14, ISIC18, aptos_layout, chestxray14_layout, chexpert_layout,
                            isic2018_layout)
from orchestrator.cli.tasks import tasks_cli
from tasks.catalogue import CATALOGUE
from tasks.check import check_dataset
from tasks.codecs.images import DatasetError
from tasks.loaders import build_dataset, build_loader
from tasks.spec import SPLITS, TaskSpec


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("chexpert"))
    return root, chexpert_layout(root)


def _patient(path: str) -> str:
    return next(p for p in path.split("/") if p.startswith("patient"))


def _cells(truth, split_of_row):
    """Expected positives / unknown per split from the written cells, with uncertain ignored, blank negative."""
    pos = {s: np.zeros(len(CHEXPERT), int) for s in SPLITS}
    unk = {s: np.zeros(len(CHEXPERT), int) for s in SPLITS}
    for rel, (_, _, cells) in truth.items():
        s = split_of_row[rel]
        pos[s] += [c == "1.0" for c in cells]
        unk[s] += [c == "-1.0" for c in cells]
    return pos, unk


def test_chexpert_layout_counts_uncertain_labels_and_keeps_patients_together(chexpert):
    root, truth = chexpert
    spec = CATALOGUE["chexpert"].to_spec(root)
    report = check_dataset(spec)
    split_of = {}
    for s in SPLITS:
        ds = build_dataset(spec, s)
        for p in ds.paths.tolist():
            split_of[p[len(root) + 1:]] = s
    assert set(split_of) == set(truth)
    pos, unk = _cells(truth, split_of)
    for s in SPLITS:
        assert report.counts[s] == pos[s].tolist() and report.unknown[s] == unk[s].tolist()
    # the official valid.csv is the test split; validation is drawn from train by patient
    assert {r for r, s in split_of.items() if s == "test"} == {r for r, t in truth.items() if t[0] == "test"}
    assert report.images["val"] > 0 and report.groups["val"] > 0
    patients = {}
    for rel, s in split_of.items():
        patients.setdefault(_patient(rel), set()).add(s)
    assert all(len(s) == 1 for s in patients.values())
    assert sum(report.groups.values()) == len(patients)
    assert report.kind == "multi_label" and not report.warnings


@pytest.mark.parametrize("policy,blank", [("positive", "negative"), ("negative", "ignore"), ("ignore", "ignore")])
def test_uncertain_and_blank_policies(chexpert, policy, blank):
    root, truth = chexpert
    spec = CATALOGUE["chexpert"].to_spec(root, table={"uncertain": policy, "blank": blank})
    cells = np.array([t[2] for t in truth.values()])
    got = np.concatenate([build_dataset(spec, s).targets for s in SPLITS])
    assert got.shape == (len(truth), len(CHEXPERT)) and got.dtype == np.float32
    ones, minus, empty = (cells == "1.0").sum(), (cells == "-1.0").sum(), (cells == "").sum()
    assert (got == 1).sum() == ones + (minus if policy == "positive" else 0)
    assert np.isnan(got).sum() == (minus if policy == "ignore" else 0) + (empty if blank == "ignore" else 0)
    # one finding may take another policy
    one = CATALOGUE["chexpert"].to_spec(root, table={"uncertain_per_finding": {"Edema": "positive"}})
    got = np.concatenate([build_dataset(one, s).targets for s in SPLITS])
    k = CHEXPERT.index("Edema")
    assert (got[:, k] == 1).sum() == (cells[:, k] == "1.0").sum() + (cells[:, k] == "-1.0").sum()
    assert np.isnan(got).sum() == minus - (cells[:, k] == "-1.0").sum()


def test_loader_yields_float_findings_with_nan_for_unknown(chexpert):
    root, _ = chexpert
    spec = CATALOGUE["chexpert"].to_spec(root, image_size=12)
    x, y = next(iter(build_loader(spec, "train", transform=None, batch_size=8)))
    assert x.shape == (8, 3, 12, 12) and y.shape == (8, len(CHEXPERT)) and y.dtype.is_floating_point
    assert set(y[~y.isnan()].unique().tolist()) <= {0.0, 1.0}


def test_chestxray14_layout_pipe_separated_findings_split_lists_and_file_names(tmp_path):
    root = str(tmp_path)
    truth = chestxray14_layout(root)
    spec = CATALOGUE["chestxray14"].to_spec(root)
    report = check_dataset(spec, decode=False)
    rows = {}
    for s in SPLITS:
        ds = build_dataset(spec, s)
        for p, t in zip(ds.paths.tolist(), ds.targets):
            rows[os.path.basename(p)] = (s, t)
    assert set(rows) == set(truth)
    for name, (where, patient, found) in truth.items():
        s, t = rows[name]
        assert (s == "test") == (where == "test")
        assert [CXR14[k] for k in np.flatnonzero(t == 1)] == sorted(found, key=CXR14.index)
        assert not np.isnan(t).any()
    no_finding = [n for n, (_, _, f) in truth.items() if not f]
    assert no_finding and all((rows[n][1] == 0).all() for n in no_finding)
    by_patient = {}
    for name, (_, patient, _) in truth.items():
        by_patient.setdefault(patient, set()).add(rows[name][0])
    assert all(len(s) == 1 for s in by_patient.values()) and report.images["val"] > 0
    # a finding that is not one of the task's is named with its table line
    csv = os.path.join(root, "Data_Entry_2017_v2020.csv")
    lines = open(csv).read().splitlines()
    lines[3] = lines[3].replace(lines[3].split(",")[1], "Cardiomegaly|Tumour", 1)
    open(csv, "w").write("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"Data_Entry_2017_v2020.csv line 4: .*'Tumour' is not a finding"):
        build_dataset(spec, "train")


def test_isic2018_layout_official_splits_one_hot(tmp_path):
    root = str(tmp_path)
    truth = isic2018_layout(root)
    spec = CATALOGUE["isic2018"].to_spec(root)
    report = check_dataset(spec)
    assert report.images == {"train": 35, "val": 8, "test": 10}
    part = {"train": "Training", "val": "Validation", "test": "Test"}
    for s in SPLITS:
        ds = build_dataset(spec, s)
        for p, k in zip(ds.paths.tolist(), ds.labels):
            ident = os.path.basename(p)[:-4]
            assert truth[ident] == (part[s], k)
    assert report.counts["train"] == [sum(1 for t in truth.values() if t == ("Training", k)) for k in range(len(ISIC18))]
    gt = os.path.join(root, "ISIC2018_Task3_Test_GroundTruth", "ISIC2018_Task3_Test_GroundTruth.csv")
    lines = open(gt).read().splitlines()
    lines[2] = lines[2].split(",")[0] + "," + ",".join(["1.0", "1.0"] + ["0.0"] * 5)
    open(gt, "w").write("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"ISIC2018_Task3_Test_GroundTruth.csv line 3: one-hot columns .* exactly one 1"):
        build_dataset(spec, "test")


def test_aptos_layout_ordinal_grades_in_a_seeded_stratified_split(tmp_path):
    root = str(tmp_path)
    truth = aptos_layout(root)
    spec = CATALOGUE["aptos2019"].to_spec(root)
    report = check_dataset(spec)
    assert spec.kind == "ordinal" and report.kind == "ordinal" and sum(report.images.values()) == len(truth)
    seen = {}
    for s in SPLITS:
        ds = build_dataset(spec, s)
        for p, g in zip(ds.paths.tolist(), ds.labels):
            seen[os.path.basename(p)[:-4]] = (s, g)
    assert {k: g for k, (_, g) in seen.items()} == truth
    for s in SPLITS:  # every grade in every split (stratified), each image once
        assert all(n > 0 for n in report.counts[s]), (s, report.counts)
    again = {os.path.basename(p) for p in build_dataset(spec.model_copy(update={"split_seed": 0}), "val").paths}
    other = {os.path.basename(p) for p in build_dataset(spec.model_copy(update={"split_seed": 5}), "val").paths}
    assert again == {k + ".png" for k, (s, _) in seen.items() if s == "val"} and other != again
    # a copy elsewhere draws the same splits (groups are named inside the dataset, not by where it lives)
    import shutil

    copy = shutil.copytree(root, str(tmp_path.parent / (tmp_path.name + "-copy")))
    moved = CATALOGUE["aptos2019"].to_spec(copy)
    assert {os.path.basename(p) for p in build_dataset(moved, "val").paths} == again


def _table(tmp_path, rows, header="path,label", **layout):
    root = tmp_path / "t"
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    from PIL import Image

    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / "img" / f"{i}.png")
    (root / "labels.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return TaskSpec(name="t", source=str(root), format="table", num_classes=2,
                    table={"files": "labels.csv", **layout})


@pytest.mark.parametrize("path,message", [
    ("../outside.png", "climbs out of the image root"),
    ("/etc/passwd", "is outside the image root"),
    ("https://example.org/x.png", "is a URL"),
])
def test_paths_must_stay_inside_the_image_root(tmp_path, path, message):
    spec = _table(tmp_path, ["img/0.png,0", "img/1.png,1", f"{path},0"])
    with pytest.raises(DatasetError, match=f"labels.csv line 4: path='{path}' {message}"):
        build_dataset(spec, "train")


def test_urls_only_when_allowed(tmp_path):
    import fsspec

    spec = _table(tmp_path, ["img/0.png,0", "img/1.png,1", "img/2.png,0", "img/3.png,1", "memory://urls/a.png,0"],
                  allow_urls=True, split_column=None)
    fsspec.filesystem("memory").pipe("/urls/a.png", (tmp_path / "t" / "img" / "0.png").read_bytes())
    images = [img for s in SPLITS for img in build_dataset(spec, s).iter_images()]
    assert len(images) == 5


def test_symlink_out_of_the_root_is_refused_when_opened(tmp_path):
    spec = _table(tmp_path, ["img/0.png,0", "img/1.png,1", "img/link.png,0"], split_column=None)
    outside = tmp_path / "secret.png"
    outside.write_bytes((tmp_path / "t" / "img" / "0.png").read_bytes())
    os.symlink(outside, tmp_path / "t" / "img" / "link.png")
    with pytest.raises(DatasetError, match="outside the dataset folder"):
        for s in SPLITS:
            list(build_dataset(spec, s).iter_images())


def test_only_regular_files_are_read(tmp_path):
    spec = _table(tmp_path, ["img/0.png,0", "img/1.png,1", "img/fifo.png,0"], split_column=None)
    os.mkfifo(tmp_path / "t" / "img" / "fifo.png")
    with pytest.raises(DatasetError, match="fifo.png: is a FIFO, not a regular file"):
        for s in SPLITS:
            list(build_dataset(spec, s).iter_images())
    with pytest.raises(DatasetError, match="fifo.png: is a FIFO"):
        check_dataset(spec, decode=False)  # the listing for missing files finds it without opening it


def test_bad_cells_and_columns_name_the_file_line_and_field(tmp_path):
    spec = _table(tmp_path, ["img/0.png,0", "img/1.png,7"])
    with pytest.raises(DatasetError, match=r"labels.csv line 3: label='7' is not an integer in 0..1"):
        build_dataset(spec, "train")
    spec = _table(tmp_path, ["img/0.png,0"], header="file,label")
    with pytest.raises(DatasetError, match=r"labels.csv: column\(s\) \['path'\] missing; its columns are \['file', 'label'\]"):
        build_dataset(spec, "train")
    spec = _table(tmp_path, ["img/0.png,0,train", "img/1.png,1,holdout"], header="path,label,fold",
                  split_column="fold")
    with pytest.raises(DatasetError, match=r"line 3: fold='holdout' is not train/val/test"):
        build_dataset(spec, "train")
    spec = TaskSpec(name="t", source=str(tmp_path / "t"), format="table", kind="multi_label", num_classes=2,
                    class_names=["a", "b"], table={"files": "labels.csv", "label_columns": ["a", "b"]})
    (tmp_path / "t" / "labels.csv").write_text("path,a,b\nimg/0.png,1,0\nimg/1.png,2,\n")
    with pytest.raises(DatasetError, match=r"line 3 column 'a': 2 is not 1, 0, -1 \(uncertain\) or blank"):
        build_dataset(spec, "train")


def test_check_reports_missing_files_and_groups_that_cross_splits(tmp_path):
    rows = ["img/0.png,0,p1,train", "img/1.png,1,p2,train", "img/2.png,0,p1,test", "img/3.png,1,p3,val"]
    spec = _table(tmp_path, rows, header="path,label,patient,split", group_column="patient")
    report = check_dataset(spec)
    assert any("1 group(s) have images in more than one split" in w and "p1" in w for w in report.warnings)
    assert report.groups == {"train": 2, "val": 1, "test": 1}
    spec = _table(tmp_path, rows + ["img/gone.png,1,p4,train", "img/gone2.png,0,p5,test"],
                  header="path,label,patient,split", group_column="patient")
    with pytest.raises(DatasetError, match=r"2 of 6 rows name image files that are missing: .*labels.csv line 6: .*gone.png"):
        check_dataset(spec, decode=False)
    res = CliRunner().invoke(tasks_cli, ["check", spec.source, "--format", "table", "--num-classes", "2",
                                         "--table", "labels.csv", "--group-column", "patient"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "missing" in res.output


def test_cli_check_of_a_catalogue_layout(chexpert):
    root, _ = chexpert
    res = CliRunner().invoke(tasks_cli, ["check", root, "--catalogue", "chexpert", "--no-decode"])
    assert res.exit_code == 0, res.output
    assert "finding: positive images (unknown)" in res.output and "groups (patients)" in res.output
    assert "13: Support Devices" in res.output and "valid" in res.output


def test_spec_rules_for_kinds_and_layouts():
    base = dict(name="t", source="/d", num_classes=3)
    with pytest.raises(ValueError, match="kappa.*needs kind='ordinal'"):
        TaskSpec(**base, format="table", metric="kappa")
    with pytest.raises(ValueError, match="multi_label' needs a format"):
        TaskSpec(**base, format="imagefolder", kind="multi_label")
    with pytest.raises(ValueError, match="applies to format 'table'"):
        TaskSpec(**base, format="parquet", table={"files": "x.csv"})
    with pytest.raises(ValueError, match="label_columns has 2 columns"):
        TaskSpec(**base, format="table", table={"label_columns": ["a", "b"]})
    with pytest.raises(ValueError, match="separator joins several findings"):
        TaskSpec(**base, format="table", table={"separator": "|"})
    with pytest.raises(ValueError, match="group_pattern"):
        TaskSpec(**base, format="table", table={"group_pattern": "(unclosed"})
    # fields added later are left out of the serialised spec at their defaults: old job ids stay
    plain = TaskSpec(**base, format="imagefolder")
    assert "kind" not in plain.model_dump() and "table" not in plain.model_dump(mode="json")
    assert TaskSpec.model_validate(plain.model_dump()) == plain
    multi = TaskSpec(**base, format="table", kind="multi_label", table={"separator": "|"})
    assert multi.model_dump(mode="json")["kind"] == "multi_label"
    assert TaskSpec.model_validate_json(multi.model_dump_json()) == multi
