"""`shpeft predict` and `shpeft export` against dense float64 references built without shpeft.

Two task deltas (different head sizes) are made on a tiny seeded test_vit with random sparse
values; the reference for each task is a stock `timm.create_model` whose weights are the base
weights with the delta's values scattered in by hand, in float64.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from helpers_orch import random_delta
from orchestrator.cli.main import main
from shpeft_core.backbone import BackboneSpec, backbone_fingerprint, create_backbone, head_parameter_names
from shpeft_core.delta import TaskDelta

KWARGS = {"img_size": 32}


def _write_base_weights(path: Path) -> BackboneSpec:
    """A base checkpoint on disk, as users have (hub download or their own pre-training)."""
    import safetensors.torch

    torch.manual_seed(123)
    base = timm.create_model("test_vit", num_classes=7, **KWARGS)
    safetensors.torch.save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path))
    return BackboneSpec("test_vit", str(path), KWARGS)


def _make_delta(spec: BackboneSpec, path: Path, task: str, class_names: list[str], seed: int) -> TaskDelta:
    return random_delta(spec, path, task, class_names, seed=seed, density=0.01, scale=0.2)


def _base_state(spec: BackboneSpec) -> dict[str, torch.Tensor]:
    base = create_backbone(spec, 2)
    heads = set(head_parameter_names(base))
    return base, {k: v for k, v in base.state_dict().items() if k not in heads}


def _reference_model(delta, base_state) -> torch.nn.Module:
    """Stock timm model, float64, weights = base + values scattered at indices, plus the delta's head."""
    n = int(delta.metadata["num_classes"])
    ref = timm.create_model("test_vit", num_classes=n, img_size=32).double().eval()
    state = {k: v.clone().double() for k, v in base_state.items()}
    for name, idx in delta.indices.items():
        flat = state[name].view(-1)
        flat[idx.long()] += delta.values[name].double()
    state.update({k: v.double() for k, v in delta.head.items()})
    ref.load_state_dict(state, strict=True)
    return ref


def _reference_inputs(paths: list[Path]) -> torch.Tensor:
    """Decode independently of shpeft's predict path; preprocessing at the model's input size."""
    from timm.data import create_transform

    tf = create_transform(input_size=(3, 32, 32), interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3,
                          crop_pct=1.0, is_training=False)
    imgs = []
    for p in paths:
        if p.suffix == ".dcm":
            from tasks.codecs.dicom import decode_dicom

            img = decode_dicom(p.read_bytes(), where=str(p))
        else:
            img = Image.open(p).convert("RGB")
        imgs.append(tf(img))
    return torch.stack(imgs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    spec = _write_base_weights(d / "base.safetensors")
    deltas = {
        "busi": _make_delta(spec, d / "busi.safetensors", "busi", ["benign", "malignant", "normal"], seed=1),
        "chaoyang": _make_delta(spec, d / "chaoyang.safetensors", "chaoyang",
                                ["normal", "serrated", "adenocarcinoma", "adenoma", "other"], seed=2),
    }
    rng = np.random.default_rng(0)
    images = []
    for i, (size, mode) in enumerate([((40, 40), "RGB"), ((32, 48), "L"), ((64, 64), "RGB")]):
        arr = rng.integers(0, 256, size=size + ((3,) if mode == "RGB" else ()), dtype=np.uint8)
        p = d / f"img{i}.png"
        Image.fromarray(arr, mode=mode).save(p)
        images.append(p)
    import pydicom.data

    dcm = d / "ct.dcm"
    dcm.write_bytes(Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes())
    images.append(dcm)
    base, base_state = _base_state(spec)
    for delta in deltas.values():
        assert backbone_fingerprint(base) == delta.metadata["backbone_fingerprint"]
    return d, deltas, images, base_state


def test_predict_matches_dense_reference(setup):
    from orchestrator.serving.predict import load_images, task_logits
    from tasks.transforms import transform_for
    from shpeft_core.delta import create_model_for_delta

    d, deltas, images, base_state = setup
    order = [deltas["busi"], deltas["chaoyang"], deltas["busi"]]  # switching back must give the same
    model = create_model_for_delta(order[0])
    x = load_images([str(p) for p in images], transform_for(model, train=False))
    xref = _reference_inputs(images)
    torch.testing.assert_close(x, xref.float(), atol=1e-6, rtol=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = task_logits(model, order, x, batch_size=3)  # batches of 3 over 4 images
    for delta, lg in zip(order, got):
        with torch.no_grad():
            ref = _reference_model(delta, base_state)(xref.double())
        assert lg.shape == (len(images), int(delta.metadata["num_classes"]))
        torch.testing.assert_close(lg.double(), ref, atol=1e-5, rtol=1e-5)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every delta removed bit-exactly


def test_predict_cli_one_backbone_json(setup, monkeypatch):
    import orchestrator.serving.predict as predict

    d, deltas, images, base_state = setup
    built = []
    real = predict.create_model_for_delta
    monkeypatch.setattr(predict, "create_model_for_delta", lambda *a, **k: built.append(1) or real(*a, **k))
    args = ["predict", "--backbone-source", str(d / "base.safetensors"), "--delta", str(d / "busi.safetensors"),
            "--delta", str(d / "chaoyang.safetensors"), "--json", "--top-k", "2", *map(str, images)]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert len(built) == 1
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(rows) == 2 * len(images) * 2
    xref = _reference_inputs(images).double()
    for task, delta in deltas.items():
        with torch.no_grad():
            probs = _reference_model(delta, base_state)(xref).softmax(-1)
        names = json.loads(delta.metadata["class_names"])
        for i, img in enumerate(images):
            mine = [r for r in rows if r["task"] == task and r["image"] == str(img)]
            top = probs[i].topk(2)
            assert [r["label"] for r in mine] == top.indices.tolist()
            assert [r["class_name"] for r in mine] == [names[j] for j in top.indices.tolist()]
            np.testing.assert_allclose([r["probability"] for r in mine], top.values.numpy(), atol=1e-5)


def test_predict_table_and_errors(setup, tmp_path):
    d, deltas, images, _ = setup
    base = ["--backbone-source", str(d / "base.safetensors")]
    res = CliRunner().invoke(main, ["predict", *base, "--delta", str(d / "busi.safetensors"), str(images[0])])
    assert res.exit_code == 0, res.output
    assert "busi" in res.output and "img0.png" in res.output

    # The weights file a delta names is never read on its say-so: the user names the weights.
    res = CliRunner().invoke(main, ["predict", "--delta", str(d / "busi.safetensors"), str(images[0])])
    assert res.exit_code == 2 and "--backbone-source" in res.output and "base.safetensors" in res.output

    res = CliRunner().invoke(main, ["predict", "--backbone", "vit_base_patch16_224",
                                    "--delta", str(d / "busi.safetensors"), str(images[0])])
    assert res.exit_code == 2 and "--backbone" in res.output and "test_vit" in res.output

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    res = CliRunner().invoke(main, ["predict", *base, "--delta", str(d / "busi.safetensors"), str(bad)])
    assert res.exit_code == 2 and "broken.png" in res.output

    res = CliRunner().invoke(main, ["predict", "--delta", str(d / "busi.safetensors"),
                                    "--delta", str(d / "busi.safetensors"), str(images[0])])
    assert res.exit_code == 2 and "same task" in res.output

    res = CliRunner().invoke(main, ["predict", "--delta", str(images[0]), str(images[0])])
    assert res.exit_code == 2 and "img0.png" in res.output

    res = CliRunner().invoke(main, ["predict", "--delta", str(tmp_path / "gone.safetensors"), str(images[0])])
    assert res.exit_code == 2 and "gone.safetensors" in res.output

    res = CliRunner().invoke(main, ["predict", "--backbone-source", str(tmp_path / "nobase.safetensors"),
                                    "--delta", str(d / "busi.safetensors"), str(images[0])])
    assert res.exit_code == 2 and "nobase.safetensors" in res.output and "test_vit" in res.output


def test_predict_refuses_other_base_weights(setup, tmp_path):
    """A --backbone-source whose weights differ from the delta's base is refused, not silently used."""
    import safetensors.torch

    d, _, images, _ = setup
    torch.manual_seed(321)
    other = timm.create_model("test_vit", num_classes=3, img_size=32)  # other weights
    weights = tmp_path / "other.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(weights))
    res = CliRunner().invoke(main, ["predict", "--backbone-source", str(weights),
                                    "--delta", str(d / "busi.safetensors"), str(images[0])])
    assert res.exit_code == 2 and "fingerprint" in res.output


def test_export_loads_into_stock_timm(setup, tmp_path):
    d, deltas, images, base_state = setup
    out = tmp_path / "exp" / "chaoyang_merged.safetensors"
    res = CliRunner().invoke(main, ["export", str(d / "chaoyang.safetensors"), "--merged", str(out),
                                    "--backbone-source", str(d / "base.safetensors")])
    assert res.exit_code == 0, res.output
    assert str(out) in res.stdout
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # atomic: no temp file left
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["backbone"] == "test_vit" and meta["num_classes"] == "5"
    assert json.loads(meta["class_names"])[2] == "adenocarcinoma"
    stock = timm.create_model(meta["backbone"], num_classes=int(meta["num_classes"]),
                              **json.loads(meta["backbone_kwargs"])).eval()
    stock.load_state_dict(load_file(str(out)), strict=True)
    x = _reference_inputs(images)
    with torch.no_grad():
        got = stock(x).double()
        ref = _reference_model(deltas["chaoyang"], base_state)(x.double())
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_export_errors(setup, tmp_path):
    d, _, images, _ = setup
    res = CliRunner().invoke(main, ["export", str(d / "busi.safetensors"), "--merged", str(tmp_path / "x.pt")])
    assert res.exit_code == 2 and ".safetensors" in res.output
    res = CliRunner().invoke(main, ["export", str(tmp_path / "missing.safetensors"), "--merged", str(tmp_path / "o.safetensors")])
    assert res.exit_code == 2 and "missing.safetensors" in res.output
    assert not (tmp_path / "o.safetensors").exists()
    res = CliRunner().invoke(main, ["export", str(d / "busi.safetensors"), "--merged", str(tmp_path / "o.safetensors")])
    assert res.exit_code == 2 and "--backbone-source" in res.output and not (tmp_path / "o.safetensors").exists()
