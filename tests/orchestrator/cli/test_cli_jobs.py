"""`shpeft run`, `compare`, `validate`, `schema`: a bad job file is one message naming its field, exit 2,
nothing written and Ray never started; good ones reach their workflow with every option."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from helpers_cli import SHPEFT, good_job, invoke, write_two_class_folder


@pytest.mark.parametrize(
    "section,key,value,field",
    [
        ("selection", "density", 1.5, "selection.density"),
        ("selection", "alpha", -0.1, "selection.alpha"),
        ("training", "workers_per_task", 0, "training.workers_per_task"),
        ("training", "epochz", 3, "training.epochz"),
    ],
)
def test_run_bad_job_exits_2_and_writes_nothing(tmp_path, monkeypatch, section, key, value, field):
    import orchestrator.workflows.run as pipeline

    called = []
    monkeypatch.setattr(pipeline, "run_job", lambda *a, **k: called.append(1))
    job = good_job(tmp_path)
    job.setdefault(section, {})[key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(job))
    res = invoke("run", path)
    assert res.exit_code == 2
    assert field in res.output
    assert "error:" in res.output
    assert not called
    assert not (tmp_path / "store").exists()


def test_run_bad_job_console_script(tmp_path):
    job = good_job(tmp_path)
    job["selection"] = {"density": 0}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(job))
    out = subprocess.run([str(SHPEFT), "run", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "selection.density" in out.stderr
    assert out.stderr.count("\n") <= 2  # one clear message, no traceback
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("cmd", ["run", "compare"])
def test_unwritable_store_exits_2_before_ray_starts(tmp_path, cmd):
    """A store under a file cannot be written: one line naming it, exit 2, Ray never started."""
    import ray

    (tmp_path / "afile").write_text("x")
    job = good_job(tmp_path)
    job["store"] = str(tmp_path / "afile" / "store")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    res = invoke(cmd, path)
    assert res.exit_code == 2 and res.output.startswith("error:")
    # every problem on its own line, each naming its field: the store under a file, the missing data
    lines = res.output.splitlines()[1:]
    assert any(ln.startswith("  - store: ") and "afile" in ln for ln in lines), res.output
    assert any(ln.startswith("  - tasks[0] (t1): ") for ln in lines), res.output
    assert not ray.is_initialized()


def test_validate_lists_every_problem_with_its_field(tmp_path):
    """One run of `shpeft validate` reports every pre-compute problem, each naming its field."""
    (tmp_path / "data" / "a").mkdir(parents=True)
    job = good_job(tmp_path)
    job["backbone"] = {"name": "vit_tiny_nope"}
    job["tasks"].append({"catalogue": "bussi", "source": str(tmp_path)})
    job["tasks"].append({"catalogue": "busi", "source": str(tmp_path), "overrides": {"colour": "red"}})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    res = invoke("validate", path, "--num-cpus", 0.5)
    assert res.exit_code == 2
    out = res.output
    assert "backbone.name: 'vit_tiny_nope' is not a timm model" in out
    assert "tasks[1].catalogue/overrides: " in out and "bussi" in out
    assert "tasks[2].catalogue/overrides: " in out and "colour" in out
    assert "tasks[0] (t1): " in out  # a folder with no images in the stated format
    assert "training.workers_per_task / cpus_per_worker / gpus_per_worker: " in out
    good = good_job(tmp_path)
    good["tasks"] = [{"name": "t1", "source": str(tmp_path / "colour-a"), "format": "imagefolder", "num_classes": 3}]
    from tasks.synthetic import write_colour_task

    write_colour_task(str(tmp_path), "colour-a", 0)
    path.write_text(yaml.safe_dump(good))
    res = invoke("validate", path)
    assert res.exit_code == 0 and ": ok (1 task(s)" in res.output, res.output


def test_schema_prints_the_job_json_schema():
    res = invoke("schema")
    schema = json.loads(res.output)
    assert res.exit_code == 0 and set(schema["properties"]) >= {"backbone", "tasks", "method", "selection", "sweep"}
    assert "description" in schema["$defs"]["SelectionSection"]["properties"]["mix"]


def test_job_file_that_is_not_utf8_exits_2_naming_it(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"backbone: {name: test_vit}\nstore: \xff\xfe\n")
    res = invoke("validate", path)
    assert res.exit_code == 2 and "job.yaml is not UTF-8" in res.output and "Traceback" not in res.output


def test_backbone_without_eligible_weights_exits_2_naming_rules(tmp_path):
    import ray

    job = good_job(tmp_path)
    job["selection"] = {"rules": [r"no\.such\.layer"]}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    res = invoke("run", path)
    assert res.exit_code == 2
    assert "selection.rules: no weight of test_vit is eligible" in res.output
    assert not ray.is_initialized()
    job["method"] = {"name": "lora"}  # a method that selects nothing needs no eligible weights
    path.write_text(yaml.safe_dump(job))
    from orchestrator.job.load import load_job
    from orchestrator.workflows.preflight import preflight

    assert preflight(load_job(path)) is not None


def test_run_missing_job_file(tmp_path):
    res = invoke("run", tmp_path / "nope.yaml")
    assert res.exit_code == 2 and "nope.yaml" in res.output


def test_run_passes_options_and_exit_code(tmp_path, monkeypatch):
    import orchestrator.workflows.run as pipeline

    seen = {}

    class Result:
        exit_code = 1

    def fake_run_job(job, **kw):
        seen.update(kw, job=job)
        return Result()

    monkeypatch.setattr(pipeline, "run_job", fake_run_job)
    write_two_class_folder(tmp_path / "data")  # `run` validates the dataset before anything runs
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(good_job(tmp_path)))
    res = invoke("run", path, "--address", "auto", "--num-cpus", 3, "--force", "--no-progress")
    assert res.exit_code == 1
    assert seen["address"] == "auto" and seen["num_cpus"] == 3 and seen["force"] is True
    assert seen["progress"] is False
    assert seen["job"].backbone.name == "test_vit"


def _compare_call(tmp_path, monkeypatch, *args):
    """`shpeft compare JOB ARGS` with run_compare recording what it was given; (exit code, output, calls)."""
    import orchestrator.workflows.compare as compare

    calls = []

    class Result:
        exit_code = 0

    monkeypatch.setattr(compare, "run_compare", lambda job, **kw: calls.append({**kw, "job": job}) or Result())
    write_two_class_folder(tmp_path / "data")
    job = good_job(tmp_path)
    job["training"] = {"epochs": 4}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    res = invoke("compare", path, *args)
    return res.exit_code, res.output, calls


def test_compare_runs_every_default_method_with_the_job_as_written(tmp_path, monkeypatch):
    from orchestrator.workflows.compare import DEFAULT_METHODS

    code, out, (call,) = _compare_call(tmp_path, monkeypatch, "--seeds", 2, "--no-progress", "--force")
    assert code == 0, out
    assert call["methods"] == list(DEFAULT_METHODS) and call["seeds"] == 2
    assert call["job"].training.epochs == 4 and call["force"] is True and call["progress"] is False


def test_compare_smoke_test_is_one_epoch_one_seed_and_three_methods(tmp_path, monkeypatch):
    code, out, (call,) = _compare_call(tmp_path, monkeypatch, "--smoke-test", "--seeds", 5)
    assert code == 0, out
    assert call["methods"] == ["shpeft", "linear", "full"] and call["seeds"] == 1
    assert call["job"].training.epochs == 1
    # methods given: kept (rules too), still one epoch and one seed
    code, out, calls = _compare_call(tmp_path, monkeypatch, "--smoke-test", "--methods", "shpeft:rank_sum,bitfit")
    assert code == 0 and calls[0]["methods"] == ["shpeft:rank_sum", "bitfit"] and calls[0]["seeds"] == 1
    assert calls[0]["job"].training.epochs == 1


@pytest.mark.parametrize("methods,message", [("shpeft,sparse", "'sparse' is not a method"),
                                             ("linear:union", "only shpeft takes a rule"),
                                             (" , ", "no method given")])
def test_compare_bad_methods_exit_2_before_running(tmp_path, monkeypatch, methods, message):
    code, out, calls = _compare_call(tmp_path, monkeypatch, "--methods", methods)
    assert code == 2 and out.startswith("error: --methods") and message in out, out
    assert calls == []


@pytest.mark.parametrize("cmd", ["validate", "run", "compare"])
def test_an_empty_task_agnostic_pool_exits_2_naming_the_task_before_ray_starts(tmp_path, cmd):
    """One task, no pool datasets, and a pooled agnostic map asked for: one problem naming the task and the
    ways out, exit 2, no Ray. Left at auto the same job validates, with a note on the magnitude map."""
    import ray

    from tasks.synthetic import write_colour_task

    write_colour_task(str(tmp_path), "my-texture", 0, n_train=6, n_eval=3)
    job = good_job(tmp_path)
    job["tasks"] = [{"name": "my-texture", "source": str(tmp_path / "my-texture"), "format": "imagefolder"}]
    job["importance"] = {"agnostic": "pool"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    res = invoke(cmd, path)
    assert res.exit_code == 2 and not ray.is_initialized()
    (problem,) = [ln for ln in res.output.splitlines() if ln.startswith("  - ")]
    assert problem.startswith("  - tasks[0] (my-texture): its task-agnostic pool is empty")
    assert "importance.pool_datasets" in problem and "importance.agnostic: magnitude" in problem
    if cmd == "validate":
        del job["importance"]
        path.write_text(yaml.safe_dump(job))
        res = invoke("validate", path)
        assert res.exit_code == 0, res.output
        note = res.output.splitlines()[-1]
        assert note.startswith("note: my-texture: no other dataset to pool") and "magnitude |w|" in note


def test_compare_passes_tuning_seed_and_budget_options(tmp_path, monkeypatch):
    code, out, (call,) = _compare_call(tmp_path, monkeypatch, "--methods", "shpeft,shpeft@0.001,full",
                                       "--tune-points", 0, "--fixed-importance", "--equal-budget",
                                       "--reference", "full")
    assert code == 0, out
    assert call["methods"] == ["shpeft", "shpeft@0.001", "full"]
    assert call["tune"] is False and call["tune_points"] == 0 and call["fixed_importance"] is True
    assert call["equal_budget"] is True and call["reference"] == "full"
    code, out, (call,) = _compare_call(tmp_path, monkeypatch, "--methods", "shpeft,linear")
    assert call["tune"] is True and call["tune_points"] == 3 and call["fixed_importance"] is False


@pytest.mark.parametrize("args,message", [(("--methods", "linear,full"), "--reference: 'shpeft' is not among"),
                                          (("--methods", "shpeft@0", "--reference", "shpeft"), "in (0, 1]"),
                                          (("--methods", "full@0.01",), "only mask methods take a density")])
def test_compare_bad_reference_or_density_exit_2(tmp_path, monkeypatch, args, message):
    code, out, calls = _compare_call(tmp_path, monkeypatch, *args)
    assert code == 2 and message in out and "Traceback" not in out, out
    assert calls == []
