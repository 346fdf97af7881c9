"""End to end on a local 2-CPU Ray: deltas, catalogue, caching, resume after a killed worker, sweep."""

import json
import os

import pytest
import torch

ray = pytest.importorskip("ray")

from shpeft_core.delta import apply_delta, load_delta, merge_delta  # noqa: E402
from shpeft_core.io import exists, read_sealed_json, sha256_file, write_sealed_json  # noqa: E402
from tasks.loaders import build_loader  # noqa: E402
from tasks.transforms import transform_for  # noqa: E402

from orchestrator.store.results import read_catalogue  # noqa: E402
from orchestrator.store.evaluation_files import read_eval  # noqa: E402
from orchestrator.job.spec import JobSpecError  # noqa: E402
from orchestrator.job.keys import job_id
from orchestrator.job.load import load_job, parse_job  # noqa: E402
from orchestrator.workflows.run import run_job  # noqa: E402
from orchestrator.store.layout import eval_file, latest_artifact  # noqa: E402
from shpeft_core.backbone import build_backbone  # noqa: E402

from helpers_orch import BACKBONE, backbone_file, colour_task, task_specs  # noqa: E402,F401

pytestmark = pytest.mark.ray

def _job(store, specs, **over):
    job = {
        "backbone": BACKBONE,
        "store": str(store),
        "tasks": [s.model_dump(mode="json") for s in specs],
        "importance": {"batches": 2, "batch_size": 16},
        "selection": {"density": 0.02, "alpha": 0.5},
        "training": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "warmup_epochs": 0, "max_failures": 2},
    }
    for k, v in over.items():
        job[k] = {**job.get(k, {}), **v} if isinstance(v, dict) else v
    return parse_job(job)


@pytest.fixture(scope="module")
def first_run(ray_local, task_specs, tmp_path_factory):
    """Both tasks train at once; the first task's worker is killed once at the end of epoch 1."""
    store = tmp_path_factory.mktemp("store")
    job = _job(store, task_specs)
    os.environ["SHPEFT_FAULT_INJECT"] = f"{task_specs[0].name}:1"
    try:
        result = run_job(job, progress=False)
    finally:
        del os.environ["SHPEFT_FAULT_INJECT"]
    return job, result


def test_end_to_end_deltas_and_catalogue(first_run, task_specs):
    job, result = first_run
    assert result.exit_code == 0, result.rows
    assert result.job_id == job_id(job)
    # two task maps + each task's leave-one-out pool map (the other task's map)
    assert result.counters["importance_computed"] == 4
    assert result.counters["tasks_trained"] == 2
    table = read_catalogue(result.store, result.job_id).to_pylist()
    assert {r["task"] for r in table} == {s.name for s in task_specs}
    for row in table:
        assert row["status"] == "ok" and row["trained"] and row["error"] is None
        assert row["delta_uri"].endswith(f"deltas/{row['task']}/{result.job_id}-{row['config_hash']}.safetensors")
        assert latest_artifact(result.store, row["task"])["uri"] == row["delta_uri"]
        assert sha256_file(row["delta_uri"]) == row["sha256"]
        assert os.path.getsize(row["delta_uri"]) == row["bytes"]
        assert 0.0 <= row["val_macro_f1"] <= 1.0 and 0.0 <= row["test_accuracy"] <= 1.0
        assert row["trainable"] > row["sparse_values"] > 0
        assert row["importance_key"] and row["agnostic_key"] and row["importance_cache"] == "miss"
        # each task's agnostic map pools the other task (leave-one-out), and the catalogue and delta say so
        other = ({s.name for s in task_specs} - {row["task"]}).pop()
        assert row["agnostic_source"] == "pool" and row["agnostic_pool"] == other
        assert load_delta(row["delta_uri"]).metadata["agnostic_source"] == "pool"
    assert any(p.endswith("importance_mass_per_layer.png") for p in result.plots)


def test_killed_worker_resumes_from_checkpoint(first_run, task_specs):
    _, result = first_run
    rows = {r["task"]: r for r in result.rows}
    faulted, clean = rows[task_specs[0].name], rows[task_specs[1].name]
    assert faulted["status"] == "ok"
    assert faulted["resumed_from_epoch"] == 0  # restarted after epoch 0's checkpoint
    assert clean["resumed_from_epoch"] is None
    marker = os.path.join(result.store, "runs", f"{result.job_id}-{faulted['task']}-{faulted['config_hash']}",
                          "fault-injected.json")
    assert json.loads(open(marker).read()) == {"epoch": 1}


def test_resumed_task_delta_equals_an_unbroken_run(first_run, task_specs, tmp_path):
    """The task whose worker was killed after epoch 1 ends with the same delta as a run never killed."""
    job, result = first_run
    unbroken = run_job(_job(tmp_path / "store", task_specs), progress=False)
    assert unbroken.exit_code == 0, unbroken.rows
    for spec in task_specs:
        a = load_delta(latest_artifact(result.store, spec.name)["uri"])
        b = load_delta(latest_artifact(unbroken.store, spec.name)["uri"])
        assert a.indices.keys() == b.indices.keys()
        for n in a.indices:
            assert torch.equal(a.indices[n], b.indices[n]) and torch.equal(a.values[n], b.values[n]), n
        for n in a.head:
            assert torch.equal(a.head[n], b.head[n]), n


def test_pipeline_learns_and_trains_each_method(ray_local, tmp_path):
    """Learning, not just bounded metrics: a learnable task ends far above chance (1/3) for shpeft and lora."""
    specs = [colour_task(str(tmp_path), "colour-a", 0), colour_task(str(tmp_path), "colour-b", 1)]
    job = _job(tmp_path / "store", specs, training={"epochs": 3, "lr": None, "cpus_per_worker": 0.9},
               method={"name": "shpeft", "per_task": {"colour-b": "lora"}})
    result = run_job(job, progress=False)
    assert result.exit_code == 0, result.rows
    rows = {r["task"]: r for r in result.rows}
    assert rows["colour-a"]["method"] == "shpeft" and rows["colour-a"]["artifact_kind"] == "delta"
    assert rows["colour-b"]["method"] == "lora" and rows["colour-b"]["artifact_kind"] == "lora"
    assert os.path.exists(os.path.join(rows["colour-b"]["delta_uri"], "adapter_config.json"))
    for r in rows.values():
        assert r["val_macro_f1"] > 0.8 and r["test_macro_f1"] > 0.8, r
    delta = load_delta(rows["colour-a"]["delta_uri"])
    assert delta.metadata["method"] == "shpeft" and delta.metadata["mix"] == job.selection.mix
    assert delta.metadata["agnostic_includes_target"] == "false"


def test_second_run_computes_and_trains_nothing(first_run):
    job, first = first_run
    before = {r["task"]: r["sha256"] for r in first.rows}
    again = run_job(job, progress=False)
    assert again.exit_code == 0
    assert again.counters["importance_computed"] == 0 and again.counters["importance_loaded"] == 4
    assert again.counters["tasks_trained"] == 0 and again.counters["tasks_skipped"] == 2
    rows = read_catalogue(again.store, again.job_id).to_pylist()
    assert all(not r["trained"] for r in rows)
    assert {r["task"]: r["sha256"] for r in rows} == before


def test_delta_on_stock_timm_model_gives_pipeline_logits(first_run, task_specs):
    import timm

    _, result = first_run
    spec = task_specs[0]
    delta = load_delta(latest_artifact(result.store, spec.name)["uri"])
    pipeline_model = build_backbone(BACKBONE, spec.num_classes).eval()
    apply_delta(pipeline_model, delta)
    stock = timm.create_model(BACKBONE["name"], num_classes=spec.num_classes, **BACKBONE["kwargs"]).eval()
    stock.load_state_dict(merge_delta(delta, build_backbone(BACKBONE, spec.num_classes)).state_dict())
    images, _ = next(iter(build_loader(spec, "test", transform=transform_for(stock, train=False), batch_size=8)))
    with torch.no_grad():
        torch.testing.assert_close(stock(images), pipeline_model(images), rtol=1e-5, atol=1e-5)
    # and the delta really changed the backbone
    plain = build_backbone(BACKBONE, spec.num_classes).eval()
    plain.load_state_dict({k: v for k, v in stock.state_dict().items() if k.startswith("head")}, strict=False)
    with torch.no_grad():
        assert not torch.allclose(plain(images), stock(images))


def test_bad_job_file_names_field_and_writes_nothing(tmp_path, task_specs):
    store = tmp_path / "store"
    bad = tmp_path / "job.yaml"
    bad.write_text(
        f"backbone: {{name: test_vit}}\nstore: {store}\n"
        f"tasks: [{json.dumps(task_specs[0].model_dump(mode='json'))}]\n"
        "selection: {density: 2.0}\n"
    )
    with pytest.raises(JobSpecError, match=r"selection\.density: .*\(0, 1\]"):
        load_job(bad)
    assert not store.exists()


def test_sweeps_of_all_tasks_run_at_once_and_resume_from_their_ledger(ray_local, task_specs, tmp_path):
    """Both tasks' sweeps share one Tune run (trials of the two tasks overlap in time), each with its own
    study; a sweep killed part-way resumes after its finished trials instead of starting over."""
    job = _job(tmp_path / "store", task_specs, training={"epochs": 2, "cpus_per_worker": 0.9},
               sweep={"enabled": True, "trials_per_task": 3, "density_range": [0.005, 0.05], "seed": 1})
    # one trial of the first task loses its process at the end of its last epoch, before that epoch's checkpoint
    os.environ["SHPEFT_FAULT_INJECT"] = f"{task_specs[0].name}:1"
    try:
        result = run_job(job, progress=False)
    finally:
        del os.environ["SHPEFT_FAULT_INJECT"]
    assert result.exit_code == 0, result.rows
    from orchestrator.runtime.tasklog import read_logs

    logs = dict(read_logs(result.store, result.job_id))
    # Tune ends every trial with a SystemExit, on purpose: the log has the trials' epochs and no traceback
    assert logs[task_specs[1].name].count("epoch 1/2") == 3 and "Traceback" not in logs[task_specs[1].name]
    ledgers = {}
    for row in result.rows:
        assert row["sweep_trials"] == 3 and 0.005 <= row["density"] <= 0.05 and 0.0 <= row["alpha"] <= 1.0
        root = f"{result.store}/sweeps/{row['task']}-{row['config_hash']}"
        summary = json.loads(open(f"{root}/trials.json").read())
        assert len(summary["trials"]) == 3 and summary["best"]["density"] == row["density"]
        assert float(load_delta(row["delta_uri"]).metadata["density"]) == row["density"]
        assert exists(row["delta_uri"]) and sha256_file(row["delta_uri"]) == row["sha256"]
        ledgers[row["task"]] = (root, read_sealed_json(f"{root}/ledger.json")["trials"])
        # each trial's recorded artifact holds exactly the weights of its last reported epoch
        for t in ledgers[row["task"]][1]:
            assert t["delta_uri"].endswith(f"{t['trial_id']}-e{t['epochs']}.safetensors"), t
            assert load_delta(t["delta_uri"]).metadata["epochs_trained"] == str(t["epochs"]), t
        assert not os.path.exists(f"{root}/runs")  # the trials' checkpoints are removed with Tune's folders
        # trials that ran every epoch were evaluated in the trial; the best one's evaluation is the row's
        for t in ledgers[row["task"]][1]:
            assert (read_eval(eval_file(t["delta_uri"])) is not None) == (t["epochs"] == 2), t
        if summary["best"]["epochs"] == 2:
            ev = read_eval(eval_file(summary["best"]["delta_uri"]))["row"]
            assert ev["sha256"] == row["sha256"] and ev["test_macro_f1"] == row["test_macro_f1"]
    # the killed trial was retried and resumed after its epoch-0 checkpoint; every trial finished
    faulted = ledgers[task_specs[0].name]
    assert os.path.exists(f"{faulted[0]}/fault-injected.json")
    assert all(t["error"] is None and t["val_metric"] is not None for t in faulted[1])
    assert [t["resumed_from_epoch"] for t in faulted[1]].count(0) == 1, faulted[1]
    assert all(t["resumed_from_epoch"] is None for t in ledgers[task_specs[1].name][1])
    a, b = (ledgers[s.name][1] for s in task_specs)
    assert any(x["started_at"] < y["finished_at"] and y["started_at"] < x["finished_at"] for x in a for y in b), \
        [(t["trial_id"], t["started_at"], t["finished_at"]) for t in a + b]
    assert not os.path.exists(f"{result.store}/sweeps/_tune/{result.job_id}")  # Tune's folders are cleaned up
    assert any(p.endswith("density_vs_metric.png") for p in result.plots)

    # As if the driver had died after one trial of the first task: only its summary and two trials are gone.
    root, ledger = ledgers[task_specs[0].name]
    os.remove(f"{root}/trials.json")
    os.remove(next(r["delta_uri"] for r in result.rows if r["task"] == task_specs[0].name))
    write_sealed_json(f"{root}/ledger.json", {"task": task_specs[0].name, "trials": ledger[:1]})
    # The second task's artifact is gone too and its ledger was altered (a trial's score changed): the
    # ledger is not trusted, and that task's sweep runs again from the start.
    root2, ledger2 = ledgers[task_specs[1].name]
    os.remove(next(r["delta_uri"] for r in result.rows if r["task"] == task_specs[1].name))
    doc = json.loads(open(f"{root2}/ledger.json").read())
    doc["trials"][0]["val_metric"] = 1.0
    open(f"{root2}/ledger.json", "w").write(json.dumps(doc))
    again = run_job(job, progress=False, force=False)
    assert again.exit_code == 0, again.rows
    resumed = read_sealed_json(f"{root}/ledger.json")["trials"]
    assert len(resumed) == 3 and resumed[0] == ledger[0]  # the finished trial is kept, two new ones ran
    assert {t["trial_id"] for t in resumed[1:]}.isdisjoint({t["trial_id"] for t in ledger})
    restarted = read_sealed_json(f"{root2}/ledger.json")["trials"]
    assert len(restarted) == 3 and {t["trial_id"] for t in restarted}.isdisjoint({t["trial_id"] for t in ledger2})


def test_shpeft_predict_matches_stock_timm_model_with_run_deltas(first_run, task_specs):
    """`shpeft predict` with the run's deltas == each delta merged into a stock timm model."""
    import glob

    import timm
    from click.testing import CliRunner

    from orchestrator.cli.main import main
    from orchestrator.serving.predict import decode_image

    _, result = first_run
    images = sorted(glob.glob(os.path.join(task_specs[1].source, "test", "*", "*.png")))[:3]
    assert images
    uris = [latest_artifact(result.store, s.name)["uri"] for s in task_specs]
    top_k = max(s.num_classes for s in task_specs)
    out = CliRunner().invoke(main, ["predict", "--backbone-source", BACKBONE["source"],
                                    *sum((["--delta", u] for u in uris), []), "--json", "--top-k", str(top_k), *images])
    assert out.exit_code == 0, out.output
    got = [json.loads(line) for line in out.output.splitlines() if line.startswith("{")]
    for spec, uri in zip(task_specs, uris):
        delta = load_delta(uri)
        stock = timm.create_model(BACKBONE["name"], num_classes=spec.num_classes, **BACKBONE["kwargs"]).eval()
        stock.load_state_dict(merge_delta(delta, build_backbone(BACKBONE, spec.num_classes)).state_dict())
        batch = torch.stack([transform_for(stock, train=False)(decode_image(p)) for p in images])
        with torch.no_grad():
            probs = torch.softmax(stock(batch), dim=1)
        rows = [g for g in got if g["task"] == spec.name]
        assert len(rows) == len(images) * spec.num_classes
        for g in rows:
            i = images.index(g["image"])
            assert g["probability"] == pytest.approx(float(probs[i, g["label"]]), abs=1e-5)


def test_corrupt_or_truncated_cache_entries_are_recomputed_not_used(first_run, task_specs, tmp_path):
    """Cache entries are trusted for their verified bytes: a flipped or cut map is reported and recomputed."""
    import shutil

    job, result = first_run
    store = tmp_path / "store"
    shutil.copytree(os.path.join(result.store, "importance"), store / "importance")
    maps = sorted(p for p in (store / "importance").glob("*.safetensors") if not p.name.startswith("agnostic-"))
    assert len(maps) == 2
    flipped = bytearray(maps[0].read_bytes())
    flipped[-5] ^= 0xFF
    maps[0].write_bytes(bytes(flipped))
    maps[1].write_bytes(maps[1].read_bytes()[:-100])
    copy = parse_job({**job.model_dump(mode="json"), "store": str(store)})
    again = run_job(copy, progress=False)
    assert again.exit_code == 0, again.rows
    assert again.counters["importance_computed"] == 2 and again.counters["importance_loaded"] == 2
    for p in maps:  # rewritten whole, and verifiable again
        from shpeft_core.io import verify_file

        assert verify_file(str(p)) is None


def test_two_jobs_with_the_same_task_names_keep_both_artifacts(first_run, task_specs):
    """Another job in the same store, same task names: nothing of the first job is overwritten."""
    job, first = first_run
    other = parse_job({**job.model_dump(mode="json"), "training": {**job.training.model_dump(mode="json"),
                                                                    "epochs": 1}})
    second = run_job(other, progress=False)
    assert second.exit_code == 0 and second.job_id != first.job_id
    old = {r["task"]: r for r in read_catalogue(first.store, first.job_id).to_pylist()}
    new = {r["task"]: r for r in read_catalogue(second.store, second.job_id).to_pylist()}
    for spec in task_specs:
        assert old[spec.name]["delta_uri"] != new[spec.name]["delta_uri"]
        for r in (old[spec.name], new[spec.name]):
            assert sha256_file(r["delta_uri"]) == r["sha256"]  # each job's rows still verify
        assert latest_artifact(first.store, spec.name)["uri"] == new[spec.name]["delta_uri"]
