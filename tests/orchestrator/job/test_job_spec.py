"""Job-file validation and the catalogue table (no Ray)."""

import os

import pytest

from orchestrator.store.results import SCHEMA, read_catalogue, write_rows
from orchestrator.job.spec import JobSpecError
from orchestrator.job.keys import job_id
from orchestrator.job.load import load_job, parse_job

BASE = {
    "backbone": {"name": "test_vit", "kwargs": {"img_size": 32}},
    "store": "/tmp/unused-store",
    "tasks": [{"name": "t1", "source": "/data/t1", "format": "imagefolder", "num_classes": 3}],
}


def _with(**sections):
    out = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in BASE.items()}
    out.update(sections)
    return out


def test_valid_job_has_defaults_and_stable_id():
    job = parse_job(_with())
    assert job.selection.density == 1e-4 and job.training.workers_per_task == 1
    assert job_id(job) == job_id(parse_job(_with()))
    assert job_id(job) != job_id(parse_job(_with(selection={"density": 0.5})))
    assert len(job_id(job)) == 12


@pytest.mark.parametrize(
    "sections, field, allowed",
    [
        ({"selection": {"density": 0.0}}, "selection.density", "(0, 1]"),
        ({"selection": {"density": 1.5}}, "selection.density", "(0, 1]"),
        ({"selection": {"alpha": -0.1}}, "selection.alpha", "[0, 1]"),
        ({"training": {"workers_per_task": 0}}, "training.workers_per_task", ">= 1"),
        ({"training": {"epochs": "ten"}}, "training.epochs", "integer"),
        ({"selection": {"granularity": "rows"}}, "selection.granularity", "'per_row'"),
        ({"importance": {"estimator": "fisher"}}, "importance.estimator", "'grad2'"),
        ({"sweep": {"density_range": [0.0, 0.1]}}, "sweep.density_range", "(0.0, 1.0]"),
        ({"tasks": [{"name": "t1", "source": "x", "format": "zip", "num_classes": 2}]}, "tasks[0].format", "'parquet'"),
        ({"tasks": [{"catalogue": "busi"}]}, "tasks[0].source", "required"),
        ({"colour": "red"}, "colour", "allowed keys here"),
        ({"training": {"epochs": 2, "lr_schedule": "cos"}}, "training.lr_schedule", "allowed keys here"),
    ],
)
def test_bad_values_name_the_field_and_the_allowed_values(sections, field, allowed):
    with pytest.raises(JobSpecError) as err:
        parse_job(_with(**sections), "job.yaml")
    msg = str(err.value)
    assert f"{field}:" in msg and allowed in msg and "job.yaml" in msg


def test_pool_must_name_known_datasets():
    with pytest.raises(JobSpecError, match=r"importance.pool names \['nope'\] are unknown"):
        parse_job(_with(importance={"pool": ["nope"]}))


def test_duplicate_task_names_rejected():
    t = BASE["tasks"][0]
    with pytest.raises(JobSpecError, match="unique"):
        parse_job(_with(tasks=[t, t]))


def test_load_job_yaml_errors(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("backbone: [unclosed\n")
    with pytest.raises(JobSpecError, match="not valid YAML"):
        load_job(bad_yaml)
    with pytest.raises(JobSpecError, match="cannot be read"):
        load_job(tmp_path / "missing.yaml")
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(JobSpecError, match="top level must be a mapping"):
        load_job(top)


def test_catalogue_upserts_rows_atomically(tmp_path):
    store = str(tmp_path / "store")
    write_rows(store, "job1", [{"task": "a", "status": "ok", "val_macro_f1": 0.5, "bytes": 10}])
    write_rows(store, "job1", [{"task": "b", "status": "failed", "error": "boom"}])
    write_rows(store, "job1", [{"task": "a", "status": "ok", "val_macro_f1": 0.75, "bytes": 12}])
    write_rows(store, "job2", [{"task": "a", "status": "ok"}])
    one = read_catalogue(store, "job1")
    assert one.schema == SCHEMA
    rows = {r["task"]: r for r in one.to_pylist()}
    assert rows["a"]["val_macro_f1"] == 0.75 and rows["a"]["bytes"] == 12 and rows["b"]["error"] == "boom"
    assert read_catalogue(store).num_rows == 3
    assert read_catalogue(str(tmp_path / "empty")).num_rows == 0
    assert not [p for p in os.listdir(tmp_path / "store" / "catalogue") if ".tmp-" in p]
    with pytest.raises(KeyError, match="unknown columns"):
        write_rows(store, "job1", [{"task": "a", "colour": "red"}])


def test_method_mix_rules_and_lr_settings():
    job = parse_job(_with())
    assert job.method.name == "shpeft" and job.selection.mix in ("union", "rank_sum")
    assert job.training.lr is None and job.training.head_init == "warm" and not job.importance.include_target
    job = parse_job(_with(method={"name": "lora", "per_task": {"t1": "full"}, "lora": {"rank": 4}},
                          selection={"mix": "rank_sum", "rules": [r"blocks\.\d+\.mlp\.fc1"]},
                          sweep={"lr_range": [1e-4, 1e-2]}))
    assert job.method.for_task("t1") == "full" and job.method.lora.rank == 4
    assert job.selection.rules == [r"blocks\.\d+\.mlp\.fc1"] and job.sweep.lr_range == (1e-4, 1e-2)


@pytest.mark.parametrize(
    "sections, match",
    [
        ({"method": {"name": "adapter"}}, r"method\.name: .*'shpeft'"),
        ({"method": {"per_task": {"nope": "lora"}}}, r"method\.per_task names \['nope'\] are not tasks"),
        ({"selection": {"mix": "max"}}, r"selection\.mix: .*'union'"),
        ({"selection": {"rules": ["blocks.(["]}}, r"selection\.rules: .*not a regular expression"),
        ({"sweep": {"lr_range": [0.1, 0.01]}}, r"sweep\.lr_range: .*low <= high"),
    ],
)
def test_new_settings_name_their_field(sections, match):
    with pytest.raises(JobSpecError, match=match):
        parse_job(_with(**sections))


def test_learning_rate_per_method_wins_over_training_lr_and_defaults():
    from shpeft_core.methods import default_lrs

    from orchestrator.job.plan import build_plan
    from tasks.spec import TaskSpec

    spec = TaskSpec(name="t1", source="/data/t1", format="imagefolder", num_classes=3)

    def lr(**sections):
        job = parse_job(_with(**sections))
        return {m: build_plan(job, spec, method=m, seed=0, backbone_fp="fp", specific=None, agnostic=None,
                              agnostic_includes_target=False, artifact_uri=None).train["lr"]
                for m in ("shpeft", "full")}

    assert lr() == {"shpeft": default_lrs()["shpeft"], "full": default_lrs()["full"]}
    assert lr(training={"lr": 0.5}) == {"shpeft": 0.5, "full": 0.5}
    assert lr(training={"lr": 0.5}, method={"lr": {"full": 2e-3}}) == {"shpeft": 0.5, "full": 2e-3}
    with pytest.raises(JobSpecError, match=r"method\.lr"):
        parse_job(_with(method={"lr": {"full": 0}}))
    with pytest.raises(JobSpecError, match=r"method\.lr"):
        parse_job(_with(method={"lr": {"adapter": 1e-3}}))


def _folders(root, names, n=4):
    import io as _io

    import numpy as np
    from PIL import Image

    for c in names:
        os.makedirs(root / c)
        for i in range(n):
            buf = _io.BytesIO()
            Image.fromarray(np.full((8, 8), 30 * i, np.uint8)).save(buf, format="PNG")
            (root / c / f"{i}.png").write_bytes(buf.getvalue())


def test_a_job_whose_classes_come_from_folders_has_the_id_of_the_one_written_out(tmp_path):
    """Inferred classes are written into the job before its id is taken: the same id, the same stored job."""
    from orchestrator.job.classes import with_classes

    names = ["coarse", "fine", "medium", "very-coarse"]
    _folders(tmp_path / "tex", names)
    task = {"name": "t1", "source": str(tmp_path / "tex"), "format": "imagefolder"}
    left_out = parse_job(_with(tasks=[task]))
    written = parse_job(_with(tasks=[{**task, "num_classes": 4, "class_names": names}]))
    names_only = parse_job(_with(tasks=[{**task, "class_names": names}]))
    assert left_out.tasks[0].num_classes is None
    assert job_id(left_out) == job_id(written) == job_id(names_only)
    assert with_classes(left_out) == written and with_classes(written) is written  # nothing listed when written
    # a pool dataset is resolved the same way, and its entry is named when it cannot be
    pooled = parse_job(_with(importance={"pool_datasets": [{**task, "name": "p1"}]}))
    assert with_classes(pooled).importance.pool_datasets[0].class_names == names
    broken = parse_job(_with(importance={"pool_datasets": [{**task, "name": "p1", "source": str(tmp_path / "nope")}]}))
    with pytest.raises(JobSpecError, match=r"importance\.pool_datasets\[0\] \(p1\): .*nope: does not exist"):
        job_id(broken)
    _folders(tmp_path / "one", ["only"])
    with pytest.raises(JobSpecError, match=r"tasks\[0\] \(t1\): .*found 1 class folder"):
        with_classes(parse_job(_with(tasks=[{**task, "source": str(tmp_path / "one")}])))


def test_formats_that_read_labels_still_need_num_classes_in_the_job():
    with pytest.raises(JobSpecError, match=r"tasks\[0\]: num_classes is required for format 'parquet'"):
        parse_job(_with(tasks=[{"name": "t1", "source": "/d", "format": "parquet"}]), "job.yaml")


def test_an_empty_task_agnostic_pool_is_found_before_any_compute():
    """One task, no pool datasets: auto takes the magnitude map (and says so), pool is a problem naming the task
    and every way out, unless no run of the job mixes in an agnostic map."""
    from orchestrator.job.agnostic import agnostic_notes, agnostic_source, empty_pool_problems, pool_members
    from orchestrator.workflows.validate import validate_job

    lone = parse_job(_with())
    assert lone.importance.agnostic == "auto" and empty_pool_problems(lone) == []
    (note,) = agnostic_notes(lone)
    assert note.startswith("t1: no other dataset to pool") and "magnitude |w|" in note
    assert agnostic_source(lone, pool_members(lone, "t1", ["t1"], [])) == "magnitude"

    strict = parse_job(_with(importance={"agnostic": "pool"}))
    (problem,) = empty_pool_problems(strict)
    assert problem.startswith("tasks[0] (t1): its task-agnostic pool is empty")
    for way_out in ("importance.pool_datasets", "importance.agnostic: magnitude", "importance.include_target: true",
                    "selection.alpha: 1"):
        assert way_out in problem
    assert problem in validate_job(strict, data=False) and agnostic_notes(strict) == []
    # ... and each way out is one
    pool_ds = {"name": "p1", "source": "/data/p1", "format": "imagefolder", "num_classes": 2}
    for sections in ({"importance": {"agnostic": "pool", "pool_datasets": [pool_ds]}},
                     {"importance": {"agnostic": "pool", "include_target": True}},
                     {"importance": {"agnostic": "magnitude"}},
                     {"importance": {"agnostic": "pool"}, "selection": {"alpha": 1.0}},
                     {"importance": {"agnostic": "pool"}, "method": {"name": "specific"}}):
        assert empty_pool_problems(parse_job(_with(**sections))) == [], sections
    # a sweep that may try alpha < 1 needs the map; compare's methods are what count there
    assert empty_pool_problems(parse_job(_with(importance={"agnostic": "pool"}, selection={"alpha": 1.0},
                                               sweep={"enabled": True})))
    assert empty_pool_problems(strict, methods=["linear", "specific", "full"]) == []
    assert empty_pool_problems(strict, methods=["linear", "agnostic"])
    # two tasks pool each other
    two = parse_job(_with(importance={"agnostic": "pool"},
                          tasks=[BASE["tasks"][0], {**BASE["tasks"][0], "name": "t2"}]))
    assert empty_pool_problems(two) == [] and agnostic_notes(parse_job(_with(tasks=two.model_dump()["tasks"]))) == []


def test_a_catalogue_written_before_a_column_existed_still_reads(tmp_path):
    import io as _io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.store.layout import catalogue_file

    old = pa.table({"job_id": ["j"], "task": ["a"], "status": ["ok"], "val_macro_f1": [0.5]})
    buf = _io.BytesIO()
    pq.write_table(old, buf)
    path = catalogue_file(str(tmp_path), "j")
    os.makedirs(os.path.dirname(path))
    open(path, "wb").write(buf.getvalue())
    (row,) = read_catalogue(str(tmp_path), "j").to_pylist()
    assert row["val_macro_f1"] == 0.5 and row["agnostic_source"] is None and set(row) == set(SCHEMA.names)
    write_rows(str(tmp_path), "j", [{"task": "b", "status": "ok", "agnostic_source": "magnitude"}])
    assert {r["task"]: r["agnostic_source"] for r in read_catalogue(str(tmp_path)).to_pylist()} == {
        "a": None, "b": "magnitude"}
