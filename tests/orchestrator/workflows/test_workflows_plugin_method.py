"""A method defined outside shpeft -- one file, one registration -- runs through `shpeft compare` like a
built-in one: the job file accepts it, every Ray worker finds it ($SHPEFT_METHODS), and its artifact is
trained, evaluated and reported."""

import os
import sys
import textwrap

import pytest

ray = pytest.importorskip("ray")

from orchestrator.job.load import parse_job  # noqa: E402
from orchestrator.workflows.compare import run_compare  # noqa: E402

from helpers_orch import BACKBONE, backbone_file, colour_task  # noqa: E402,F401

pytestmark = pytest.mark.ray

TOY = textwrap.dedent('''
    """A toy method: the layer norms and the head train; the artifact is a plain checkpoint."""
    from shpeft_core.methods import Method, register_method
    from shpeft_core.methods.dense import freeze_all, unfreeze_head


    @register_method
    class NormsOnly(Method):
        name = "norms"
        help = "every LayerNorm and the head"
        artifact = "checkpoint"
        default_lr = 1e-2

        def prepare(self, model, *, mask=None, settings=None):
            freeze_all(model)
            for n, p in model.named_parameters():
                if ".norm" in n or n.startswith("norm."):
                    p.requires_grad_(True)
            unfreeze_head(model)
            return model, None
''')


@pytest.fixture(scope="module")
def ray_with_plugin(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugin")
    (folder / "toy_norms_method.py").write_text(TOY)
    saved = {k: os.environ.get(k) for k in ("SHPEFT_METHODS", "PYTHONPATH")}
    # Workers inherit the driver's environment when Ray starts: they import the plug-in the same way.
    os.environ["SHPEFT_METHODS"] = "toy_norms_method"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), saved["PYTHONPATH"]]))
    sys.path.insert(0, str(folder))
    import toy_norms_method  # noqa: F401  (the driver registers it as the workers will)

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    sys.path.remove(str(folder))
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_a_registered_toy_method_runs_through_compare(ray_with_plugin, tmp_path):
    from shpeft_core.methods import get_method, method_names

    assert "norms" in method_names() and get_method("norms").artifact == "checkpoint"
    specs = [colour_task(str(tmp_path), "colour-a", 0)]
    job = parse_job({
        "backbone": BACKBONE, "store": str(tmp_path / "store"),
        "tasks": [s.model_dump(mode="json") for s in specs],
        "importance": {"batches": 1, "batch_size": 16},
        "method": {"name": "norms"},  # the job file takes it like a built-in
        "training": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0},
    })
    res = run_compare(job, methods="norms,linear", seeds=1, progress=False)
    rows = {r["method"]: r for r in res.rows}
    assert res.exit_code == 0, [r.get("error") for r in res.rows]
    norms = rows["norms"]
    assert norms["status"] == "ok" and norms["artifact_kind"] == "checkpoint"
    assert norms["artifact_uri"].endswith(".checkpoint.safetensors") and os.path.isfile(norms["artifact_uri"])
    # it trained exactly its own parameters: the norms and the head, more than the head alone
    assert rows["linear"]["trainable"] < norms["trainable"] < 10_000
    assert 0.0 <= norms["test_macro_f1"] <= 1.0
    assert "norms" in open(res.report_uri).read()
