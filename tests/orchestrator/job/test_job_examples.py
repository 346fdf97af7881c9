"""Every example job file validates; every cluster config parses and has what a launch needs."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from orchestrator.job.spec import CatalogueTaskRef, JobSpecError

from orchestrator.job.load import load_job, parse_job

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CLUSTER = ROOT / "cluster"


def test_examples_present():
    names = {p.name for p in EXAMPLES}
    assert {"demo.yaml", "medmnist224_vitb16_gpu.yaml", "sweep.yaml", "parquet_s3.yaml",
            "small_backbone_fractional_gpu.yaml"} <= names


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
    from orchestrator.job.spec import resolve_task

    job = load_job(path)
    for entry in [*job.tasks, *job.importance.pool_datasets]:
        spec = resolve_task(entry)
        assert spec.class_names is None or len(spec.class_names) == spec.num_classes


def test_medmnist_gpu_example():
    from orchestrator.job.spec import resolve_task

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


def test_small_backbone_example_shares_gpus():
    from orchestrator.runtime.resources import trainer_slots, worker_resources

    job = load_job(ROOT / "examples" / "small_backbone_fractional_gpu.yaml")
    assert job.training.use_gpu and job.training.gpus_per_worker == 0.25
    assert job.store.startswith("s3://")
    # One 4-CPU/1-GPU worker node of the launcher configs holds four of its training workers.
    assert worker_resources(job) == {"CPU": 1.0, "GPU": 0.25}
    assert trainer_slots(4, 1, job) == 4 and trainer_slots(8, 2, job) == 8


def test_parquet_example_reads_object_storage():
    job = load_job(ROOT / "examples" / "parquet_s3.yaml")
    assert job.store.startswith("s3://")
    assert all(t.format == "parquet" and t.source.startswith("s3://") for t in job.tasks)


def test_demo_example_is_the_demo_job(tmp_path, monkeypatch):
    """examples/demo.yaml is exactly the job `shpeft demo` builds (store ./demo-store, full size, 2 CPUs).

    The demo's real data generation and backbone installation run into a temporary store; only the
    job it would run is compared (nothing trains).
    """
    import orchestrator.workflows.demo as demo

    example = load_job(ROOT / "examples" / "demo.yaml")
    store = str(tmp_path / "demo-store")
    job = demo.prepare_demo_job(store, False, cpus=2, progress=False)
    got = json.loads(json.dumps(job.model_dump(mode="json")).replace(store, "demo-store"))
    assert got == example.model_dump(mode="json")


# ---------------------------------------------------------------- cluster configs


def _ray_schema() -> dict:
    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        return json.load(f)


def _shpeft_install_extras(command: str, checkout: str) -> set[str] | None:
    """The extras of a `pip install ... CHECKOUT[extra,...]` command, or None when it installs something else."""
    m = re.search(r"pip install\b.*?" + re.escape(checkout) + r"(?:\[([^\]]*)\])?", command)
    if not m:
        return None
    return {e.strip() for e in (m.group(1) or "").split(",") if e.strip()}


@pytest.mark.parametrize("name,provider,extra", [("aws-gpu.yaml", "aws", "s3"), ("gcp-gpu.yaml", "gcp", "gcs")])
def test_launcher_config_valid(name, provider, extra):
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
    # Every node installs the checkout that file_mounts copies there, with the provider's object-store extra.
    (checkout,) = [dst for dst, src in cfg["file_mounts"].items() if src == "."]
    extras = [e for c in cfg["setup_commands"] if (e := _shpeft_install_extras(c, checkout)) is not None]
    assert extras and all(extra in e for e in extras), (checkout, cfg["setup_commands"])
    assert not cfg.get("worker_setup_commands")  # nothing that would replace it on workers only


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


def _env_from_secrets(container: dict) -> None:
    """Credentials come from Secrets, never as literal values in the manifest."""
    for var in container.get("env", []):
        if any(w in var["name"].upper() for w in ("KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")):
            assert "value" not in var and "secretKeyRef" in var["valueFrom"], var["name"]


def test_kuberay_rayjob(tmp_path):
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay-rayjob.yaml").read_text()) if d]
    (rj,) = [d for d in docs if d.get("kind") == "RayJob"]
    assert rj["apiVersion"] == "ray.io/v1"
    spec = rj["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and int(spec["ttlSecondsAfterFinished"]) >= 0

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["shpeft", "run"]
    assert argv[argv.index("--address") + 1] == "auto"
    job_path = argv[2]

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"].startswith("2.60")
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (head_c,) = head["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head_c["resources"].get("limits", {})
    assert {8265, 6379} <= {p["containerPort"] for p in head_c["ports"]}

    # The job file is a ConfigMap key mounted on the head, where the entrypoint runs.
    volumes = {v["name"]: v for v in head["template"]["spec"]["volumes"]}
    (mount,) = [m for m in head_c["volumeMounts"] if job_path.startswith(m["mountPath"].rstrip("/") + "/")]
    key = job_path[len(mount["mountPath"].rstrip("/")) + 1:]
    cm_name = volumes[mount["name"]]["configMap"]["name"]
    (cm,) = [d for d in docs if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == cm_name]
    job_file = tmp_path / "job.yaml"
    job_file.write_text(cm["data"][key])
    job = load_job(job_file)
    assert job.store.split("://", 1)[0] in ("s3", "gs", "gcs", "az", "abfs")

    (gpu,) = cluster["workerGroupSpecs"]
    (worker_c,) = gpu["template"]["spec"]["containers"]
    assert int(worker_c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert 1 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    # The same image as the long-lived RayCluster (built with the object-store extra).
    (rc,) = [d for d in yaml.safe_load_all((CLUSTER / "kuberay-raycluster.yaml").read_text()) if d]
    assert head_c["image"] == worker_c["image"] == rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    for c in (head_c, worker_c):
        _env_from_secrets(c)
        assert {v["name"] for v in c["env"]} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_cluster_readme_names_every_config():
    text = (CLUSTER / "README.md").read_text()
    for p in CLUSTER.glob("*.yaml"):
        assert p.name in text
    assert "shpeft submit" in text
    assert "small_backbone_fractional_gpu.yaml" in text


def test_cluster_readme_commands_exist():
    """Every `shpeft COMMAND --option` the guide shows is a real command and option of the CLI."""
    from orchestrator.cli.main import main

    text = (CLUSTER / "README.md").read_text()
    blocks = [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S) if lang in ("", "bash")]
    lines = [ln.strip() for block in blocks for ln in block.splitlines()]
    seen = 0
    for line in lines:
        if not line.startswith("shpeft "):
            continue
        argv = shlex.split(line.split("#", 1)[0])
        cmd = main.commands.get(argv[1])
        assert cmd is not None, line
        options = {o for p in cmd.params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
        for arg in argv[2:]:
            if arg.startswith("-"):
                assert arg.split("=", 1)[0] in options, (line, arg)
        seen += 1
    assert seen >= 6
