"""The shpeft_core usage example in docs/python-api.md runs as written."""

import pathlib
import re

import torch

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "python-api.md"


def test_docs_usage_example_runs():
    text = DOC.read_text()
    section = text.split("### Usage", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "no python block under '### Usage'"
    ns: dict = {}
    exec(compile(blocks[0], str(DOC), "exec"), ns)
    assert len(ns["history"]) == 3
    assert ns["logits"].shape == (4, 2)
    plain = ns["plain"]
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(ns["images"][:4]), ns["logits"], rtol=1e-5, atol=1e-6)
    assert not any(n.endswith(".values") for n in plain.state_dict())
    torch.testing.assert_close(ns["per_task"], ns["logits"], rtol=1e-5, atol=1e-5)  # mixed forward = applied delta
    assert ns["history"][-1]["accuracy"] > 0.8


def test_readme_delta_example_runs(tmp_path):
    """The README's 'A delta in Python' block, on a real delta file in place of the store path."""
    from helpers_core import separable_batches

    from shpeft_core import (BackboneSpec, ImportanceConfig, TrainConfig, apply_sparse_training, compute_importance,
                             create_backbone, extract_delta, fit, hybrid_scores, save_delta, select_mask)

    readme = DOC.parents[1] / "README.md"
    block = re.findall(r"## A delta in Python\n\n```python\n(.*?)```", readme.read_text(), flags=re.S)[0]
    batches = separable_batches(n=32, batch=16)
    model = create_backbone(BackboneSpec("test_vit", None, {"img_size": 32}), 2)
    imp = compute_importance(model, batches, ImportanceConfig(num_batches=2), num_classes=2)
    apply_sparse_training(model, select_mask(hybrid_scores(imp, None, 1.0), 0.01))
    fit(model, batches, batches, TrainConfig(epochs=1, lr=1e-2), num_classes=2)
    path = tmp_path / "busi.safetensors"
    save_delta(extract_delta(model, metadata={"alpha": "1", "estimator": "grad2", "importance_key": "",
                                              "task": "busi"}), str(path))
    ns = {"images": batches[0][0][:4]}
    exec(compile(block.replace("store/deltas/busi/<job_id>-<hash>.safetensors", str(path)), "README.md", "exec"), ns)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(ns["logits"], model(batches[0][0][:4]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ns["plain"].eval()(batches[0][0][:4]), ns["logits"], rtol=1e-5, atol=1e-5)
