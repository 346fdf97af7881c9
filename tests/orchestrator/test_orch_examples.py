"""Every example job file validates; every cluster config parses and has what a launch needs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from orchestrator.jobspec import CatalogueTaskRef, JobSpecError, load_job, parse_job

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CLUSTER = ROOT / "cluster"


def test_examples_present():
    names = {p.name for p in EXAMPLES}
    assert {"demo.yaml", "medmnist224_vitb16_gpu.yaml", "sweep.yaml", "parquet_s3.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path):
    job = load_job(path)
    assert job.tasks
    # The file is the whole truth: re-validating its dump gives the same job.
    assert parse_job(job.model_dump(mode="json")) == job


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_breaks_on_unknown_key(path):
    """Validation is strict: a typo in any example is caught, naming the field."""
    data = yaml.safe_load(path.read_text())
    data["training"] = {**data.get("training", {}), "epochz": 3}
    with pytest.raises(JobSpecError, match=r"training\.epochz"):
        parse_job(data, str(path))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_tasks_resolve(path):
    """Catalogue references resolve to full task specs, the way the pipeline resolves them."""
    from orchestrator.pipeline import resolve_task

    job = load_job(path)
    for entry in [*job.tasks, *job.importance.pool_datasets]:
        spec = resolve_task(entry)
        assert spec.class_names is None or len(spec.class_names) == spec.num_classes


def test_medmnist_gpu_example():
    from orchestrator.pipeline import resolve_task

    job = load_job(ROOT / "examples" / "medmnist224_vitb16_gpu.yaml")
    assert job.backbone.name == "vit_base_patch16_224"
    assert job.backbone.source == "hub"
    assert job.training.use_gpu and job.training.gpus_per_worker >= 1
    specs = [resolve_task(t) for t in job.tasks]
    assert len(specs) >= 3 and any(isinstance(t, CatalogueTaskRef) for t in job.tasks)
    for spec in specs:
        assert spec.format == "medmnist" and spec.image_size == 224 and spec.source.startswith("s3://")
        assert spec.class_names and len(spec.class_names) == spec.num_classes


def test_sweep_example_sweeps():
    job = load_job(ROOT / "examples" / "sweep.yaml")
    assert job.sweep.enabled and job.sweep.trials_per_task >= 2
    lo, hi = job.sweep.density_range
    assert 0 < lo < hi <= 1


def test_parquet_example_reads_object_storage():
    job = load_job(ROOT / "examples" / "parquet_s3.yaml")
    assert job.store.startswith("s3://")
    assert all(t.format == "parquet" and t.source.startswith("s3://") for t in job.tasks)


def test_demo_example_is_the_demo_job(tmp_path, monkeypatch):
    """examples/demo.yaml is exactly the job `shpeft demo` builds (store ./demo-store, full size, 2 CPUs).

    The demo's real data generation runs into a temporary store; the pre-trained backbone is
    reported as cached (so its content key is computed but nothing trains) and the Ray run is
    replaced by a recorder, so only the job it would run is compared.
    """
    import orchestrator.demo as demo
    import orchestrator.pipeline as pipeline

    example = load_job(ROOT / "examples" / "demo.yaml")
    store = str(tmp_path / "demo-store")
    captured = []

    class Result:
        exit_code = 0
        plots = []

    monkeypatch.setattr(demo, "exists", lambda uri: "/backbones/" in uri)
    monkeypatch.setattr(pipeline, "run_job", lambda job, **kw: captured.append(job) or Result())
    assert demo.run_demo(store, False, num_cpus=2, progress=False) == 0
    (job,) = captured
    got = json.loads(json.dumps(job.model_dump(mode="json")).replace(store, "demo-store"))
    assert got == example.model_dump(mode="json")


# ---------------------------------------------------------------- cluster configs


def _ray_schema() -> dict:
    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name,provider", [("aws-gpu.yaml", "aws"), ("gcp-gpu.yaml", "gcp")])
def test_launcher_config_valid(name, provider):
    import jsonschema

    cfg = yaml.safe_load((CLUSTER / name).read_text())
    jsonschema.validate(cfg, _ray_schema())  # the schema `ray up` itself checks against
    assert cfg["provider"]["type"] == provider
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_types = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types and all(t["max_workers"] >= 1 for t in gpu_types)
    assert "2.60" in cfg["docker"]["image"]  # same Ray as the client
    assert any("pip install" in c and "shpeft" in c for c in cfg["setup_commands"])
    assert any("--dashboard-host=0.0.0.0" in c for c in cfg["head_start_ray_commands"])


def test_kuberay_manifest():
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay-raycluster.yaml").read_text()))
    (rc,) = [d for d in docs if d and d.get("kind") == "RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert spec["rayVersion"].startswith("2.60")
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert 8265 in ports and 6379 in ports
    (gpu,) = spec["workerGroupSpecs"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]


def test_cluster_readme_names_every_config():
    text = (CLUSTER / "README.md").read_text()
    for p in CLUSTER.glob("*.yaml"):
        assert p.name in text
    assert "shpeft submit" in text
